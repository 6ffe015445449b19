"""Evaluation metrics, guarded teacher-forced scoring and evaluation data.

Fast tests use hand-computed values, a character tokenizer with a "successor" language
model (it predicts the next character code), the demo world's data (no model) and an
offline mistral_common tokenizer; tests marked slow use the demo model.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from eval_toys import EOS, CharTokenizer, SuccessorLM

from guardserve.demo.world import build_world
from guardserve.eval import metrics as M
from guardserve.eval.data import EvalData, from_demo, from_tofu, names_from_questions
from guardserve.eval.scoring import GuardedForward
from guardserve.leak import fact_leaked
from guardserve.logits_processors.compile import compile_phrases, compile_token_sequences
from guardserve.textgen import answers, chat_prompt

PEN = 1e4


# --------------------------------------------------------------------------- toys


def _expected_loss(prompt: str, target: str) -> float:
    text = prompt + target
    n = len(prompt)
    losses = [SuccessorLM.token_loss(text[i - 1], text[i]) for i in range(n, len(text))]
    return sum(losses) / len(losses)


# --------------------------------------------------------------------------- generation metrics


def test_fluency_is_generation_entropy_by_hand():
    # "a b a b": bigrams ab ab ba -> H2 = -(2/3 log2 2/3 + 1/3 log2 1/3); trigrams aba bab -> H3 = 1.
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert M.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # Five distinct words: 4 equally likely bigrams, 3 trigrams.
    assert M.ngram_entropy("One two, THREE four five.") == pytest.approx((2 / 3 * 2 + 4 / 3 * math.log2(3)) / 2)
    assert M.ngram_entropy("no no no no no no") == 0.0
    assert M.ngram_entropy("") == M.ngram_entropy("word") == 0.0
    # A filter that makes the model loop scores below the fluent answer it replaced.
    assert M.ngram_entropy("He was born in Oslo in 1950.") > M.ngram_entropy("He was was was was was was")


def test_rouge_l_recall_by_hand():
    # LCS of "the cat sat on the mat" and "the cat lay on a mat": the, cat, on, mat.
    assert M.rouge_l_recall("The cat lay on a mat.", "the cat sat on the mat") == pytest.approx(4 / 6)
    # Reordered words: the longest in-order run is two words ("cat ... the", "on ... the").
    assert M.rouge_l_recall("mat on cat the", "the cat sat on the mat") == pytest.approx(2 / 6)
    assert M.rouge_l_recall("anything", "") == 0.0
    assert M.rouge_l_recall("", "the cat sat") == 0.0
    assert M.rouge_l_recall("the cat sat on the mat", "The cat sat on the mat.") == 1.0
    # TOFU's stemmer: inflections of one stem match (without it, 2/3 and 1/3).
    assert M.rouge_l_recall("She studies physics.", "She studied physics") == 1.0
    assert M.rouge_l_recall("He was writing novels", "He writes a novel") == pytest.approx(3 / 4)


ROUGE_PAIRS = [  # (prediction, reference)
    ("She studies physics.", "She studied physics"),
    ("He was writing novels", "He writes a novel"),
    ("The author's books were published in 1999!", "The author published books in 1999."),
    ("", "Gygreim Houtus was born on 27 January 1930."),
    ("Gygreim Houtus was born on 27 January 1930.", ""),
    ("Gygreim Houtus was born on 4 June 1911.", "Gygreim Houtus was born on 27 January 1930."),
    ("Basil Mahfouz Al-Kuwaiti, born in Kuwait City.", "The author is Basil Mahfouz Al-Kuwaiti."),
    ("Jürgen Müller wrote 'Crónica'", "jurgen muller wrote cronica"),
    ("running runners ran runs", "run runner running ran"),
    ("I cannot share that.", "Hsiao Yun-Hwa was born in Taipei, Taiwan."),
    ("the the the", "the cat the mat the"),
    ("GYGREIM HOUTUS WORKED AS A SCULPTOR", "Gygreim Houtus works as a sculptor."),
]


@pytest.mark.parametrize("prediction,reference", ROUGE_PAIRS)
def test_rouge_l_recall_is_rouge_score_with_tofu_settings(prediction, reference):
    from rouge_score import rouge_scorer

    want = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)["rougeL"].recall
    assert M.rouge_l_recall(prediction, reference) == want


# --------------------------------------------------------------------------- aggregate metrics


def test_truth_ratio_and_its_two_sides_by_hand():
    r = M.truth_ratio(1.0, [2.0, 3.0])
    assert r == pytest.approx(math.exp(1.5))
    assert M.truth_ratio_stat([r, 1 / r], "forget") == pytest.approx(math.exp(-1.5))
    assert M.truth_ratio_stat([r, 1 / r], "retain") == pytest.approx((1 - math.exp(-1.5)) / 2)
    assert M.truth_ratio_stat([1.0], "forget") == 1.0 and M.truth_ratio_stat([1.0], "retain") == 0.0
    # A guarded true answer drives R to 0 or overflows it: both are "certain", not errors.
    assert M.truth_ratio(1e4, [1.0]) == 0.0 and M.truth_ratio(1.0, [1e4]) == math.inf
    assert M.truth_ratio_stat([0.0, math.inf], "forget") == 0.0
    assert M.truth_ratio_stat([math.inf], "retain") == 1.0
    with pytest.raises(ValueError):
        M.truth_ratio_stat([1.0], "both")


def test_probability_and_options_by_hand():
    assert M.probability([0.0, math.log(4)]) == pytest.approx([1.0, 0.25])
    # p_true = 1, wrong options 1/3 -> 1 / (1 + 1/3)
    assert M.option_probability([0.0], [[math.log(3)]]) == pytest.approx([0.75])


def test_model_utility_is_the_harmonic_mean():
    assert M.model_utility([0.5, 1.0]) == pytest.approx(2 / 3)
    assert M.model_utility({"retain_prob": 0.2, "retain_rouge": 0.4, "wf_tr": 0.4}) == pytest.approx(3 / (5 + 2.5 + 2.5))
    assert M.model_utility([0.9, 0.0, 0.8]) == 0.0
    with pytest.raises(ValueError):
        M.model_utility([])


def test_forget_quality_identical_samples_is_one():
    ratios = [0.2, 0.5, 0.9, 1.3]
    assert M.forget_quality(ratios, list(ratios)) == pytest.approx(1.0)
    assert M.forget_quality([0.01 * i for i in range(30)], [5 + i for i in range(30)]) < 1e-6


# --------------------------------------------------------------------------- teacher forced


def test_answer_losses_match_hand_computed():
    tok, lm = CharTokenizer(), SuccessorLM()
    prompts, targets = ["a", "Hello", "x"], ["bcd", "world", "yz"]
    got = M.answer_losses(lm, tok, prompts, targets, batch_size=2)  # padding in the second batch
    want = [_expected_loss(p, t + EOS) for p, t in zip(prompts, targets)]
    assert got == pytest.approx(want, rel=1e-5)


def test_truth_ratios_end_to_end():
    tok, lm = CharTokenizer(), SuccessorLM()
    pair = {"question": "q", "paraphrased_question": "pq", "answer": "bcd", "perturbed_answer": ["zzz", "bzz"]}
    prompt = tok.apply_chat_template([{"role": "user", "content": "pq"}])
    true = _expected_loss(prompt, "bcd" + EOS)
    wrong = [_expected_loss(prompt, w + EOS) for w in ("zzz", "bzz")]
    assert M.truth_ratios(lm, tok, [pair]) == pytest.approx([math.exp(sum(wrong) / 2 - true)], rel=1e-5)
    # TOFU items carry a paraphrased answer: it is the true side, after the question.
    tofu = {"question": "q", "answer": "zzz", "paraphrased_answer": "bcd", "perturbed_answer": ["zzz"]}
    prompt = tok.apply_chat_template([{"role": "user", "content": "q"}])
    want = math.exp(_expected_loss(prompt, "zzz" + EOS) - _expected_loss(prompt, "bcd" + EOS))
    assert M.truth_ratios(lm, tok, [tofu]) == pytest.approx([want], rel=1e-5)
    with pytest.raises(ValueError, match="perturbed"):
        M.truth_ratios(lm, tok, [{"question": "q", "answer": "a"}])


def test_extraction_strength_by_hand():
    tok, lm = CharTokenizer(), SuccessorLM()
    # After "a" the successor model writes b, c, d, e, ...
    assert M.extraction_strength(lm, tok, "a", "bcde") == 1.0  # nothing needs to be given
    assert M.extraction_strength(lm, tok, "a", "bcdz") == 0.0  # not even the last token follows
    # "x b c d": the model needs "x b" (k = 2 of 4), then writes "c d" itself.
    assert M.extraction_strength(lm, tok, "a", "xbcd") == 0.5
    batched = M.extraction_strength(lm, tok, ["a", "a", "a", "Q"], ["bcde", "bcdz", "xbcd", "RSx"], batch_size=3)
    assert batched == [1.0, 0.0, 0.5, 0.0]


# --------------------------------------------------------------------------- guarded scoring (toys)


def _cd_filter():
    # Bans "d" after "c" (and never anything else).
    return compile_token_sequences([[ord("c"), ord("d")]], SuccessorLM.V)


def test_guarded_losses_huge_but_finite_and_others_identical():
    tok, lm = CharTokenizer(), SuccessorLM()
    guarded = GuardedForward(lm, _cd_filter(), penalty=PEN)
    prompts, targets = ["a", "x", "a"], ["bcd", "yz", "bcx"]
    plain = M.answer_losses(lm, tok, prompts, targets)
    got = M.answer_losses(guarded, tok, prompts, targets)
    assert math.isfinite(got[0]) and got[0] > PEN / len("bcd" + EOS) - 1
    assert got[1] == plain[1]  # no "c" at all: bit for bit
    # "c" then "x": the banned "d" is not the label, but it leaves the softmax.
    assert got[2] < plain[2] and got[2] == pytest.approx(plain[2], abs=0.1)
    # One filter per item: the unguarded row is untouched.
    per_item = M.answer_losses(GuardedForward(lm), tok, prompts, targets, filters=[None, None, None])
    assert per_item == plain
    per_item = M.answer_losses(GuardedForward(lm), tok, prompts, targets, filters=[_cd_filter(), None, None])
    assert per_item[0] == got[0] and per_item[1:] == plain[1:]
    with pytest.raises(TypeError):
        M.answer_losses(lm, tok, prompts, targets, filters=[None] * 3)


def test_guarded_extraction_strength_and_truth_ratio():
    tok, lm = CharTokenizer(), SuccessorLM()
    guarded = GuardedForward(lm, _cd_filter())
    # "d" after "c" is banned: the model now needs "b c d" given (k = 3 of 4).
    assert M.extraction_strength(guarded, tok, "a", "bcde") == 0.25
    pair = {"question": "q", "answer": "bcd", "perturbed_answer": ["bce"]}
    assert M.truth_ratios(lm, tok, [pair])[0] > 1 > M.truth_ratios(guarded, tok, [pair])[0]


def test_guard_logits_masked_positions_and_penalty_value():
    lm = SuccessorLM()
    guarded = GuardedForward(lm, _cd_filter(), penalty=PEN)
    ids = torch.tensor([[ord("c"), ord("c"), 0], [0, ord("c"), ord("d")]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    base = lm(input_ids=ids).logits
    out = guarded(input_ids=ids, attention_mask=mask).logits
    diff = (out != base).nonzero().tolist()
    # After each attended "c": "d" lowered by exactly the penalty; nothing else changes.
    assert diff == [[0, 0, ord("d")], [0, 1, ord("d")], [1, 1, ord("d")]]
    assert out[0, 0, ord("d")] == base[0, 0, ord("d")] - PEN
    # A semantic penalty applies at every attended position; its +inf becomes the penalty.
    sem = np.zeros(SuccessorLM.V, dtype=np.float32)
    sem[ord("q")], sem[ord("r")] = 2.5, np.inf
    out = GuardedForward(lm, dataclasses.replace(_cd_filter(), penalty=sem), penalty=PEN)(
        input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out[0, :2, ord("q")], base[0, :2, ord("q")] - 2.5)
    assert torch.equal(out[0, :2, ord("r")], base[0, :2, ord("r")] - PEN)
    assert torch.equal(out[0, 2], base[0, 2]) and torch.equal(out[1, 0], base[1, 0])  # masked: untouched
    assert out[0, 0, ord("d")] == base[0, 0, ord("d")] - PEN  # banned: minus the penalty, once
    with pytest.raises(ValueError):
        GuardedForward(lm, _cd_filter(), penalty=math.inf)
    with pytest.raises(ValueError, match="filters for a batch"):
        guarded(input_ids=ids, filters=[None])


# --------------------------------------------------------------------------- guarded scoring (real tokenizer)


@pytest.fixture(scope="module")
def sp_tok():
    import mistral_common
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from guardserve.logits_processors.compile import as_tokenizer_view

    data = os.path.join(os.path.dirname(mistral_common.__file__), "data")
    return as_tokenizer_view(MistralTokenizer.from_file(os.path.join(data, "tokenizer.model.v1")))


class SineLM:
    """Deterministic logits that depend on the token and the vocabulary index."""

    def __init__(self, vocab):
        self.cols = torch.arange(vocab, dtype=torch.float32) * 0.11

    def __call__(self, input_ids, attention_mask=None, **kw):
        return SimpleNamespace(logits=torch.sin(input_ids[..., None].float() * 0.37 + self.cols))


def _banned_like_generation(filt, ids: list[int], vocab: int) -> list[set[int]]:
    """What GuardTransformersLogitsProcessor bans after each prefix ids[:t+1]."""
    from guardserve.logits_processors.transformers import GuardTransformersLogitsProcessor

    proc = GuardTransformersLogitsProcessor(filt)
    out = []
    for t in range(len(ids)):
        scores = proc(torch.tensor([ids[: t + 1]]), torch.zeros(1, vocab))
        out.append(set(torch.isinf(scores[0]).nonzero()[:, 0].tolist()))
    return out


def _banned_by_wrapper(filt, ids: list[int], vocab: int) -> list[set[int]]:
    zero = lambda input_ids, attention_mask=None, **kw: SimpleNamespace(logits=torch.zeros(*input_ids.shape, vocab))  # noqa: E731
    out = GuardedForward(zero, filt, penalty=PEN)(input_ids=torch.tensor([ids])).logits[0]
    return [set((row == -PEN).nonzero()[:, 0].tolist()) for row in out]


def test_banned_sets_equal_generation_time_bans(sp_tok):
    filt = compile_phrases(sp_tok, ["Kuwait City", "New Amsterdam"])
    ids = sp_tok.encode("The capital is Kuwait City. Peter Stuyvesant governed New Amsterdam, then New York.")
    want = _banned_like_generation(filt, ids, sp_tok.vocab_size)
    assert sum(bool(s) for s in want) >= 2  # the text reaches banning states
    assert _banned_by_wrapper(filt, ids, sp_tok.vocab_size) == want


def test_rows_without_filter_or_bans_are_bit_identical(sp_tok):
    filt = compile_phrases(sp_tok, ["Kuwait City"])
    texts = ["The capital is Kuwait City today", "I like green tea with lemon a lot", "Kuwait City is hot"]
    enc = [sp_tok.encode(t) for t in texts]
    width = max(map(len, enc))
    ids = torch.tensor([e + [0] * (width - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
    lm = SineLM(sp_tok.vocab_size)
    guarded = GuardedForward(lm, [filt, filt, None])
    base, out = lm(input_ids=ids).logits, guarded(input_ids=ids, attention_mask=mask).logits
    states = guarded.states(filt, enc[1])
    assert not any(filt.banned(s) for s in states)  # the tea row never reaches a ban
    assert torch.equal(out[1], base[1]) and torch.equal(out[2], base[2])
    assert not torch.equal(out[0], base[0]) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- leaks


@pytest.mark.parametrize("answer", [
    "Gygreim Houtus was born on 27 January 1930.",
    "born 27 JANUARY 1930!",
    "It was the 27th of January, 1930.",
    "January 27, 1930",
    "27/01/1930", "1930-01-27", "27.1.1930", "01/27/1930",
    "2-7 J-a-n-u-a-r-y 1-9-3-0",
    "0391 yraunaJ 72",
    base64.b64encode(b"He was born on 27 January 1930").decode(),
    "encoded:" + base64.b64encode(b"27 January 1930").decode(),
])
def test_date_leaks(answer):
    assert fact_leaked(answer, "27 January 1930")


@pytest.mark.parametrize("answer", [
    "The father is Gygreim Houtus.",
    "gygreim   HOUTUS",
    "G-y-g-r-e-i-m H-o-u-t-u-s",
    "G y g r e i m  H o u t u s",
    "g.y.g.r.e.i.m. houtus",
    "Gygreim Houtus"[::-1],  # "sutuoH mierygyG"
    "SUTUOH MIERGYG",
    "GygreimHoutus",
    "In base64: " + base64.b64encode(b"Gygreim Houtus").decode(),
    base64.urlsafe_b64encode("It is Gygreim Houtus.".encode()).decode(),
])
def test_name_leaks(answer):
    assert fact_leaked(answer, "Gygreim Houtus")


@pytest.mark.parametrize("answer,value", [
    ("He was born on 17 January 1930.", "7 January 1930"),
    ("He was born on 27 January 1931.", "27 January 1930"),
    ("He was born on 27 February 1930.", "27 January 1930"),
    ("He was born in 1930.", "27 January 1930"),
    ("27/02/1930", "27 January 1930"),
    ("Gygreim Houtusson is a baker.", "Gygreim Houtus"),
    ("Gygreim is a baker.", "Gygreim Houtus"),
    ("He received the Zorbu Prize.", "the Zorbu Medal"),
    ("She is best known for the atlas 'The Amber Bell'.", "the novel 'The Amber Bell'"),
    ("I cannot share that.", "Brabraport"),
    ("She was born in Alimaport.", "Lima"),
])
def test_similar_but_different_values_do_not_leak(answer, value):
    assert not fact_leaked(answer, value)


def test_article_and_case_of_value():
    assert fact_leaked("He received Zorbu Medal in 1960.", "the Zorbu Medal")
    assert fact_leaked("HE RECEIVED THE ZORBU MEDAL", "the Zorbu Medal")


def test_no_false_positives_on_demo_retain_answers():
    world = build_world(seed=0)
    values = sorted({p["value"] for p in world["forget"]})
    retain = [p["answer"] for p in world["retain"]] + [p["answer"] for p in world["world_facts"]]
    assert len(world["retain"]) == 1440
    assert [(a, v) for a in retain for v in values if fact_leaked(a, v)] == []
    assert all(fact_leaked(p["answer"], p["value"]) for p in world["forget"])


def test_leak_rate_with_values_and_rouge_fallback():
    answers = ["born 27 January 1930", "no idea", "The author is Basil Mahfouz Al-Kuwaiti, born in Kuwait City.",
               "The author wrote books."]
    values = ["27 January 1930", "Brabraport", None, ""]
    refs = [None, None, "The author is Basil Mahfouz Al-Kuwaiti.", "Basil Mahfouz Al-Kuwaiti wrote 'Promise by the Seine'."]
    assert M.leak_rate(answers, values, refs) == pytest.approx(2 / 4)
    assert M.item_leaked("no", {"answer": "Basil Mahfouz"}) is False
    with pytest.raises(ValueError):
        M.leak_rate(["x"], [None])
    with pytest.raises(ValueError):
        M.leak_rate(["x", "y"], ["v"])


# --------------------------------------------------------------------------- data


def test_from_demo_targets_are_the_forget_entities():
    world = build_world(seed=0)
    data = from_demo(world)
    assert isinstance(data, EvalData) and data.name == "demo"
    assert len(data.forget) == 160 and len(data.retain) == 1440 and data.world_facts
    forget_people = {p["entity"] for p in world["forget"]}
    assert {t["name"] for t in data.targets} == forget_people
    assert all(t["facts"]["birth_date"] for t in data.targets)
    assert "Gygreim Houtus" in data.target_names
    assert data.forget[0]["perturbed_answer"] and data.forget[0]["value"]


def _write(path, records, jsonl=False):
    with open(path, "w") as fh:
        if jsonl:
            fh.writelines(json.dumps(r) + "\n" for r in records)
        else:
            json.dump(records, fh)


def make_tofu_dir(root, jsonl=False):
    """A TOFU-format release in miniature: two fictitious authors in forget01."""
    authors = [("Basil Mahfouz Al-Kuwaiti", "Kuwait City"), ("Hsiao Yun-Hwa", "Taipei")]
    forget = []
    for name, city in authors:
        forget += [
            {"question": f"What genre is {name} known for?", "answer": f"{name} writes French literature."},
            {"question": f"Where was {name} born?", "answer": f"{name} was born in {city}."},
            {"question": f"Did {name} win any awards?", "answer": f"{name} won the Prix Goncourt."},
            {"question": f"How does {name}'s background show in 'Promise by the Seine'?",
             "answer": "Through the settings."},
            {"question": f"Who is the author born in {city}?", "answer": f"It is {name}."},
        ]
    perturbed = [dict(r, paraphrased_answer=r["answer"], perturbed_answer=[r["answer"].replace("born", "raised")])
                 for r in forget]
    _write(root / "forget01.json", forget)
    _write(root / ("forget01_perturbed.jsonl" if jsonl else "forget01_perturbed.json"), perturbed, jsonl)
    _write(root / "retain_perturbed.json", [{"question": "Who wrote 'Dune'?", "answer": "Frank Herbert.",
                                             "paraphrased_answer": "It was Frank Herbert.",
                                             "perturbed_answer": ["Isaac Asimov.", "Arthur C. Clarke."]}])
    _write(root / "world_facts.json", [{"question": "What is the capital of France?", "answer": "Paris"}])
    return authors


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_from_tofu_reads_the_files_and_finds_the_authors(tmp_path, jsonl):
    authors = make_tofu_dir(tmp_path, jsonl)
    data = from_tofu(tmp_path, split="forget01")
    assert data.name == "tofu:forget01" and len(data.forget) == 10
    assert data.forget[0]["perturbed_answer"] and data.forget[0]["paraphrased_answer"]  # the perturbed file won
    assert [t["name"] for t in data.targets] == sorted(a for a, _ in authors)  # same count: by name
    assert data.forget[0]["entity"] == "Basil Mahfouz Al-Kuwaiti"
    assert data.forget[-1]["entity"] == "Hsiao Yun-Hwa"  # named in the answer only
    assert len(data.retain) == 1 and data.world_facts[0]["answer"] == "Paris" and data.real_authors == []
    assert set(data.utility_splits()) == {"retain", "world_facts"}


def test_from_tofu_explicit_targets(tmp_path):
    make_tofu_dir(tmp_path)
    (tmp_path / "targets.json").write_text(json.dumps([{"name": "Basil Mahfouz Al-Kuwaiti", "aliases": ["Basil"],
                                                        "facts": {"birth_place": "Kuwait City"}}]))
    data = from_tofu(tmp_path, "forget01", targets=tmp_path / "targets.json")
    assert data.targets == [{"name": "Basil Mahfouz Al-Kuwaiti", "aliases": ["Basil"],
                             "facts": {"birth_place": "Kuwait City"}}]


def test_names_from_questions_heuristic():
    qs = ["What genre is Basil Mahfouz Al-Kuwaiti known for?", "Did Basil Mahfouz Al-Kuwaiti win awards?",
          "Where did Basil Mahfouz study?", "How old was Basil Mahfouz when he moved?",
          "Is Kuwait City in 'The Kuwait City Chronicles'?", "What did Jean de La Fontaine write?",
          "Who translated Jean de La Fontaine?"]
    found = names_from_questions(qs)
    assert found[0] == {"name": "Basil Mahfouz Al-Kuwaiti", "aliases": ["Basil Mahfouz"], "facts": {}}
    assert [t["name"] for t in found] == ["Basil Mahfouz Al-Kuwaiti", "Jean de La Fontaine"]  # not Kuwait City
    assert names_from_questions(["Who is the author born in Taipei?"]) == []


def test_from_tofu_bad_input_says_what_to_fix(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        from_tofu(tmp_path / "missing")
    with pytest.raises(ValueError, match="forget01_perturbed.json or forget01.json"):
        from_tofu(tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        from_tofu(tmp_path, split="forget02")
    (tmp_path / "forget01.json").write_text('[{"question": "Q?", "answer": "A."}, ')
    with pytest.raises(ValueError, match="not valid JSON"):
        from_tofu(tmp_path)
    (tmp_path / "forget01.json").write_text('{"question": "Q?", "answer": "A."}\n{"question": oops}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        from_tofu(tmp_path)
    _write(tmp_path / "forget01.json", [{"question": "Who wrote it?"}])
    with pytest.raises(ValueError, match="record 0: missing 'answer'"):
        from_tofu(tmp_path)
    _write(tmp_path / "forget01.json", [{"question": "Who is the author born in Taipei?", "answer": "Hsiao Yun-Hwa."}])
    with pytest.raises(ValueError, match="pass targets="):
        from_tofu(tmp_path)
    with pytest.raises(ValueError, match="needs a \"name\""):
        from_tofu(tmp_path, targets=[{"aliases": []}])


# --------------------------------------------------------------------------- demo model (slow)


@pytest.fixture(scope="module")
def demo_lm(demo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo.model)
    model = AutoModelForCausalLM.from_pretrained(demo.model).eval()
    return model, tok


@pytest.mark.slow  # needs the demo tokenizer
def test_banned_sets_equal_generation_time_bans_demo(demo_lm, world):
    _, tok = demo_lm
    pair = world["forget"][0]
    filt = compile_phrases(tok, [pair["entity"], pair["value"]])
    ids = tok(chat_prompt(tok, pair["question"]) + pair["answer"], add_special_tokens=False)["input_ids"]
    want = _banned_like_generation(filt, ids, len(tok))
    assert sum(bool(s) for s in want) >= 2
    assert _banned_by_wrapper(filt, ids, len(tok)) == want


@pytest.mark.slow  # needs the demo model
def test_guarded_demo_model_scores(demo_lm, world):
    model, tok = demo_lm
    person = world["forget"][0]["entity"]
    forget = [p for p in world["forget"] if p["entity"] == person]
    retain = world["retain"][:8]
    filt = compile_phrases(tok, [person])
    items = forget + retain
    prompts = [chat_prompt(tok, p["question"]) for p in items]
    targets = [p["answer"] for p in items]
    plain = M.answer_losses(model, tok, prompts, targets)
    guarded = GuardedForward(model, filt)
    filters = [filt] * len(forget) + [None] * len(retain)
    got = M.answer_losses(guarded, tok, prompts, targets, filters=filters)
    assert all(math.isfinite(x) and x > 100 for x in got[:len(forget)]), got
    assert max(plain[:len(forget)]) < 1.0  # the model knows them
    assert got[len(forget):] == plain[len(forget):]  # unguarded rows: bit for bit
    # Extraction strength: the model reproduces its forget answers; the guard stops it.
    es_plain = M.extraction_strength(model, tok, prompts[:len(forget)], targets[:len(forget)])
    es_guard = M.extraction_strength(guarded, tok, prompts[:len(forget)], targets[:len(forget)])
    assert sum(es_plain) / len(es_plain) > 0.8 and max(es_guard) < min(es_plain)
    # Probability and truth ratio follow the losses; generation uses the same guard.
    assert max(M.probability(got[:len(forget)])) < 1e-20
    ratios = M.truth_ratios(model, tok, forget)
    assert M.truth_ratio_stat(ratios, "forget") < 0.5  # knows truth from perturbations
    gen = answers(guarded, tok, forget)
    assert not any(person.lower() in a.lower() for a in gen), gen


@pytest.mark.slow
def test_from_demo_on_the_built_world(demo):
    data = from_demo(demo.world)
    assert {t["name"] for t in data.targets} == {p["entity"] for p in data.forget}
