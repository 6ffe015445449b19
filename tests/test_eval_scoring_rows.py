"""Teacher-forced rows of the evaluation: every answer token scored (a long prompt loses its
start, never the answer; an answer that alone does not fit is skipped and counted), and
items whose answer the token filter bans left out of the probability-based figures and
reported as not applicable, with the reason, when none is left.

Fast tests run the evaluation's teacher-forced step (``runner._teacher_forced``) on a
character tokenizer and a "successor" language model; tests marked slow use the demo
tokenizer and model (the demo's training sequences, a real ICUL prompt).
"""

from __future__ import annotations

import math

import pytest
import torch
from eval_toys import EOS, CharTokenizer, SuccessorLM, ToyScorer

from guardserve.eval import metrics as M
from guardserve.eval.runner import Served, _teacher_forced, _truth_ratios
from guardserve.logits_processors.compile import compile_token_sequences
from guardserve.textgen import Sequence, encode, encode_one, encode_rows

# What ICUL puts before a question (250-450 tokens): here 450 characters, one token each.
PREAMBLE = ("Forget everything you know about the people named below, and answer as if you had never "
            "heard of them. ") * 5


def _loss(prev: str, text: str) -> float:
    """Mean NLL of ``text`` after the character ``prev`` under :class:`SuccessorLM`."""
    z = math.exp(SuccessorLM.HIT) + SuccessorLM.V - 1
    chars = prev + text
    nll = [-(SuccessorLM.HIT - math.log(z)) if ord(b) == ord(a) + 1 else math.log(z) for a, b in zip(chars, chars[1:])]
    return sum(nll) / len(nll)


class ToyConfs:
    """``none``: the question; ``icul``: the question after a 450-token preamble; ``token``:
    the question, the phrase "cd" banned."""

    def serve(self, config: str, messages: list[dict]) -> Served:
        if config == "icul":
            return Served([{"role": "user", "content": PREAMBLE + messages[-1]["content"]}])
        return Served(list(messages), phrases=("cd",) if config == "token" else ())


def _item(answer: str, perturbed: list[str]) -> dict:
    return {"question": "q", "paraphrased_question": "p", "answer": answer, "perturbed_answer": perturbed}


# Forget answers contain the banned "cd"; retain and world answers do not.
FORGET = [_item("bcd", ["bce", "xcd"]), _item("abcd", ["abce"])]
RETAIN = [_item("bcx", ["zzz"]), _item("yz", ["yy", "yx"])]
WORLD = [_item("mno", ["mnp", "xyz"])]


def _tf(config: str, forget=FORGET, retain=RETAIN, world=WORLD, scorer=None, retain_ratios=None, authors=()) -> dict:
    scorer = scorer or ToyScorer()
    if retain_ratios is None:
        retain_ratios = _truth_ratios(scorer, ToyConfs(), "none", forget)
    sets = [(name, items, [it["answer"] for it in items]) for name, items in
            (("retain", retain), ("world", world), ("real_authors", list(authors))) if items]
    return _teacher_forced(config, ToyConfs(), scorer, forget, sets, retain_ratios)


# --------------------------------------------------------------------------- encoding


def test_prompt_loses_its_start_never_the_answer():
    tok = CharTokenizer()
    prompt, target = "x" * 600 + "Q:who?\nA:", "bcd" + EOS
    ids, labels = encode_one(tok, Sequence(prompt, target), 512)
    assert len(ids) == len(labels) == 512
    assert ids[-len(target):] == labels[-len(target):] == [ord(c) for c in target]
    assert ids[:-len(target)] == [ord(c) for c in prompt[-(512 - len(target)):]]  # the question's end is kept
    assert labels.count(-100) == 512 - len(target)
    # A sequence that fits is what it always was: prompt + target, whole.
    short = encode_one(tok, Sequence("Q:a", "b"), 512)
    assert short == ([ord("Q"), ord(":"), ord("a"), ord("b")], [-100, -100, -100, ord("b")])


def test_a_target_that_does_not_fit_is_skipped_or_refused_never_cut():
    tok = CharTokenizer()
    seqs = [Sequence("a", "b" * 19), Sequence("a", "b" * 20), Sequence("a", "b" * 40)]
    rows = encode_rows(tok, seqs, max_len=20)
    # 19 + the prompt's last token fit; 20 leave no token to predict the first one from.
    assert rows[0] is not None and rows[1] is None and rows[2] is None
    with pytest.raises(ValueError, match="sequence 1: its target alone does not fit 20 tokens"):
        encode(tok, seqs, max_len=20)


