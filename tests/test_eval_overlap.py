"""Overlapping forget and retain questions (guardserve.eval.overlap): how they are built and
scored on both halves."""

from __future__ import annotations

import pytest

from guardserve.eval.overlap import build_queries, score
from guardserve.eval.report import markdown
from guardserve.eval.runner import _overlap_ratios


def _it(entity, attribute, question, value):
    return {"entity": entity, "attribute": attribute, "question": question, "value": value}


FORGET = [_it("Ada", "birth_place", "Where was Ada born?", "Verity"),
          _it("Ada", "occupation", "What does Ada do?", "potter"),
          _it("Cy", "birth_place", "Where was Cy born?", "Quorn")]
RETAIN = [_it("Bo", "birth_place", "Where was Bo born?", "Lisbon"), _it("Bo", "occupation", "What does Bo do?", "baker")]
WORLD = [_it("France", "capital", "What is the capital of France?", "Paris")]


def test_each_forget_item_is_asked_with_another_in_both_orders():
    qs = build_queries(FORGET, RETAIN, WORLD, n=10)
    assert len(qs) == 6
    assert qs[0].question == "Where was Bo born? Where was Ada born?" and qs[1].question == "Where was Ada born? Where was Bo born?"
    assert (qs[0].forget_value, qs[0].other_value, qs[0].other) == ("Verity", "Lisbon", "retain")
    assert qs[2].other_value == "baker"                           # the same attribute
    assert qs[4].other == "world" and qs[4].other_value == "Paris"  # every third: a world fact
    assert build_queries(FORGET, [], [], n=10) == [] and len(build_queries(FORGET, RETAIN, WORLD, n=1)) == 2
    assert build_queries([{**FORGET[0], "value": ""}], RETAIN, WORLD) == []


def test_both_halves_are_scored_and_compared_with_unguarded():
    qs = build_queries(FORGET, RETAIN, WORLD, n=10)
    unguarded = score(["Ada was born in Verity.", "Bo was born in Lisbon.", "Ada is a potter.", "Ada is a potter.",
                       "Paris.", "Cy was born in Quorn."], qs)
    guarded = score(["Bo was born in Lisbon.", "I cannot say.", "Bo is a baker.", None, "Paris.", "Paris."], qs)
    assert unguarded["forget_half_leak"] == round(4 / 6, 4) and unguarded["retain_half_accuracy"] == round(2 / 6, 4)
    assert guarded["queries"] == 5 and guarded["forget_half_leak"] == 0.0 and guarded["retain_half_accuracy"] == 0.8
    assert guarded["by_other"]["world"] == {"queries": 2, "forget_half_leak": 0.0, "other_half_accuracy": 1.0}
    results = {"meta": {}, "configs": {"none": {"overlap": unguarded}, "guard": {"overlap": guarded}}}
    _overlap_ratios(results["configs"])
    assert results["configs"]["guard"]["overlap"]["retain_half_accuracy_ratio"] == round(0.8 / round(2 / 6, 4), 4)
    md = markdown(results).split("Overlapping forget and retain")[1]
    assert "| `guard` | 0.0% | 80.0% | 240.0% |" in md


