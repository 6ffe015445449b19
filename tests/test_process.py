"""Child processes are stopped on every path: process groups (a grandchild too), a failed
or interrupted server start, run_group's timeout, interruption and leftovers. No vLLM:
tiny Python process trees stand in for the server and its EngineCore."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from guardserve.server import process as P

# tree.py PIDFILE CHILD PARENT: starts one child, writes "parent_pid child_pid" to PIDFILE.
#   CHILD: group (same process group, default signals), stubborn (same group, ignores
#          SIGINT and SIGTERM), detached (its own session, like a server started by a script)
#   PARENT: stay (sleeps until stopped) or exit (exits 0 at once, leaving the child)
TREE = textwrap.dedent('''\
    import os, signal, subprocess, sys, time
    # Dispositions set here, not inherited: whatever the test process's SIGINT is, the tree's is known.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    pidfile, child, parent = sys.argv[1:4]
    code = "import signal, sys, time\\nsignal.signal(signal.SIGINT, signal.SIG_DFL)\\n"
    if child == "stubborn":
        code += "signal.signal(signal.SIGINT, signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
    code += "open(sys.argv[1], 'w').close()\\ntime.sleep(600)\\n"
    c = subprocess.Popen([sys.executable, "-c", code, pidfile + ".child"], start_new_session=child == "detached")
    while not os.path.exists(pidfile + ".child"):  # the child's signal handlers are set (a loaded machine is slow)
        time.sleep(0.02)
    try:
        with open(pidfile + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {c.pid}")
        os.replace(pidfile + ".tmp", pidfile)
        print("started", flush=True)
        if parent == "stay":
            time.sleep(600)
    except KeyboardInterrupt:
        sys.exit(130)
''')


@pytest.fixture
def tree(tmp_path) -> Path:
    path = tmp_path / "tree.py"
    path.write_text(TREE)
    return path


def _pids(pidfile: Path, timeout: float = 30) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while not pidfile.is_file():
        assert time.monotonic() < deadline, "the process tree did not start"
        time.sleep(0.05)
    parent, child = pidfile.read_text().split()
    return int(parent), int(child)


def _alive(pid: int) -> bool:
    return P._info(pid) is not None


def _start_tree(tree: Path, pidfile: Path, child: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, str(tree), str(pidfile), child, "stay"], start_new_session=True,
                            stdout=subprocess.DEVNULL)
    return proc, _pids(pidfile)[1]


def test_stop_group_ends_a_well_behaved_group_with_sigint(tree, tmp_path):
    proc, child = _start_tree(tree, tmp_path / "pids", "group")
    assert _alive(child) and P._group_members(proc.pid)
    t0 = time.monotonic()
    assert P.stop_group(proc, grace=20) == 130  # its own KeyboardInterrupt handler: SIGINT reached it
    assert time.monotonic() - t0 < 10
    assert not _alive(child) and not P._group_members(proc.pid)


def test_stop_group_kills_a_grandchild_that_ignores_sigint(tree, tmp_path):
    proc, child = _start_tree(tree, tmp_path / "pids", "stubborn")
    t0 = time.monotonic()
    P.stop_group(proc, grace=1.5)
    assert time.monotonic() - t0 >= 1.5  # SIGINT did not end the child: it waited, then SIGKILL
    assert not _alive(child) and not P._group_members(proc.pid)
    P.stop_group(proc, grace=1)  # a second stop is harmless


def test_stop_group_after_the_leader_exited_still_ends_its_children(tree, tmp_path):
    proc = subprocess.Popen([sys.executable, str(tree), str(tmp_path / "pids"), "stubborn", "exit"],
                            start_new_session=True, stdout=subprocess.DEVNULL)
    _, child = _pids(tmp_path / "pids")
    proc.wait(30)
    assert _alive(child)  # orphaned, still in the group
    P.stop_group(proc, grace=1)
    assert not _alive(child)


def test_server_process_stop_ends_the_whole_group(tree, tmp_path):
    proc, child = _start_tree(tree, tmp_path / "pids", "stubborn")
    server = P.ServerProcess(proc, 0, tmp_path / "log")
    server.stop(timeout=1)
    assert proc.poll() is not None and not _alive(child)


def _fake_server(tree: Path, tmp_path: Path, child: str = "group") -> list[str]:
    """A "server" that starts a grandchild and never becomes healthy (``--port N`` is
    appended by start_server; tree.py ignores extra arguments)."""
    return [sys.executable, str(tree), str(tmp_path / "pids"), child, "stay"]


def test_start_server_stops_the_child_when_it_never_gets_healthy(tree, tmp_path):
    with pytest.raises(RuntimeError, match="not healthy after 3s"):
        P.start_server([], tmp_path / "server.log", timeout=3, command=_fake_server(tree, tmp_path))
    parent, child = _pids(tmp_path / "pids")
    assert not _alive(parent) and not _alive(child)


def test_start_server_stops_the_child_on_ctrl_c(tree, tmp_path, monkeypatch):
    import httpx

    def interrupted(*a, **kw):
        if (tmp_path / "pids").is_file():  # the grandchild exists: the case that matters
            raise KeyboardInterrupt
        raise httpx.ConnectError("not yet")

    monkeypatch.setattr(httpx, "get", interrupted)
    with pytest.raises(KeyboardInterrupt):
        P.start_server([], tmp_path / "server.log", timeout=60, command=_fake_server(tree, tmp_path))
    parent, child = _pids(tmp_path / "pids")
    assert not _alive(parent) and not _alive(child)


def test_start_server_reports_an_early_exit(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('bad flag'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match="server exited with 3") as e:
        P.start_server([], tmp_path / "server.log", timeout=30, command=cmd)
    assert "bad flag" in str(e.value)


def test_run_group_returns_output_and_status():
    r = P.run_group([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(4)"],
                    timeout=60)
    assert (r.returncode, r.stdout, r.stderr, r.leftovers) == (4, "out\n", "err\n", [])


def test_run_group_timeout_kills_its_group_and_what_escaped_it(tree, tmp_path):
    """The benchmark case: a script started a server in a session of its own, then hung."""
    argv = [sys.executable, str(tree), str(tmp_path / "pids"), "detached", "stay"]
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as e:
        P.run_group(argv, timeout=3, grace=2)
    assert time.monotonic() - t0 < 20
    parent, child = _pids(tmp_path / "pids")
    assert not _alive(parent) and not _alive(child)
    assert "started" in (e.value.stdout or "")


def test_run_group_lists_and_kills_what_a_finished_run_left_running(tree, tmp_path):
    argv = [sys.executable, str(tree), str(tmp_path / "pids"), "detached", "exit"]
    r = P.run_group(argv, timeout=60, settle=0.5)
    _, child = _pids(tmp_path / "pids")
    assert r.returncode == 0 and len(r.leftovers) == 1 and "time.sleep(600)" in r.leftovers[0]
    assert not _alive(child)


def test_run_group_cleans_up_when_interrupted(tree, tmp_path):
    """Ctrl-C (a real SIGINT to this thread) while the run is waited on."""
    argv = [sys.executable, str(tree), str(tmp_path / "pids"), "detached", "stay"]
    main = threading.main_thread().ident

    def interrupt_once_started():
        _pids(tmp_path / "pids")
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=interrupt_once_started, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        P.run_group(argv, timeout=120, grace=2)
    parent, child = _pids(tmp_path / "pids")
    assert not _alive(parent) and not _alive(child)


def test_tagged_and_descendants_find_a_re_parented_process(tree, tmp_path):
    import os

    argv = [sys.executable, str(tree), str(tmp_path / "pids"), "detached", "exit"]
    proc = subprocess.Popen(argv, env={**os.environ, "TAG_UNDER_TEST": "x1"}, stdout=subprocess.DEVNULL)
    _, child = _pids(tmp_path / "pids")
    proc.wait(30)
    try:
        assert [p.pid for p in P.tagged("TAG_UNDER_TEST", "x1")] == [child]
        assert child not in [p.pid for p in P.descendants(os.getpid())]  # re-parented: only the tag finds it
    finally:
        P.kill_processes(P.tagged("TAG_UNDER_TEST", "x1"))
    assert not _alive(child)