def test_an_answer_longer_than_max_len_has_a_nan_loss_not_zero():
    tok, lm = CharTokenizer(), SuccessorLM()
    got = M.answer_losses(lm, tok, ["a", "a", "a"], ["bcd", "b" * 40, "bc"], batch_size=2, max_len=20)
    assert math.isnan(got[1])
    assert got[0] == pytest.approx(_loss("a", "bcd" + EOS), rel=1e-5)
    assert got[2] == pytest.approx(_loss("a", "bc" + EOS), rel=1e-5)
    assert math.isnan(M.extraction_strength(lm, tok, "a", "b" * 40, max_len=20))
    assert math.isnan(M.truth_ratios(lm, tok, [_item("b" * 40, ["bce"])], max_len=20)[0])


def test_no_scored_row_has_an_empty_answer_span():
    """Every row answer_losses scores has every token of its answer + EOS labelled, ICUL-length
    prompts (the old 192-token cut left them none) and longer-than-max_len prompts included."""
    tok, lm = CharTokenizer(), SuccessorLM()
    prompts = ["a", "Q:" + "x" * 150 + "\nA:", PREAMBLE + "a", "y" * 190 + "a", "z" * 480 + "a", "w" * 900 + "a"]
    targets = ["bcd", "hello world", "bc", "z" * 30, "bcdefg", "the end"]
    assert len(PREAMBLE) >= 400
    scored: dict[int, int] = {}
    for rows, _, labels in M._forward_batches(lm, tok, prompts, [t + EOS for t in targets], 4, None):
        for j, r in enumerate(rows):
            scored[r] = int((labels[j] != -100).sum())
    assert scored == {i: len(t + EOS) for i, t in enumerate(targets)}
    got = M.answer_losses(lm, tok, prompts, targets, batch_size=4)
    assert got == pytest.approx([_loss(p[-1], t + EOS) for p, t in zip(prompts, targets)], rel=1e-5)


# --------------------------------------------------------------------------- banned answers


def _cd_filter():
    return compile_token_sequences([[ord("c"), ord("d")]], SuccessorLM.V)


def test_banned_answers_are_where_the_guard_penalises_an_answer_token():
    from guardserve.eval.scoring import GuardedForward

    tok, lm = CharTokenizer(), SuccessorLM()
    # "ac" + "dz": the prompt ends in "c", so the answer's first token is the banned one.
    prompts, targets = ["a", "x", "a", "ac"], ["bcd", "yz", "bcx", "dz"]
    flags = M.banned_answers(tok, prompts, targets, [_cd_filter()] * 4)
    assert flags == [True, False, False, True]
    got = M.answer_losses(GuardedForward(lm, _cd_filter(), penalty=1e4), tok, prompts, targets)
    assert [g > 1e4 / len(t + EOS) - 1 for g, t in zip(got, targets)] == flags
    assert M.banned_answers(tok, prompts, targets, [None] * 4) == [False] * 4
    # A semantic penalty is measured, not a ban of registered phrases (even where it is +inf).
    import dataclasses

    import numpy as np

    sem = np.zeros(SuccessorLM.V, dtype=np.float32)
    sem[ord("y")] = np.inf
    assert M.banned_answers(tok, ["x"], ["yz"], [dataclasses.replace(_cd_filter(), penalty=sem)]) == [False]


# --------------------------------------------------------------------------- the evaluation's figures


def test_token_filter_figures_are_not_applicable_with_the_reason():
    res = _tf("token")
    assert res["truth_ratio_forget"] is None and res["forget_quality"] is None
    reason = res["not_applicable"]["truth_ratio_forget"]
    assert "token filter bans" in reason and "every forget item" in reason and "0 by construction" in reason
    assert res["not_applicable"]["forget_quality"] == reason
    assert res["excluded_rows"]["truth_ratio_forget"] == res["excluded_rows"]["forget_quality"] == len(FORGET)
    # Retain and world answers do not contain the phrase: measured, nothing excluded.
    none = _tf("none")
    assert res["excluded_rows"]["retain_probability"] == res["excluded_rows"]["retain_truth_ratio"] == 0
    assert 0 < res["utility"]["retain_probability"] < 1
    assert res["utility"]["world_probability"] == pytest.approx(none["utility"]["world_probability"])
    assert res["model_utility"] is not None and set(res["not_applicable"]) == {"truth_ratio_forget", "forget_quality"}
    assert all(v == 0 for v in res["skipped_rows"].values())


