"""Child processes for tests, benchmarks and scripts, stopped on every path.

- ``start_server``: ``guardserve serve`` (or any server command) as a child in its own
  session, waited on until healthy; ``ServerProcess.stop()`` ends its whole process group
  (vLLM's EngineCore is a grandchild of the command started).
- ``run_group``: a command (a benchmark) in its own session with a deadline; on a timeout,
  an exception or Ctrl-C its whole group is stopped, and so is every process it started
  elsewhere (found by an environment tag), before the error propagates.
- ``processes`` / ``tagged`` / ``kill_processes``: what is running, read from /proc (Linux),
  for the test session's check that nothing it started outlives it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

# Set in the environment of every process run_group starts (and so of everything those
# start): a server that escaped into its own session is still found by it.
RUN_TAG = "GUARDSERVE_RUN_TAG"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class ProcInfo:
    """One live (not zombie) process, as /proc shows it."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    start: int  # clock ticks after boot: (pid, start) names one process, whatever reuses the pid
    cmdline: str


def _info(pid: int) -> ProcInfo | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
    fields = stat[stat.rindex(")") + 2:].split()  # fields 3... of proc(5)
    state, ppid, pgid, sid, start = fields[0], fields[1], fields[2], fields[3], fields[19]
    if state in ("Z", "X"):  # exited, not yet reaped: holds no resources but its pid
        return None
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    return ProcInfo(pid, int(ppid), int(pgid), int(sid), int(start), cmd or f"[{comm}]")


def processes() -> list[ProcInfo]:
    """Every live process but this one."""
    me = os.getpid()
    pids = (int(p) for p in os.listdir("/proc") if p.isdigit())
    return [i for i in map(_info, pids) if i is not None and i.pid != me]


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):  # gone, or another user's
        return False


def tagged(var: str, value: str) -> list[ProcInfo]:
    """Live processes (not this one) started with ``var=value`` in their environment.

    /proc/PID/environ is the environment a process was exec'd with (or inherited by fork),
    so children started with a copy of ``os.environ`` carry the tag wherever they run."""
    entry = f"{var}={value}".encode()
    return [p for p in processes() if _environ_has(p.pid, entry)]


def descendants(pid: int, procs: list[ProcInfo] | None = None) -> list[ProcInfo]:
    """Children, grandchildren... of ``pid`` (those not yet re-parented to init)."""
    procs = processes() if procs is None else procs
    children: dict[int, list[ProcInfo]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c.pid)
    return out


def kill_processes(procs: list[ProcInfo], grace: float = 5.0) -> None:
    """SIGTERM each, up to ``grace`` s for them to exit, then SIGKILL what is left."""
    def alive(p: ProcInfo) -> bool:
        i = _info(p.pid)
        return i is not None and i.start == p.start  # not a new process that reused the pid

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
                os.kill(p.pid, sig)
        deadline = time.monotonic() + grace
        while (procs := [p for p in procs if alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not procs:
            return


# --------------------------------------------------------------------------- process groups


def _group_members(pgid: int) -> list[ProcInfo]:
    return [p for p in processes() if p.pgid == pgid]


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is empty
        os.killpg(pgid, sig)


def stop_group(proc: subprocess.Popen, grace: float = 60) -> int:
    """End ``proc`` and every process of its process group; return ``proc``'s exit status.

    ``proc`` must lead its own group (started with ``start_new_session=True``). SIGINT goes
    to the whole group (what Ctrl-C in a terminal sends: vLLM's API server and EngineCore
    shut down cleanly), then up to ``grace`` s for all of them to exit, then SIGKILL to
    what is left of the group. Safe to call twice, and after ``proc`` exited by itself
    (its children may not have)."""
    pgid = proc.pid  # a pid is not reused while its group still has members
    if proc.poll() is not None and not _group_members(pgid):
        return proc.returncode  # all gone: the pid may be reused, so signal nothing
    deadline = time.monotonic() + grace
    _signal_group(pgid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):  # the group is checked below either way
        proc.wait(max(0.0, deadline - time.monotonic()))
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)
    proc.wait()  # SIGKILL cannot be ignored
    while _group_members(pgid) and time.monotonic() < deadline + 5:  # SIGKILLed members vanish at once
        time.sleep(0.05)
    return proc.returncode


class ServerProcess:
    """A server child on 127.0.0.1, leading its own process group."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.base_url = f"http://127.0.0.1:{port}"

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 60) -> int:
        """Ctrl-C to the server's whole process group, SIGKILL to it after ``timeout`` s;
        returns when no process of the group is left. Returns the server's exit status."""
        return stop_group(self.proc, timeout)


def start_server(args: list[str], log: Path, env: dict | None = None, timeout: float = 420,
                 command: list[str] | None = None) -> ServerProcess:
    """Start ``guardserve serve ARGS`` (or ``command`` + ``--port``) and wait until healthy.

    If anything fails while waiting (the server exits, it is not healthy after ``timeout``
    s, an exception, Ctrl-C), the server's whole process group is stopped before the error
    propagates: no server outlives a failed start."""
    import httpx

    port = free_port()
    argv = (command or [sys.executable, "-m", "guardserve", "serve"]) + ["--port", str(port), *args]
    with open(log, "w") as fh:  # the child has its own copy of the descriptor
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {})})
    server = ServerProcess(proc, port, log)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):  # not listening yet
                if httpx.get(server.base_url + "/health", timeout=2).status_code == 200:
                    return server
            time.sleep(1)
        raise RuntimeError(f"server not healthy after {timeout}s:\n{server.log_tail()}")
    except BaseException:
        server.stop()
        raise


