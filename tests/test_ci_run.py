""".ci/run: each step timed on a `[ci] STEP: N s` line, `make test` last, the first failing
step ends the run with its status. A stand-in `make` on PATH records what it was asked."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CI_RUN = ROOT / ".ci" / "run"


def _run(tmp_path: Path, fail_on: str | None = None, ci: str | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir, log = tmp_path / "bin", tmp_path / "make.log"
    bin_dir.mkdir()
    (bin_dir / "make").write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$* CI=${{CI:-}}" >> {log}\n'
        f'[ "$1" != "{fail_on or "-"}" ] || exit 7\n')
    (bin_dir / "make").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    if ci is not None:
        env["CI"] = ci
    r = subprocess.run(["bash", str(CI_RUN)], capture_output=True, text=True, env=env, timeout=60)
    return r, log.read_text().splitlines() if log.is_file() else []


def test_every_step_is_timed_and_make_test_runs_last(tmp_path):
    r, calls = _run(tmp_path)
    assert r.returncode == 0, r.stderr
    assert calls == ["setup CI=1", "demo CI=1", "test CI=1"]
    steps = re.findall(r"^\[ci\] (setup|demo build|tests|total): \d+ s$", r.stdout, re.M)
    assert steps == ["setup", "demo build", "tests", "total"]


@pytest.mark.parametrize("target,step,ran", [("setup", "setup", 1), ("demo", "demo build", 2), ("test", "tests", 3)])
def test_a_failing_step_ends_the_run_with_its_status(tmp_path, target, step, ran):
    r, calls = _run(tmp_path, fail_on=target)
    assert r.returncode == 7
    assert len(calls) == ran
    assert re.search(rf"^\[ci\] {step}: \d+ s, FAILED \(exit status 7\)$", r.stderr, re.M)
    assert "[ci] total" not in r.stdout


def test_ci_set_by_the_caller_is_kept(tmp_path):
    _, calls = _run(tmp_path, ci="github")
    assert calls[-1] == "test CI=github"


def test_the_hook_finds_make_test():
    assert "make test" in CI_RUN.read_text()
