"""``guardserve eval detect`` end to end (lexical matcher only, to stay fast; the
embedding retriever is exercised in tests/detector/ and the benchmark)."""

from __future__ import annotations

import json

import pytest

from guardserve.cli import main
from guardserve.probes import DETECTION_KINDS


def test_eval_detect_writes_report(tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["eval", "detect", "--targets", "4", "--no-embeddings", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "recall, forget questions" in printed
    rep = json.loads((out / "detect.json").read_text())
    assert rep["targets"] == 4 and rep["world_targets"] == 4 and rep["embeddings"] is False
    assert set(rep["sets"]) >= {"forget", "paraphrase", "retain", "world_facts"} | {f"adv:{t}" for t in DETECTION_KINDS}
    s = rep["summary"]
    assert s["forget_recall"] >= 0.98 and s["paraphrase_recall"] >= 0.98 and s["adversarial_recall"] >= 0.9
    assert s["retain_fp_rate"] <= 0.01
    assert rep["latency_ms"]["p50"] > 0 and (out / "detect.md").read_text().startswith("Detection on the demo world")


def test_eval_help_names_the_suites(capsys):
    # `guardserve eval` alone runs the whole evaluation (tests/test_eval_runner.py); detect is its subcommand.
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "detect" in out and "token+semantic" in out and "--tofu" in out
