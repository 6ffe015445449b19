"""`guardserve bench`: the Markdown renderers over the committed results, README's
generated section, the command line, and (slow) one quick serving benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from guardserve.benchmarks import cli as bench_cli
from guardserve.benchmarks import report
from guardserve.benchmarks.cli import BENCHES, default_out, find_repo, repo_root
from guardserve.cli import UsageError
from guardserve.server.process import run_group

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _load(name: str) -> dict:
    """A committed result: the full run's, else the quick one's."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        path = RESULTS / "quick" / f"{name}.json"
    return json.loads(path.read_text())


def test_logits_renderer_has_headline_ratios():
    d = _load("logits")
    md = report.render_logits(d).markdown()
    sizes = sorted({c["sequences"] for c in d["cases"]})
    hi = [c["ratio_vs_vllm"] for c in d["cases"] if c["sequences"] == sizes[-1]]
    assert "Speed-up over vLLM `bad_words`" in md
    assert f"{report._x(min(hi))}–{report._x(max(hi))}×" in md
    # every case is a row of the table
    assert md.count("\n| mistral-") == len(d["cases"])


def test_detection_renderer_has_latency_ratio_per_scale():
    d = _load("detection")
    runs = sorted(d["runs"], key=lambda r: r["targets"])
    md = report.render_detection(d).markdown()
    lat = [r["latency_ms"] for r in runs]
    ratio = lat[-1]["p50"] / lat[0]["p50"]
    assert (f"p50 latency per conversation at {runs[-1]['targets']:,} targets ÷ at "
            f"{runs[0]['targets']:,}: {ratio:.2f}×") in md
    for r in runs:
        assert f"| {r['targets']:,} |" in md
    peer = runs[-1]["peer"]  # the float32 reader, measured in the same run
    speedup = runs[-1]["latency_ms"]["p50"] / peer["latency_ms"]["p50"]
    assert f"the {d['embedder_backend']} reader ÷ the {peer['embedder_backend']} reader: p50 {speedup:.2f}×" in md


def test_steering_renderer_has_forget_drop():
    d = _load("steering")
    md = report.render_steering(d).markdown()
    row = d["steering"][0]
    assert report._pct(row["forget_drop_relative"]) + " relative drop" in md
    assert ("TPOT" in md) == bool(d.get("tpot"))


def test_serving_renderer_has_guarded_over_plain_ratios():
    d = _load("serving")
    sec = report.render_serving(d)
    md = sec.markdown()
    for r in d["ratios"]:
        expected = f"c={r['concurrency']}: TTFT p50 {report._x(r['ttft_p50'])}×"
        if r["tpot_p50"] is not None:
            expected += f", TPOT p50 {report._x(r['tpot_p50'])}×"
        assert expected in md
    assert sec.key[0].startswith("Guarded ÷ plain vLLM, no target triggered")


def test_steering_renderer_reads_vllm_tpot():
    d = _load("steering")
    cell = {"off": {"tpot_ms": 2.0, "tokens_per_s": 400}, "unsteered": {"tpot_ms": 2.5, "tokens_per_s": 320},
            "steered": {"tpot_ms": 3.0, "tokens_per_s": 270}}
    d["tpot"] = {"requests": 32, "baseline": "off", **cell, "by_concurrency": {"32": cell}}
    md = report.render_steering(d).markdown()
    assert "TPOT every request steered ÷ none flagged 1.20× (2.50 → 3.00 ms); steering on but unused ÷ `off` 1.25×" in md
    assert "| 32 | steered | 3.00 | 270 |" in md


@pytest.mark.parametrize("name", ["load", "load_bulk", "unlearn", "unlearn_gu"])
def test_other_renderers(name):
    d = _load(name)
    md = report.RENDERERS[name](d).markdown()
    if name.startswith("load"):
        assert f"{d['leaks']} leaks" in md and f"{d['requests']:,} requests" in md
    else:
        assert "Meet the issue's bar" in md and "| method |" in md


