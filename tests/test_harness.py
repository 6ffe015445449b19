"""The test harness itself: ``skip_or_fail`` and the end-of-session check that fails a
run leaving processes behind (run on a throw-away test folder with this conftest)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import skip_or_fail

from guardserve.server.process import _info

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("ci", ["", "true"])
def test_skip_or_fail(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(expected, match="no frobnicator"):
        skip_or_fail("no frobnicator")


LEAKY = textwrap.dedent('''\
    import os, subprocess, sys, time

    SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]


    def test_leaks_a_server_in_its_own_session(tmp_path):
        p = subprocess.Popen(SLEEP, start_new_session=True)
        open(os.environ["PIDS"], "a").write(f"{p.pid}\\n")


    def test_leaks_a_child_with_a_clean_environment():
        p = subprocess.Popen(SLEEP, env={"PATH": os.environ["PATH"]})  # no session tag: found as a child
        open(os.environ["PIDS"], "a").write(f"{p.pid}\\n")
''')

CLEAN = textwrap.dedent('''\
    import subprocess, sys


    def test_waits_for_its_child():
        subprocess.run([sys.executable, "-c", "pass"], check=True)
''')


def _session(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_it.py").write_text(body)
    env = {**os.environ, "PIDS": str(tmp_path / "pids"), "GUARDSERVE_TEST_SETTLE_S": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_session_that_leaves_processes_running_fails_and_kills_them(tmp_path):
    r = _session(tmp_path, LEAKY)
    pids = [int(x) for x in (tmp_path / "pids").read_text().split()]
    out = r.stdout + r.stderr
    assert len(pids) == 2 and "2 passed" in out
    assert r.returncode == 1, out
    assert "processes left running" in out and "2 process(es) started by the tests" in out
    for pid in pids:
        assert f"pid {pid} " in out
    time.sleep(0.2)
    assert not any(_info(pid) for pid in pids)


def test_a_clean_session_passes(tmp_path):
    r = _session(tmp_path, CLEAN)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "processes left running" not in r.stdout


# A plugin (loaded with -p before the conftest's hooks run) that stands in for the demo build.
FAKE_DEMO = textwrap.dedent('''\
    import os

    import guardserve.demo


    def ensure_demo(*a, **kw):
        with open(os.environ["LOG"], "a") as f:
            f.write("build\\n")
        if os.environ.get("BUILD_FAILS"):
            raise RuntimeError("out of disk")
        return "the demo"


    guardserve.demo.ensure_demo = ensure_demo
''')

USES_DEMO = textwrap.dedent('''\
    import os


    def _log(what):
        with open(os.environ["LOG"], "a") as f:
            f.write(what + "\\n")


    def test_a_first_without_demo():
        _log("test without demo")


    def test_b_with_demo(demo):
        _log(f"test with {demo}")
''')


def _demo_session(tmp_path: Path, *args: str, fails: bool = False) -> tuple[subprocess.CompletedProcess, list[str]]:
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "fakedemo.py").write_text(FAKE_DEMO)
    (tmp_path / "test_it.py").write_text(USES_DEMO)
    log = tmp_path / "log"
    env = {**os.environ, "LOG": str(log), "PYTHONPATH": str(tmp_path), "BUILD_FAILS": "1" if fails else ""}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "fakedemo", *args,
                        str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return r, log.read_text().splitlines() if log.is_file() else []


def test_the_demo_is_built_before_the_first_test_when_one_needs_it(tmp_path):
    r, log = _demo_session(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    # built before any test ran, the one not needing it included; the fixture finds it built
    assert log == ["build", "test without demo", "build", "test with the demo"]


def test_the_demo_is_not_built_when_no_selected_test_needs_it(tmp_path):
    r, log = _demo_session(tmp_path, "-k", "without")
    assert r.returncode == 0, r.stdout + r.stderr
    assert log == ["test without demo"]


def test_a_failed_demo_build_fails_the_tests_that_need_it(tmp_path):
    r, log = _demo_session(tmp_path, fails=True)
    assert r.returncode == 1
    assert log == ["build", "test without demo"]  # the fixture does not build again
    assert "the demo build failed before the tests: RuntimeError: out of disk" in r.stdout
    assert "1 passed" in r.stdout and "1 error" in r.stdout