# --------------------------------------------------------------------------- run_group


@dataclass
class GroupRun:
    """What ``run_group`` ran and got back."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    # Command lines of processes it started that were still running after it exited
    # (killed by run_group): a clean run leaves none.
    leftovers: list[str] = field(default_factory=list)


def _sweep(tag: str, settle: float) -> list[ProcInfo]:
    """Processes tagged ``tag`` still running after ``settle`` s (helpers such as
    multiprocessing's resource tracker exit just after their parent); killed."""
    deadline = time.monotonic() + settle
    while (left := tagged(RUN_TAG, tag)) and time.monotonic() < deadline:
        time.sleep(0.1)
    kill_processes(left)
    return left


def _drain(pipe, into: list[bytes]) -> None:
    """Read ``pipe`` to its end (all its writers gone) into ``into``, chunk by chunk, so
    that what was read is there even if the end never comes."""
    with pipe:
        while chunk := pipe.read1(1 << 16):
            into.append(chunk)


def run_group(argv: list[str], timeout: float, *, cwd: str | Path | None = None, env: dict | None = None,
              grace: float = 30, settle: float = 5) -> GroupRun:
    """Run ``argv`` in its own session, its output captured (decoded as UTF-8), stdin empty.

    Every process it starts carries ``GUARDSERVE_RUN_TAG=<unique>`` in its environment.

    - It exits within ``timeout`` s: processes it started that are still running ``settle``
      s later are killed and listed in ``GroupRun.leftovers``.
    - It runs longer: SIGINT to its group (it can stop what it started, as on Ctrl-C),
      ``grace`` s, SIGKILL to the group, every tagged process killed; then
      ``subprocess.TimeoutExpired`` is raised with the output it had written.
    - This process is interrupted meanwhile (Ctrl-C, a test timeout, any exception): the
      same clean-up, then the interruption propagates.
    """
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **(env or {}), RUN_TAG: tag},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    # Threads, not communicate(): a process it started may hold the pipes open after it
    # exited, and its exit, not the pipes' end, is what is waited for.
    out: list[bytes] = []
    err: list[bytes] = []
    readers = [threading.Thread(target=_drain, args=(pipe, buf), daemon=True)
               for pipe, buf in ((proc.stdout, out), (proc.stderr, err))]
    for t in readers:
        t.start()

    def text(buf: list[bytes]) -> str:
        for t in readers:
            t.join(10)  # the pipes end once every tagged process is gone
        return b"".join(buf).decode(errors="replace")

    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc, grace)
        _sweep(tag, settle=0)
        raise subprocess.TimeoutExpired(argv, timeout, text(out), text(err)) from None
    except BaseException:
        stop_group(proc, grace)
        _sweep(tag, settle=0)
        raise
    left = _sweep(tag, settle)
    return GroupRun(argv, proc.returncode, text(out), text(err), [p.cmdline for p in left])