def test_sequential_deletions_schedule_real_targets_first_then_fillers(tmp_path):
    from guardserve.eval.report import markdown, plots
    from guardserve.eval.sequential import filler_targets, schedule

    real = [{"name": "Ada Verity", "aliases": ["Verity"], "facts": {"birth_place": "Quorn"}},
            {"name": "Bo Lisbon", "aliases": [], "facts": {}}]
    steps = schedule(real, [1, 3, 10])
    assert [len(s) for s in steps] == [1, 2, 7] and steps[0] == real[:1] and steps[1][0] == real[1]
    fillers = [t for s in steps for t in s][2:]
    names = [t["name"] for t in fillers]
    assert len(set(names)) == 8 and not {"Ada Verity", "Bo Lisbon"} & set(names)
    assert all(t["facts"] and t["aliases"] for t in fillers)
    assert filler_targets(5, seed=1) == filler_targets(5, seed=1) != filler_targets(5, seed=2)
    for bad in ([], [3, 2], [0, 5]):
        try:
            schedule(real, bad)
        except ValueError:
            continue
        raise AssertionError(bad)
    results = {"meta": {}, "configs": {"none": {}},
               "sequential": {"config": "guard", "steps": [
                   {"targets": 10, "forget_accuracy": 0.0, "pending_forget_accuracy": 1.0, "retain_accuracy": 1.0,
                    "world_accuracy": 1.0, "tpot_ms": 8.0, "ttft_ms": 20.0, "detect_ms": 3.0, "register_s": 0.5},
                   {"targets": 1000, "forget_accuracy": 0.0, "pending_forget_accuracy": None, "retain_accuracy": 0.98,
                    "world_accuracy": 1.0, "tpot_ms": 8.5, "ttft_ms": 25.0, "detect_ms": 4.0, "register_s": 30.0}]}}
    md = markdown(results).split("Sequential deletions")[1]
    assert "| 10 | 0.0% | 100.0% | 100.0% | 100.0% | 8.0 | 20.0 | 3.0 | 0.5 |" in md
    assert "| 1,000 | 0.0% | – | 98.0% |" in md
    assert tmp_path / "sequential.png" in plots(results, tmp_path) and (tmp_path / "sequential.png").stat().st_size > 0


def test_deletion_requests_split_people_and_keep_their_rows():
    from guardserve.eval.sequential import deletion_requests

    forget = [{"entity": e, "question": f"{e}?{i}", "value": "v"} for e in "ABCDE" for i in range(3)]
    requests = deletion_requests(forget, 2)
    assert [sorted({it["entity"] for it in r}) for r in requests] == [["A", "B"], ["C", "D", "E"]]
    assert sum(len(r) for r in requests) == len(forget)
    with pytest.raises(ValueError, match="between 1 and 5"):
        deletion_requests(forget, 6)


@pytest.mark.slow
def test_sequential_adapters_train_one_request_at_a_time_and_on_the_union(demo, world, tmp_path):
    """Two deletion requests of two forget people: after the second, the one-at-a-time adapter
    was trained on request 2 alone on the model request 1 left, the union one on both."""
    from guardserve.eval.sequential import deletion_requests, sequential_adapters
    from guardserve.unlearn import get_method

    people = list(dict.fromkeys(it["entity"] for it in world["forget"]))[:4]
    forget = [it for it in world["forget"] if it["entity"] in people]
    requests = deletion_requests(forget, 2)
    out = sequential_adapters(get_method("GradAscent"), demo.model, requests, world["retain"][:200],
                              world["world_facts"][:10], tmp_path, probe_retain=30, log=lambda *_: None,
                              overrides={"batch_size": 16, "probe_size": 20, "eval_every": 5, "max_steps": 15})
    assert out["method"] == "GradAscent" and [s["requests"] for s in out["steps"]] == [1, 2]
    assert [s["forget_rows"] for s in out["steps"]] == [len(requests[0]), len(forget)]
    for step in out["steps"]:
        for mode in ("sequential", "union"):
            r = step[mode]
            assert all(0.0 <= r[k] <= 1.0 for k in ("forget_accuracy", "retain_accuracy", "world_accuracy"))
            assert r["steps"] >= 1 and r["train_s"] > 0
    # Request 1 is the same training either way (the base model, the same rows and seed).
    first = out["steps"][0]
    assert first["sequential"]["forget_accuracy"] == first["union"]["forget_accuracy"]
    assert (tmp_path / "sequential-1-merged" / "config.json").is_file()   # request 2 started from it
    assert out["steps"][0]["union"]["forget_accuracy"] < 1.0, "15 steps of gradient ascent forget something"
    from guardserve.eval.report import sequential_adapters_markdown

    table = sequential_adapters_markdown({"sequential_adapters": out})
    assert "`GradAscent` adapters (2 requests" in table and f"| 2 | {len(forget)} |" in table
