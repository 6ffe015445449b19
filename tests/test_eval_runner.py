"""`guardserve eval`: the report, the command's errors, and real runs on the demo model
(the demo world, and the same data brought as TOFU-format files)."""

from __future__ import annotations

import json

import pytest

from guardserve.cli import main
from guardserve.eval import report
from guardserve.eval.report import markdown, pareto_front, write
from guardserve.eval.runner import known_config

DESIGN_KEYS = {"forget_accuracy", "paraphrase_accuracy", "retain_accuracy", "world_accuracy", "leak_rate",
               "rougeL_recall_forget", "forget_quality", "model_utility", "ttft_ms", "tpot_ms"}


def test_pareto_front_keeps_the_undominated():
    pts = {"none": (0.2, 1.0), "token": (1.0, 1.0), "icul": (0.5, 0.3), "sae": (0.6, 0.9), "worse": (0.5, 0.8)}
    assert pareto_front(pts) == ["token"]
    pts["keeps"] = (1.0, 0.95)
    pts["token"] = (0.9, 1.0)
    assert pareto_front(pts) == ["token", "keeps"]


def test_report_files(tmp_path):
    results = {"configs": {
        "none": {"forget_accuracy": 1.0, "leak_rate": 0.8, "retain_accuracy": 1.0, "tpot_ms": 10.0, "ttft_ms": 15.0,
                 "leak_by_kind": {"direct": 1.0, "spell": 0.25}},
        "guard": {"forget_accuracy": 0.0, "leak_rate": 0.0, "retain_accuracy": 0.99, "tpot_ms": 11.0, "ttft_ms": 30.0,
                  "leak_by_kind": {"direct": 0.0, "spell": 0.0}, "forget_quality": None},
    }, "meta": {"dataset": "demo", "model": "m", "forget_probes": {"spell": 4}, "latency": {}}}
    md = markdown(results)
    assert "| `guard` | 0.0% |" in md and "| spell | 25.0% | 0.0% |" in md
    paths = write(results, tmp_path)
    assert {p.name for p in paths} == {"results.json", "report.md", "pareto.png", "latency.png"}
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "Pareto front" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("folder", ["demo", "sp32k"])
def test_readme_table_is_generated_from_the_committed_results(folder):
    """README's evaluation tables, one per demo model side by side, are the committed results."""
    from pathlib import Path

    from guardserve.readme import replace_between_markers

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    source = f"docs/eval/{folder}/results.json"
    results = json.loads((root / source).read_text())
    assert report.readme_markers(results)[0] == ("<!-- eval:begin -->" if folder == "demo" else f"<!-- eval-{folder}:begin -->")
    expected = replace_between_markers(readme, report.readme_section(results, source), *report.readme_markers(results))
    assert readme == expected, f"run: python -m guardserve.eval.report docs/eval/{folder} --readme README.md"


