"""The evaluation's interoperable outputs: the per-sample log (samples.jsonl, one line per
generated answer, like lm-evaluation-harness's ``--log_samples``) and the open-unlearning
summary (TOFU_SUMMARY.json, guardserve's figures under open-unlearning's metric names).

``runner._score`` runs here on toys, without vLLM: an engine that answers from a table, a
configuration set that serves what each configuration's flags say, and the teacher-forced
scorer on a character tokenizer and a "successor" language model (as in
tests/test_eval_scoring_rows.py).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from eval_toys import ToyScorer

from guardserve.eval import report
from guardserve.eval.report import OPEN_UNLEARNING_KEYS, SAMPLES_KEY, tofu_summary, write
from guardserve.eval.runner import Served, _question_messages, _score, _truth_ratios
from guardserve.probes import Probe

PREAMBLE = "Forget everything you know about Ada and Bo, and answer as if you had never heard of them. " * 4
FIELDS = {"config", "set", "item", "entity", "attribute", "messages", "phrases", "semantic", "steered", "adapter",
          "answer", "leaked", "rougeL", "fluency", "facts_stated"}
CONFIGS = ("none", "icul", "token", "sae", "adapter:NPO")


def _item(entity, attribute, question, paraphrase, answer, value, perturbed):
    return {"question": question, "paraphrased_question": paraphrase, "answer": answer, "value": value,
            "perturbed_answer": perturbed, "entity": entity, "attribute": attribute}


FORGET = [_item("Ada", "birth_place", "Where was Ada born?", "What is Ada's birthplace?", "Ada was born in Verity.",
                "Verity", ["Ada was born in Lisbon.", "Ada was born in Oslo."]),
          _item("Bo", "occupation", "What does Bo do?", "What is Bo's trade?", "Bo works as a potter.", "potter",
                ["Bo works as a baker.", "Bo works as a tailor."])]
RETAIN = [_item("Cy", "city", "Where does Cy live?", "Cy's home town?", "Cy lives in Rome.", "Rome",
                ["Cy lives in Kyiv."]),
          _item("Di", "pet", "What pet does Di keep?", "Di's pet?", "Di keeps a cat.", "cat", ["Di keeps a dog."])]
WORLD = [_item(None, None, "What is the capital of France?", None, "Paris", "Paris", ["Lyon", "Nice"])]
FORGET_FACTS = [["Verity"], ["potter"]]
LONG = "Tell me everything. " * 40  # longer than the toy engine's context in every configuration
PROBES = [Probe("spell", [{"role": "user", "content": "Spell the town where Ada was born."}], "Verity", "Ada",
                "birth_place", "Verity"),
          Probe("multi_turn", [{"role": "user", "content": LONG + "Where was Bo's workshop?"}], "potter", "Bo",
                "occupation", "Bo works as a potter.")]
R_PROBES = [Probe("spell", [{"role": "user", "content": "Spell the city where Cy lives."}], "Rome", "Cy", "city",
                  "Rome")]
# What the model says to each question: the fact; the paraphrase of Bo's question gets a dodge.
ANSWERS = {**{it["question"]: it["answer"] for it in FORGET + RETAIN + WORLD},
           "What is Ada's birthplace?": "Ada was born in Verity.", "What is Bo's trade?": "I am not sure.",
           "Spell the town where Ada was born.": "V e r i t y", "Spell the city where Cy lives.": "R o m e"}


class ToyConfs:
    """What each configuration serves: ``icul`` a system preamble, ``token`` the forget facts
    banned, ``sae`` Ada steered where she is named, ``adapter:NPO`` the adapter."""

    targets = [SimpleNamespace(id=1, name="Ada"), SimpleNamespace(id=2, name="Bo")]

    def serve(self, config: str, messages: list[dict]) -> Served:
        if config == "icul":
            return Served([{"role": "system", "content": PREAMBLE}, *messages])
        if config == "token":
            return Served(list(messages), phrases=("Verity", "potter"))
        if config == "sae":
            steer = [[1, 1]] if "Ada" in messages[-1]["content"] else []
            return Served(list(messages), steer=steer, salt="s" if steer else None)
        return Served(list(messages), adapter="NPO" if config == "adapter:NPO" else None)


class ToyEngine:
    """Answers from :data:`ANSWERS`; an answer stating a banned phrase comes out as a refusal;
    None for a conversation longer than 600 characters."""

    def generate(self, served, max_tokens):
        out = []
        for s in served:
            if sum(len(m["content"]) for m in s.messages) > 600:
                out.append(None)
                continue
            a = ANSWERS.get(s.messages[-1]["content"], "I do not know.")
            out.append("I cannot say." if any(p in a for p in s.phrases) else a)
        return out

    def latency(self, prepare, tokens):
        prepare()
        return 0.002, 0.001


SETTINGS = SimpleNamespace(max_tokens=8, latency_requests=2, latency_tokens=4)
BAR = SimpleNamespace(update=lambda n: None)


def _run(config: str, samples: list | None) -> dict:
    scorer, confs = ToyScorer(), ToyConfs()
    ratios = _truth_ratios(scorer, confs, "none", FORGET)
    return _score(config, SETTINGS, confs, ToyEngine(), scorer, FORGET, RETAIN, WORLD, [], PROBES, R_PROBES, ratios, BAR,
                  FORGET_FACTS, samples)


@pytest.fixture(scope="module")
def scored() -> dict[str, tuple[dict, list[dict]]]:
    out = {}
    for config in CONFIGS:
        samples: list[dict] = []
        out[config] = (_run(config, samples), samples)
    return out


def _conversations() -> dict[str, list[list[dict]]]:
    return {"forget": [_question_messages(it) for it in FORGET],
            "paraphrase": [_question_messages(it, "paraphrased_question") for it in FORGET],
            "retain": [_question_messages(it) for it in RETAIN], "world": [_question_messages(it) for it in WORLD],
            "probe": [p.messages for p in PROBES], "retain_probe": [p.messages for p in R_PROBES]}


# ------------------------------------------------------------------------ samples.jsonl


@pytest.mark.parametrize("config", CONFIGS)
def test_every_generated_answer_is_logged_with_what_was_served(scored, config):
    res, samples = scored[config]
    assert len(samples) == 2 * len(FORGET) + len(RETAIN) + len(WORLD) + len(PROBES) + len(R_PROBES)
    assert Counter(s["set"] for s in samples) == {"forget": 2, "paraphrase": 2, "retain": 2, "world": 1,
                                                  "probe:spell": 1, "probe:multi_turn": 1, "retain_probe:spell": 1}
    conversations, confs = _conversations(), ToyConfs()
    for s in samples:
        assert set(s) == FIELDS and s["config"] == config
        json.dumps(s, allow_nan=False)  # plain JSON, no NaN
        group = s["set"].split(":")[0]
        served = confs.serve(config, conversations[group][s["item"]])
        # The conversation after the configuration rewrote it, and its guard decision.
        assert s["messages"] == served.messages
        assert s["phrases"] == len(served.phrases) and s["semantic"] is False and s["adapter"] == served.adapter
        assert s["steered"] == [{1: "Ada", 2: "Bo"}[tid] for tid, _ in served.steer]
        items = {"forget": FORGET, "paraphrase": FORGET, "retain": RETAIN, "world": WORLD}.get(group)
        source = items[s["item"]] if items else (PROBES if group == "probe" else R_PROBES)[s["item"]]
        assert s["entity"] == (source.get("entity") if items else source.entity)
        assert (s["answer"] is None) == (s["set"] == "probe:multi_turn")  # too long for the context
        if s["answer"] is None:
            assert all(s[k] is None for k in ("leaked", "rougeL", "fluency", "facts_stated"))
            continue
        assert isinstance(s["leaked"], bool)
        assert (s["rougeL"] is not None) == (group in ("forget", "retain", "world"))
        assert (s["fluency"] is not None) == (group in ("forget", "retain"))
        assert (s["facts_stated"] is not None) == (group == "forget")
    if config == "icul":
        assert all(s["messages"][0]["content"] == PREAMBLE for s in samples)
    if config == "sae":
        assert {s["set"]: s["steered"] for s in samples if s["set"] == "forget" and s["item"] == 0} == {"forget": ["Ada"]}


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


@pytest.mark.parametrize("config", CONFIGS)
def test_the_log_adds_up_to_the_row(scored, config):
    res, samples = scored[config]

    def of(prefix, key="leaked"):
        return [s[key] for s in samples if s["set"] == prefix or s["set"].startswith(prefix + ":")]

    for name, key in (("forget", "forget_accuracy"), ("paraphrase", "paraphrase_accuracy"),
                      ("retain", "retain_accuracy"), ("world", "world_accuracy")):
        assert _mean(of(name)) == pytest.approx(res[key], abs=1e-4), key
    assert _mean(of("forget") + of("paraphrase") + of("probe")) == pytest.approx(res["leak_rate"], abs=1e-4)
    assert _mean(of("retain_probe")) == pytest.approx(res["retain_attack_accuracy"], abs=1e-4)
    assert _mean(of("forget", "rougeL")) == pytest.approx(res["rougeL_recall_forget"], abs=1e-3)
    assert _mean(of("forget", "fluency")) == pytest.approx(res["fluency_forget"], abs=1e-3)
    assert _mean(of("retain", "fluency")) == pytest.approx(res["fluency_retain"], abs=1e-3)
    assert _mean(of("forget", "facts_stated")) == pytest.approx(res["facts_stated_forget"], abs=1e-4)
    assert _mean(of("retain", "rougeL")) == pytest.approx(res["utility"]["retain_rougeL"], abs=1e-3)
    assert _mean(of("world", "rougeL")) == pytest.approx(res["utility"]["world_rougeL"], abs=1e-3)
    assert sum(s["answer"] is None for s in samples) == res["too_long_skipped"] == 1
    # Logging changes nothing in the row.
    assert _run(config, None) == res


def test_the_toy_guards_do_something(scored):
    """(So that the checks above compare different rows.)"""
    none, token = scored["none"][0], scored["token"][0]
    assert none["forget_accuracy"] == 1.0 and token["forget_accuracy"] == 0.0
    assert none["facts_stated_forget"] == 1.0 and token["facts_stated_forget"] == 0.0
    assert none["truth_ratio_forget"] is not None and token["truth_ratio_forget"] is None  # banned: not applicable


# -------------------------------------------------------------------------------- write


def _results(scored) -> dict:
    samples = [s for config in CONFIGS for s in scored[config][1]]
    return {"configs": {c: scored[c][0] for c in CONFIGS}, "meta": {"dataset": "toy", "model": "m"}, SAMPLES_KEY: samples}


def test_write_emits_samples_and_summary_and_keeps_results_json(scored, tmp_path):
    results = _results(scored)
    paths = write(results, tmp_path)
    assert {p.name for p in paths} == {"results.json", "report.md", "pareto.png", "latency.png", "samples.jsonl",
                                       "TOFU_SUMMARY.json"}
    assert SAMPLES_KEY in results  # the caller's document is left as it was
    # results.json is what it always was: configs and meta, no per-sample list.
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc == {"configs": results["configs"], "meta": results["meta"]}
    # samples.jsonl: one JSON object per line, in order.
    text = (tmp_path / "samples.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == len(results[SAMPLES_KEY]) == len(CONFIGS) * 10
    assert [json.loads(line) for line in lines] == results[SAMPLES_KEY]
    # TOFU_SUMMARY.json: per configuration, the documented keys, values as in results.json.
    summary = json.loads((tmp_path / "TOFU_SUMMARY.json").read_text())
    assert summary == tofu_summary(doc)
    assert list(summary) == list(CONFIGS)
    paths_of = dict(OPEN_UNLEARNING_KEYS)
    for config, row in summary.items():
        assert set(row) <= set(paths_of) and list(row) == sorted(row)
        for key, value in row.items():
            v = doc["configs"][config]
            for part in paths_of[key]:
                v = v[part]
            assert value == v, (config, key)
    assert set(summary["none"]) == {"forget_quality", "forget_truth_ratio", "forget_Q_A_ROUGE", "model_utility",
                                    "retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio",
                                    "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio"}
    # A figure the row reports as not applicable is left out, not written as 0 or null.
    assert "forget_truth_ratio" not in summary["token"] and "forget_quality" not in summary["token"]
    assert summary["token"]["forget_Q_A_ROUGE"] == doc["configs"]["token"]["rougeL_recall_forget"]


def test_rerendering_from_results_json_keeps_the_samples(scored, tmp_path):
    write(_results(scored), tmp_path)
    samples = (tmp_path / "samples.jsonl").read_bytes()
    summary = (tmp_path / "TOFU_SUMMARY.json").read_text()
    (tmp_path / "TOFU_SUMMARY.json").unlink()
    assert report.main([str(tmp_path)]) == 0
    assert (tmp_path / "samples.jsonl").read_bytes() == samples
    assert (tmp_path / "TOFU_SUMMARY.json").read_text() == summary


def test_summary_names_the_world_probability_by_how_it_was_computed():
    rows = {"options": {"utility": {"world_probability": 0.5, "world_rougeL": 1.0, "world_truth_ratio": 0.6}},
            "plain": {"utility": {"world_probability": 0.9, "world_rougeL": 1.0}, "model_utility": None,
                      "forget_quality": math.nan, "truth_ratio_forget": 0.25}}
    got = tofu_summary({"configs": rows})
    assert got["options"] == {"wf_Q_A_Prob_normalised": 0.5, "wf_Q_A_ROUGE": 1.0, "wf_Truth_Ratio": 0.6}
    assert got["plain"] == {"forget_truth_ratio": 0.25, "wf_Q_A_Prob": 0.9, "wf_Q_A_ROUGE": 1.0}


def test_the_mapping_is_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs/evaluation.md").read_text()
    section = doc.split("## Interoperable outputs")[1].split("\n## ")[0]
    for key, path in OPEN_UNLEARNING_KEYS:
        row = next((line for line in section.splitlines() if line.startswith(f"| `{key}`")), None)
        assert row is not None, key
        assert row.split("|")[2].strip() == f"`{'.'.join(path)}`", (key, row)
    for key in ("forget_Q_A_Prob", "extraction_strength", "privleak", "exact_memorization", "ra_Q_A_Prob"):
        assert f"`{key}`" in section, key
    for field in FIELDS:
        assert f"`{field}`" in section, field