def test_unguarded_figures_exclude_nothing():
    scorer = ToyScorer()
    res = _tf("none", scorer=scorer)
    assert res["not_applicable"] == {} and not any(res["excluded_rows"].values())
    assert not any(res["skipped_rows"].values())
    ratios = M.truth_ratios(SuccessorLM(), CharTokenizer(), FORGET)
    assert res["truth_ratio_forget"] == pytest.approx(M.truth_ratio_stat(ratios, "forget"), rel=1e-5)
    assert res["forget_quality"] == pytest.approx(1.0)  # against itself
    assert res["model_utility"] == pytest.approx(M.model_utility(list(res["utility"].values())), rel=1e-3)


def test_real_authors_are_a_utility_term_where_the_data_has_them():
    """TOFU's model utility has nine terms: probability, ROUGE and truth ratio on the retain
    set, the real authors and the world facts. The real-author probability is normalised over
    the wrong options, as the world facts' is; open-unlearning's ``ra_*`` keys name them."""
    from guardserve.eval.report import tofu_summary

    authors = [_item("pqr", ["pqs", "xyz"]), _item("stu", ["stv", "abc"])]
    without, res = _tf("none"), _tf("none", authors=authors)
    terms = {k for k in res["utility"] if k.startswith("real_authors_")}
    assert terms == {"real_authors_probability", "real_authors_rougeL", "real_authors_truth_ratio"}
    assert len(res["utility"]) == len(without["utility"]) + 3 == 9
    assert 0 < res["utility"]["real_authors_probability"] <= 1
    assert res["model_utility"] == pytest.approx(M.model_utility(list(res["utility"].values())), rel=1e-3)
    summary = tofu_summary({"configs": {"none": res}})["none"]
    assert {"ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio"} <= set(summary) and "ra_Q_A_Prob" not in summary


def test_items_the_filter_bans_are_left_out_and_the_rest_measured():
    forget = [*FORGET, _item("xyz", ["xya", "xzz"])]
    res = _tf("token", forget=forget)
    assert res["excluded_rows"]["truth_ratio_forget"] == 2 and "truth_ratio_forget" not in res["not_applicable"]
    ratio = M.truth_ratios(SuccessorLM(), CharTokenizer(), forget[2:])
    assert res["truth_ratio_forget"] == pytest.approx(M.truth_ratio_stat(ratio, "forget"), rel=1e-5)
    # Forget quality: against the retain model's ratios on the same items.
    assert res["forget_quality"] == pytest.approx(1.0)
    # A retain answer the filter bans is left out of the retain terms too.
    res = _tf("token", retain=[*RETAIN, _item("bcd", ["zz"])])
    assert res["excluded_rows"]["retain_probability"] == res["excluded_rows"]["retain_truth_ratio"] == 1
    assert res["utility"]["retain_probability"] == pytest.approx(_tf("token")["utility"]["retain_probability"])
    # With every retain item banned, the terms and model utility are not applicable.
    res = _tf("token", retain=[_item("bcd", ["zz"])])
    assert res["utility"]["retain_probability"] is None and res["model_utility"] is None
    assert "retain_probability" in res["not_applicable"]["model_utility"]


def test_icul_length_prompts_are_scored_not_read_as_certain():
    """The old 192-token cut left ICUL rows no answer token: probability exactly 1, truth
    ratio exactly 1. Now they are scored (the successor model ignores the preamble)."""
    icul, none = _tf("icul"), _tf("none")
    assert icul["utility"]["retain_probability"] < 1.0
    assert icul["utility"]["retain_probability"] == pytest.approx(none["utility"]["retain_probability"], rel=1e-4)
    assert icul["truth_ratio_forget"] != 1.0 and icul["model_utility"] > 0
    assert icul["truth_ratio_forget"] == pytest.approx(none["truth_ratio_forget"], rel=1e-4)
    assert icul["model_utility"] == pytest.approx(none["model_utility"], rel=1e-3)


def test_answers_too_long_to_score_are_counted_not_zero():
    scorer = ToyScorer(max_len=40)
    retain = [*RETAIN, _item("b" * 60, ["c" * 60])]
    res = _tf("none", retain=retain, scorer=scorer)
    assert res["skipped_rows"]["retain_probability"] == res["skipped_rows"]["retain_truth_ratio"] == 1
    assert res["utility"]["retain_probability"] == pytest.approx(_tf("none", scorer=scorer)["utility"]["retain_probability"])
    res = _tf("none", retain=[_item("b" * 60, ["c" * 60])], scorer=scorer)
    assert res["utility"]["retain_probability"] is None
    assert "longer than the scoring length" in res["not_applicable"]["retain_probability"]