def test_report_command_rewrites_the_readme_table(tmp_path):
    results = {"configs": {"none": {"forget_accuracy": 1.0, "model_utility": 0.8, "ttft_ms": 5.0, "tpot_ms": 2.0},
                           "token": {"forget_accuracy": 0.0, "model_utility": None, "ttft_ms": 6.0, "tpot_ms": 2.2,
                                     "not_applicable": {"model_utility": "the filter bans the answers"}}},
               "meta": {"forget_items": 2, "forget_probes": {"spell": 4}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{report.README_BEGIN}\nold\n{report.README_END}\nrest\n")
    assert report.main([str(tmp_path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{report.README_END}\nrest\n")
    assert "| `token` | 0.0% |" in text and "n/a [1]" in text and "leak rate (8 probes)" in text
    assert "[1] n/a: the filter bans the answers (`token` model utility)." in text
    assert "1.20×" in text  # TTFT against `none`, measured in the same run
    assert not report.update_readme(readme, results, str(tmp_path / "results.json"))  # unchanged the second time


def test_config_names():
    assert all(known_config(c) for c in ("none", "icul", "token", "token+semantic", "guard", "sae", "full",
                                         "adapter:SimNPO"))
    assert not any(known_config(c) for c in ("adapter:", "tokens", ""))


@pytest.mark.parametrize("argv, message", [
    (["--configs", "none,bogus"], "unknown configuration(s) bogus"),
    (["--tofu", "/nonexistent"], "--tofu needs --model"),
    (["--configs", "adapter:SimNPO", "--adapters", "/nonexistent"], "no adapter for adapter:SimNPO"),
    (["--configs", "adapter:Mine", "--adapters", "/nonexistent"], "name a PEFT adapter folder inside --adapters"),
    (["--targets", "x.json"], "--targets goes with --tofu"),
    (["--model", "/nonexistent", "--tofu", "/nonexistent"], "no such directory"),
    (["--sae", "/nonexistent"], "no cfg.json there"),
    (["--quant-bits", "8,x"], "--quant-bits 8,x: give bit widths between 2 and 16"),
    (["--sequential-adapter", "Forgetful"], "--sequential-adapter Forgetful: not a method"),
    (["--sequential-adapter", "SimNPO", "--sequential-requests", "500"], "--sequential-requests 500: between 1 and"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(["eval", "--out", "/tmp/unused", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def _quick_adapter(demo, world, out):
    """A GradAscent adapter from a few steps on the forget split: enough to move the
    answers, small enough for seconds of training."""
    from guardserve.unlearn import UnlearnConfig, Unlearner, get_method

    method = get_method("GradAscent")
    cfg = UnlearnConfig(**{**method.default_config, "batch_size": 16, "probe_size": 40, "eval_every": 5,
                           "max_steps": 15})
    Unlearner(method, cfg, progress=False).run(demo.model, world["forget"], world["retain"][:200]).save(out)
    return str(out)


@pytest.mark.slow
def test_eval_on_demo(demo, world, tmp_path):
    from guardserve.eval.data import from_demo
    from guardserve.eval.report import markdown
    from guardserve.eval.runner import Settings, run

    adapter = _quick_adapter(demo, world, tmp_path / "GradAscent")
    settings = Settings(model=str(demo.model), data=from_demo(world),
                        configs=["none", "token", "guard", "adapter:GradAscent"], adapters={"GradAscent": adapter},
                        retain_model=str(demo.retain_model), entities=world["entities"], probes_per_kind=2,
                        forget_limit=48, retain_limit=40, latency_requests=2, latency_tokens=8, workdir=str(tmp_path / "work"),
                        sequential_steps=(10, 40), progress=False)
    results = run(settings, log=lambda m: None)
    res = results["configs"]
    for name in ("none", "token", "guard", "adapter:GradAscent"):
        assert DESIGN_KEYS <= set(res[name]), name
    # The adapter row carries its training time and the quantization attack: the merged
    # model answers as the served adapter does, and 8-bit rounding barely moves a model
    # whose weights span a few hundred steps per channel.
    none, guard = res["none"], res["guard"]
    ga = res["adapter:GradAscent"]
    q = ga["quantization"]
    assert ga["train_seconds"] > 0 and q["base_forget_accuracy"] > 0.9
    assert abs(q["forget_accuracy_merged"] - ga["forget_accuracy"]) <= 0.1, (q, ga["forget_accuracy"])
    assert abs(q["forget_accuracy_8bit"] - q["forget_accuracy_merged"]) <= 0.1, q
    assert 0 <= q["forget_accuracy_4bit"] <= 1
    # The relearning attack: the merged adapter fine-tuned on every 4th forget row (of the 48
    # scored here) and asked the others again; the retain model's run is the floor.
    rl, ref = ga["relearn"], results["meta"]["relearn"]["retain_model"]
    assert rl["relearn_rows"] == 12 and rl["test_rows"] == 36 and 0 <= rl["forget_accuracy_before"] <= 1
    assert ref["forget_accuracy_before"] <= 0.1 and "relearn" not in res["none"]
    # Membership inference: the bare model tells its forget biographies from held-out ones; the
    # guard refuses to score every forget text; the retain model is the reference.
    assert min(none["mia"].values()) > 0.8 and max(results["meta"]["mia"]["retain_model_auc"].values()) < 0.8
    assert guard["mia"] is None and guard["mia_refused"]["members"] == 1.0 and "mia" in guard["not_applicable"]
    assert res["token"]["mia_refused"] == {"members": 1.0, "nonmembers": 1.0}
    # Sequential deletions through `guard`: 10 forget people, then all 20 and 20 made-up ones.
    first, last = results["sequential"]["steps"]
    assert (first["targets"], last["targets"]) == (10, 40) and last["pending_forget_accuracy"] is None
    assert first["forget_accuracy"] <= 0.05 and first["pending_forget_accuracy"] > 0.9, first
    assert last["forget_accuracy"] <= 0.05 and last["retain_accuracy"] >= 0.95 * first["retain_accuracy"], last
    # Overlap: a forget person and another fact in one question; the guard withholds the first.
    assert none["overlap"]["queries"] == 80 and none["overlap"]["forget_half_leak"] > 0.2
    assert guard["overlap"]["forget_half_leak"] <= 0.05 and guard["overlap"]["retain_half_accuracy_ratio"] is not None
    assert "| `adapter:GradAscent` |" in markdown(results).split("Adapters:")[1]
    assert "quantization" not in res["none"]
    # Filtering forget answers must not make the model babble on retain questions.
    assert none["fluency_retain"] > 1 and res["token"]["fluency_retain"] >= 0.9 * none["fluency_retain"]
    assert none["forget_accuracy"] > 0.9 and none["leak_rate"] > 0.5
    assert none["facts_stated_forget"] > 0.9
    for name in ("token", "guard"):
        assert res[name]["forget_accuracy"] <= 0.05 and res[name]["leak_rate"] < 0.1, name
        assert res[name]["facts_stated_forget"] <= 0.05, name
        assert res[name]["retain_accuracy"] >= 0.95 * none["retain_accuracy"], name
    assert guard["detect_ms"] is not None and none["detect_ms"] is None
    assert 0 <= none["forget_quality"] <= 1 and none["model_utility"] > 0
    assert {"direct", "paraphrase", "spell", "multi_turn", "many_shot", "base64"} <= set(none["leak_by_kind"])


@pytest.mark.slow
def test_eval_brings_its_own_tofu_data(demo, world, tmp_path, capsys):
    """The same facts as TOFU-format files (no short values: an answer counts as correct at
    ROUGE-L recall >= 0.5) with a local model and a targets file: the command runs end to end
    and the token guard forgets: the facts the targets file registers no longer come out.
    (Without facts in the targets the filter knows only the names, and the facts still come
    out: see docs/evaluation.md.)"""
    tofu = tmp_path / "tofu"
    tofu.mkdir()
    keep = ("question", "answer", "paraphrased_question", "perturbed_answer")
    rows = lambda items: [{k: it[k] for k in keep} for it in items]  # noqa: E731
    (tofu / "forget01_perturbed.json").write_text(json.dumps(rows(world["forget"][:24])))
    (tofu / "retain_perturbed.json").write_text(json.dumps(rows(world["retain"][:24])))
    (tofu / "world_facts_perturbed.json").write_text("\n".join(json.dumps(r) for r in rows(world["world_facts"][10:20])))
    # Real authors, as TOFU ships them (here world facts the model knows stand in for them).
    (tofu / "real_authors_perturbed.json").write_text(json.dumps(rows(world["world_facts"][:10])))
    people = {it["entity"] for it in world["forget"][:24]}
    targets = [{"name": e["name"], "aliases": e["aliases"], "facts": e["facts"]} for e in world["entities"]
               if e["name"] in people]
    (tmp_path / "targets.json").write_text(json.dumps(targets))
    out = tmp_path / "out"
    assert main(["eval", "--model", str(demo.model), "--tofu", str(tofu), "--configs", "none,token",
                 "--targets", str(tmp_path / "targets.json"),
                 "--retain-limit", "24", "--quick", "--no-progress", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["dataset"].startswith("tofu")
    none, token = res["configs"]["none"], res["configs"]["token"]
    # forget_accuracy cannot show the filter on these items: ROUGE-L recall >= 0.5 is reached
    # by the template words and the first name of a one-sentence answer whatever its fact
    # ("Gygreim Baeci works as a potter." against "Gygreim Houtus works as a sculptor.": 0.67),
    # so both rows score 100% although the token rows state none of the facts. The checks are
    # on the facts themselves (facts_stated_forget: the targets file's fact values looked for in
    # the answers) and on the recall.
    assert none["forget_accuracy"] > 0.8 and none["facts_stated_forget"] > 0.9, none
    assert token["facts_stated_forget"] <= 0.05, (none, token)
    assert token["rougeL_recall_forget"] < 0.8 * none["rougeL_recall_forget"], (none, token)
    assert token["retain_accuracy"] >= 0.95 * none["retain_accuracy"]
    assert (out / "report.md").is_file() and (out / "pareto.png").is_file()
    # TOFU's model utility has all nine terms where the data has them, the real authors' included.
    assert res["meta"]["real_author_items"] == 10 and none["real_authors_accuracy"] > 0.8
    assert len(none["utility"]) == 9 and none["model_utility"] is not None
    summary = json.loads((out / "TOFU_SUMMARY.json").read_text())["none"]
    assert {"ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio"} <= set(summary)
    # Again into the same folder (its work folder still holds the first run's targets):
    # the run starts from its own targets and replaces the report.
    (out / "report.md").unlink()
    assert main(["eval", "--model", str(demo.model), "--tofu", str(tofu), "--configs", "token",
                 "--targets", str(tmp_path / "targets.json"), "--probes-per-kind", "1",
                 "--retain-limit", "8", "--quick", "--no-progress", "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())["configs"]
    assert list(again) == ["token"] and again["token"]["forget_accuracy"] == token["forget_accuracy"]
    assert again["token"]["facts_stated_forget"] == token["facts_stated_forget"]
    assert (out / "report.md").is_file()


def test_p_values_keep_their_magnitude_when_rounded():
    """Forget quality is a KS p-value: rounded to 4 decimals, a method far from the retain model
    (1e-95) and one merely unlike it (1e-5) would both read 0."""
    from guardserve.eval.runner import _rounded

    assert _rounded("forget_quality", 2.1009e-95) == 2.1e-95 and _rounded("forget_quality", 0.51234) == 0.512
    assert _rounded("retain_accuracy", 0.123456) == 0.1235
