"""scripts/gpu-check.sh on a machine without CUDA: a dry run that lists the GPU steps it
would run, runs the CPU parts (kernels under Triton's interpreter, the quick logit-filter
benchmark), keeps to its time budget and writes its summary."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
GPU_STEPS = {"gpu-kernels", "gpu-kernel-bench", "gpu-steering", "gpu-serving"}


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    import sys

    env = {**os.environ, "PY": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_budget_cuts_steps(tmp_path):
    """A budget too small for any step: the GPU steps are still listed, the CPU steps are
    skipped rather than overrun, and the run says it failed."""
    r = _run("--quick", "--dry-run", "--budget", "25", "--out", str(tmp_path), timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    s = _summary(tmp_path)
    status = {row["step"]: row["status"] for row in s["steps"]}
    assert {k for k, v in status.items() if v == "would run"} >= GPU_STEPS
    assert status["kernels-interp"] == "skipped (budget)" and status["logits-bench"] == "skipped (budget)"
    assert not s["ok"] and s["mode"] == "dry-run"


@pytest.mark.slow  # about 40 s: the kernels under the interpreter and the quick logit benchmark
def test_dry_run_on_cpu(tmp_path):
    if _has_cuda():
        pytest.skip("a CUDA machine runs the real check")
    r = _run("--quick", "--dry-run", "--out", str(tmp_path), timeout=400)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    for step in GPU_STEPS:
        assert f"would run {step}" in r.stdout
    s = _summary(tmp_path)
    status = {row["step"]: row["status"] for row in s["steps"]}
    assert {k for k, v in status.items() if v == "would run"} >= GPU_STEPS | {"demo"}
    assert status["kernels-interp"] == "ok" and status["logits-bench"] == "ok"
    assert s["ok"] and s["mode"] == "dry-run" and s["wall_s"] < s["budget_s"]
    assert "dry run" in (tmp_path / "summary.md").read_text()
    logits = json.loads((tmp_path / "logits.json").read_text())
    assert logits["meta"]["quick"] and logits["cases"]
    assert (tmp_path / "env.json").exists() and not json.loads((tmp_path / "env.json").read_text())["cuda"]


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