def test_report_has_a_section_per_result_and_names_failures():
    results = report.load_results(RESULTS)
    md = report.render_report(results, failed={"serving": "exit status 1"})
    assert md.count("\n## ") == len(results)
    assert "**serving failed in this run**: exit status 1" in md


README_SAMPLE = (
    "# title\n\nintro ünïcode\n\n## Performance\n\n"
    f"{report.README_BEGIN}\nold generated text\n{report.README_END}\n\n## Layout\n\nrest\r\nwith CRLF\n"
)


def test_marker_replacement_is_idempotent_and_keeps_the_rest():
    body = report.render_readme_section(report.load_results(RESULTS))
    once = report.replace_between_markers(README_SAMPLE, body)
    twice = report.replace_between_markers(once, body)
    assert once == twice
    head, tail = README_SAMPLE.split(report.README_BEGIN)[0], README_SAMPLE.split(report.README_END)[1]
    assert once.startswith(head + report.README_BEGIN + "\n")
    assert once.endswith(report.README_END + tail)
    assert "old generated text" not in once and body.strip() in once


def test_marker_replacement_needs_both_markers_once():
    with pytest.raises(ValueError):
        report.replace_between_markers("no markers here\n", "x")
    with pytest.raises(ValueError):
        report.replace_between_markers(f"{report.README_END}\n{report.README_BEGIN}\n", "x")
    with pytest.raises(ValueError):
        report.replace_between_markers(README_SAMPLE + README_SAMPLE, "x")