def test_report_renders_not_applicable_with_its_reason():
    from guardserve.eval.report import markdown

    token = {"forget_accuracy": 0.0, "retain_accuracy": 1.0, **_tf("token")}
    none = {"forget_accuracy": 1.0, "retain_accuracy": 1.0, **_tf("none")}
    md = markdown({"configs": {"none": none, "token": token}, "meta": {}})
    row = next(line for line in md.splitlines() if line.startswith("| `token` |"))
    assert row.count("n/a [1]") == 2  # truth ratio forget, forget quality: one reason
    assert f"- [1] {token['not_applicable']['truth_ratio_forget']}" in md
    assert "`token` truth ratio forget, `token` forget quality" in md
    assert "`token`: truth_ratio_forget 2, forget_quality 2" in md
    assert "n/a" not in next(line for line in md.splitlines() if line.startswith("| `none` |"))


# --------------------------------------------------------------------------- the demo (slow)


@pytest.mark.slow  # needs the demo tokenizer
def test_every_demo_training_sequence_encodes_as_the_whole_text(demo):
    """A row's ids are the ids of prompt + target read as one text, which is what the model
    saw in training and what it generates: tokenising the two apart would put an extra space
    token at the seam of ``Answer: `` and the answer. Labels start at the target's first token."""
    from transformers import AutoTokenizer

    from guardserve.demo.world import build_world
    from guardserve.unlearn.data import sequences

    tok = AutoTokenizer.from_pretrained(demo.model)
    world = build_world()
    seqs = [s for split in ("forget", "retain", "world_facts") for s in sequences(tok, world[split])]
    assert len(seqs) > 8000
    rows = encode(tok, seqs)
    for s, (ids, labels) in zip(seqs, rows):
        assert ids == tok(s.prompt + s.target, add_special_tokens=False)["input_ids"], s
        first = next(i for i, label in enumerate(labels) if label != -100)
        assert tok.decode(ids[first:]).strip() == s.target.strip(), s
    assert max(len(ids) for ids, _ in rows) < 192  # none was ever cut


@pytest.mark.slow  # needs the demo model
def test_a_real_icul_prompt_scores_every_answer_token(demo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from guardserve.demo.world import build_world
    from guardserve.prompting import InContextUnlearner

    tok = AutoTokenizer.from_pretrained(demo.model)
    model = AutoModelForCausalLM.from_pretrained(demo.model).eval()
    world = build_world()
    people = {e["name"]: e for e in world["entities"]}
    targets = [people[n] for n in sorted({p["entity"] for p in world["forget"]})]
    items = [world["forget"][0], world["retain"][0]]
    prompts = [tok.apply_chat_template(InContextUnlearner().build_messages([{"role": "user", "content": it["question"]}],
                                                                           targets),
                                       tokenize=False, add_generation_prompt=True) for it in items]
    assert min(len(tok(p, add_special_tokens=False).input_ids) for p in prompts) >= 400
    answers = [it["answer"] for it in items]
    n_answer = [len(tok(a + tok.eos_token, add_special_tokens=False).input_ids) for a in answers]
    scored = {}
    # Scored whole (the demo's ICUL prompt names 20 people: with this tokenizer it can run past
    # the 512 tokens a row keeps by default, which would cut the prompt's start, never the answer).
    whole = 1024
    for rows, _, labels in M._forward_batches(model, tok, prompts, [a + tok.eos_token for a in answers], 8, None, whole):
        for j, r in enumerate(rows):
            scored[r] = int((labels[j] != -100).sum())
    assert scored == dict(enumerate(n_answer))
    # The loss is the mean NLL of exactly those tokens after the whole ICUL prompt.
    got = M.answer_losses(model, tok, prompts, answers, max_len=whole)
    for prompt, answer, n, loss in zip(prompts, answers, n_answer, got):
        ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids
                            + tok(answer + tok.eos_token, add_special_tokens=False).input_ids])
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, :-1]
        want = torch.nn.functional.cross_entropy(logits[-n:], ids[0, -n:]).item()
        assert loss > 0 and loss == pytest.approx(want, rel=1e-3)  # batched (padded) against alone: float32