def test_update_readme_writes_only_when_changed(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_bytes(README_SAMPLE.encode())
    assert report.update_readme(readme, "new body")
    first = readme.read_bytes()
    assert not report.update_readme(readme, "new body")
    assert readme.read_bytes() == first
    assert first.endswith(b"rest\r\nwith CRLF\n")


def test_repo_readme_has_the_markers_once():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.count(report.README_BEGIN) == 1 and text.count(report.README_END) == 1
    assert text.index(report.README_BEGIN) < text.index(report.README_END)


def _guardserve(*args, env=None):
    """``guardserve ARGS`` in a process group of its own, stopped with what it started on a timeout."""
    return run_group([sys.executable, "-m", "guardserve", *args], timeout=120, env=env, cwd=ROOT)


def test_bench_help():
    r = _guardserve("bench", "--help")
    assert r.returncode == 0
    for flag in ("--quick", "--only", "--out", "--no-readme"):
        assert flag in r.stdout
    assert "bench" in _guardserve("--help").stdout


def test_no_checkout_is_one_line_error(tmp_path):
    (tmp_path / "guardserve").mkdir()
    assert repo_root(tmp_path / "guardserve") is None
    with pytest.raises(UsageError, match="no guardserve source checkout around the package.*--out"):
        find_repo(package_dir=tmp_path / "guardserve")
    assert find_repo(package_dir=tmp_path / "guardserve", required=False) is None
    r = _guardserve("bench", "--repo", str(tmp_path / "nowhere"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("guardserve bench: error:")


def test_benchmarks_are_modules_and_results_go_to_the_checkout():
    import importlib.util

    assert repo_root() == find_repo() == ROOT
    assert default_out("logits.json") == str(RESULTS / "logits.json")
    for module, _, _ in BENCHES.values():
        assert module.startswith("guardserve.benchmarks.") and importlib.util.find_spec(module) is not None
    assert not list((ROOT / "bench").glob("*.py")), "bench/ holds results only; benchmarks are guardserve.benchmarks.*"


def test_unknown_benchmark_is_rejected():
    r = _guardserve("bench", "--only", "logits,nope", "--no-readme")
    assert r.returncode == 2 and "nope" in r.stderr


def test_report_only_renders_from_existing_json(tmp_path):
    for name in ("logits", "detection"):
        (tmp_path / f"{name}.json").write_text((RESULTS / f"{name}.json").read_text())
    r = _guardserve("bench", "--report-only", "--out", str(tmp_path), "--no-readme")
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "REPORT.md").read_text()
    assert "## Logit filter" in md and "## Detection" in md and "## Serving" not in md


def test_a_failing_benchmark_is_reported_and_the_others_run(tmp_path, monkeypatch, capsys):
    """Stand-in modules (on the children's PYTHONPATH) replace two benchmarks; each still runs
    as `python -m MODULE` in a child process."""
    from guardserve.cli import main

    fake = tmp_path / "fake"
    fake.mkdir()
    ok = ("import argparse, json, shutil, sys\n"
          "ap = argparse.ArgumentParser(); ap.add_argument('--out'); a, _ = ap.parse_known_args()\n"
          f"shutil.copy({str(RESULTS / 'logits.json')!r}, a.out)\n")
    (fake / "fake_bench_logits.py").write_text(ok)
    (fake / "fake_bench_detection.py").write_text("import sys\nprint('detection broke here', file=sys.stderr)\nsys.exit(3)\n")
    monkeypatch.setitem(bench_cli.BENCHES, "logits", ("fake_bench_logits", [], []))
    monkeypatch.setitem(bench_cli.BENCHES, "detection", ("fake_bench_detection", [], []))
    monkeypatch.setenv("PYTHONPATH", str(fake))
    rc = main(["bench", "--only", "detection,logits", "--out", str(tmp_path / "out"), "--no-readme"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "detection: FAILED" in err and "detection broke here" in err
    assert "logits: python -m fake_bench_logits" in out and "logits: done" in out
    md = (tmp_path / "out" / "REPORT.md").read_text()
    assert "**detection failed in this run**" in md and "## Logit filter" in md


# Sized for a fresh, loaded 2-core machine: the benchmark starts plain vLLM, then a guarded
# server (up to 420 s each to get healthy there, about 1 min each when idle), and sends its
# requests. The demo is built before the session's first test (conftest.py), never in here.
SERVING_TIMEOUT_S = 1200
SERVING_GRACE_S = 150  # on a timeout, time for its `finally` to stop the server it runs (60 s each)


@pytest.mark.slow
@pytest.mark.timeout(SERVING_TIMEOUT_S + SERVING_GRACE_S + 120)
def test_serving_benchmark_quick(tmp_path, demo):
    """Starts plain vLLM, then a guarded server, on the demo model (about 2-4 min), in a
    process group of its own that is stopped, servers included, however the test ends."""
    out = tmp_path / "serving.json"
    argv = [sys.executable, "-m", "guardserve.benchmarks.serving", "--quick", "--requests", "8", "--out", str(out)]
    try:
        r = run_group(argv, timeout=SERVING_TIMEOUT_S, grace=SERVING_GRACE_S, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"guardserve.benchmarks.serving ran past {SERVING_TIMEOUT_S} s (stopped):\n{(e.stdout or '')[-3000:]}\n"
                    f"{(e.stderr or '')[-3000:]}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not r.leftovers, f"guardserve.benchmarks.serving left processes running (killed): {r.leftovers}"
    d = json.loads(out.read_text())
    cells = {(c["server"], c["set"], c["concurrency"]): c for c in d["cells"]}
    assert all(c["errors"] == 0 for c in cells.values())
    # the guard worked: no guarded forget answer states its fact; retain answers are unharmed
    assert cells[("guarded", "forget", 1)]["answer_accuracy"] == 0
    assert cells[("guarded", "retain", 1)]["answer_accuracy"] >= 0.9
    assert {r["set"] for r in d["ratios"]} == {"retain", "forget", "forget_first", "forget_vs_icul"}
    # plain vLLM's ICUL set is the prompt the guarded engine saw, not a lookalike
    for c in (1, 8):
        guarded, icul = cells[("guarded", "forget", c)], cells[("plain", "forget_icul", c)]
        assert abs(icul["prompt_tokens_mean"] / guarded["prompt_tokens_mean"] - 1) < 0.02, (guarded, icul)
        assert icul["prompt_tokens_mean"] > 5 * cells[("plain", "forget", c)]["prompt_tokens_mean"]
    assert all(r["ttft_p50"] for r in d["ratios"])
    assert all(r["tpot_p50"] for r in d["ratios"] if r["set"] != "forget_first")  # one-token answers only there
    assert "Guarded ÷ plain vLLM" in report.render_serving(d).markdown()
