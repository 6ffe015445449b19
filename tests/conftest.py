"""Shared fixtures: the demo world and models (built once, cached, before the first test),
one real vLLM server on the demo model for the whole test session, ``skip_or_fail``,
and the session-end check that no process started by the tests outlives them."""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from pathlib import Path

import pytest

from guardserve.server.process import ProcInfo, descendants, kill_processes, processes, start_server, tagged

# Every process the session starts inherits this variable (a fresh value per session), so
# the end-of-session check finds them even in their own session or re-parented to init.
SESSION_TAG = "GUARDSERVE_TEST_SESSION"


def skip_or_fail(reason: str) -> None:
    """Skip the test, or fail it where ``$CI`` is set (non-empty): in CI a missing
    dependency must not hide a broken feature behind a skip."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (a failure, not a skip, because $CI is set)", pytrace=False)
    pytest.skip(reason)


# --------------------------------------------------------------------------- the demo build


_demo_error: BaseException | None = None


def pytest_configure(config: pytest.Config) -> None:
    os.environ[SESSION_TAG] = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    os.environ.pop("GUARDSERVE_DEMO", None)  # commands run in tests default to the default demo (DEMO_FIXTURES)
    # A shell without job control starts background commands (`make test &`, CI runners) with
    # SIGINT ignored, and children inherit that: servers would then ignore the SIGINT that
    # stops them gracefully, and Ctrl-C tests could not interrupt anything.
    _default_sigint()


def _default_sigint() -> None:
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _interruptible():
    """Each test starts with Python's own SIGINT handler: a library run in-process earlier
    (vLLM's engine, torch's compile workers) may have changed it, and processes a test starts
    inherit an ignored SIGINT, which would turn every graceful stop into a kill after the grace."""
    _default_sigint()
    yield


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the demo (minutes on a fresh machine; at once when cached) before the first
    test, when any selected test needs it: never inside a test's timeout, nor inside a
    benchmark subprocess with a deadline of its own."""
    global _demo_error
    config = session.config
    needed = [variant for variant, fixture in DEMO_FIXTURES.items()
              if any(fixture in getattr(item, "fixturenames", ()) for item in session.items)]
    if config.option.collectonly or not needed:
        return
    from guardserve.demo import BuildSpec, ensure_demo

    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter:
        reporter.write_line("guardserve: making sure the demo is built (minutes the first time, then cached)")
    try:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():  # show its progress
            for variant in needed:
                ensure_demo(BuildSpec.for_variant(variant))
    except Exception as e:  # the tests that need the demo fail with this; the others run
        _demo_error = e


# The demo variants (guardserve.demo.build.VARIANTS) and the fixtures that hold them. The suite
# runs on the default variant whatever GUARDSERVE_DEMO says; sp32k has tests of its own.
DEMO_FIXTURES = {"bpe4k": "demo", "sp32k": "demo_sp32k"}


def _demo_build(variant: str):
    from guardserve.demo import BuildSpec, ensure_demo

    if _demo_error is not None:
        pytest.fail(f"the demo build failed before the tests: {type(_demo_error).__name__}: {_demo_error}")
    return ensure_demo(BuildSpec.for_variant(variant))


@pytest.fixture(scope="session")
def demo():
    """The default demo build (world, tokenizer, model, retain model), built before the
    session's first test (``pytest_collection_finish``); here it is found in the cache."""
    return _demo_build("bpe4k")


@pytest.fixture(scope="session")
def demo_sp32k():
    """The second demo build: a Mistral on Mistral 7B's 32k SentencePiece tokenizer and its
    [INST] template, trained on the same world (built before the first test, like ``demo``)."""
    return _demo_build("sp32k")


@pytest.fixture(scope="session")
def world(demo):
    return demo.load_world()


# --------------------------------------------------------------------------- Postgres


@pytest.fixture(scope="module")
def pg_server():
    """A throwaway PostgreSQL server (tests/postgres_server.py) for the module's tests."""
    from postgres_server import PostgresServer, pg_bindir

    if pg_bindir() is None:
        skip_or_fail("PostgreSQL binaries not installed (scripts/setup-system.sh installs them)")
    srv = PostgresServer()
    yield srv
    srv.stop()


# --------------------------------------------------------------------------- the server


# The session server's keys: two tenants and the admin.
API_KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
ADMIN_KEY = "admin-secret"


@pytest.fixture(scope="session")
def server(demo, tmp_path_factory):
    """One real guarded vLLM server on the demo model, shared by every test that needs it,
    with its own empty policy store. Stopped (its whole process group) on every path."""
    tmp = tmp_path_factory.mktemp("server")
    env = {
        "GUARDSERVE_DB": str(tmp / "policy.db"),
        "GUARDSERVE_API_KEYS": ",".join(f"{k}:{t}" for k, t in API_KEYS.items()),
        "GUARDSERVE_ADMIN_KEY": ADMIN_KEY,
        "GUARDSERVE_AUDIT_LOG": str(tmp / "audit.jsonl"),
    }
    srv = start_server([], tmp / "server.log", env=env)
    try:
        srv.db = env["GUARDSERVE_DB"]
        srv.audit_log = Path(env["GUARDSERVE_AUDIT_LOG"])
        yield srv
    finally:
        srv.stop()


def make_client(server, key: str = "key-a"):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", api_key=key, timeout=60, max_retries=0)


@pytest.fixture(scope="session")
def openai_client(server):
    return make_client(server, "key-a")


@pytest.fixture(scope="session")
def admin(server):
    """An httpx client for the admin API."""
    import httpx

    with httpx.Client(base_url=server.base_url + "/v1/unlearning", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                      timeout=120) as client:
        yield client


@contextlib.contextmanager
def registered_people(admin, entities: list[dict], tenant: str | None = None):
    """The people registered as targets in one bulk call (for ``tenant``, else globally), in
    force for the body (the contract: requests that start >= 1 s after registration are
    guarded), deleted afterwards. Yields their target ids."""
    import time

    specs = [{"name": e["name"], "aliases": e["aliases"][1:], "kind": "person", "facts": e["facts"],
              **({"tenant": tenant} if tenant else {})} for e in entities]
    r = admin.post("/targets", json=specs)
    assert r.status_code == 201, r.text
    ids = [t["id"] for t in r.json()["targets"]]
    time.sleep(1.0)
    try:
        yield ids
    finally:
        for tid in ids:
            admin.delete(f"/targets/{tid}")
        time.sleep(1.0)


# --------------------------------------------------------------------------- leftover processes


# Helpers of this interpreter that live until it exits (they go with it): not leftovers.
INTERPRETER_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "torch._inductor")
# A server being stopped, or a helper whose parent just exited, gets this long to go.
SETTLE_S = float(os.environ.get("GUARDSERVE_TEST_SETTLE_S", "15"))


def leftover_processes() -> list[ProcInfo]:
    """Processes this session started that are still running: tagged with its
    ``SESSION_TAG``, or descendants of this process, minus this interpreter's own helpers
    (and their children)."""
    me, procs = os.getpid(), processes()
    helpers = [p for p in procs if p.ppid == me and any(h in p.cmdline for h in INTERPRETER_HELPERS)]
    exempt = {p.pid for h in helpers for p in [h, *descendants(h.pid, procs)]}
    found = {p.pid: p for p in [*tagged(SESSION_TAG, os.environ[SESSION_TAG]), *descendants(me, procs)]}
    return [p for pid, p in sorted(found.items()) if pid not in exempt]


@pytest.hookimpl(trylast=True)  # after the runner's hook, which tears the session fixtures down
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a process started by the tests is still running: kill it, list it."""
    import time

    deadline = time.monotonic() + SETTLE_S
    while (left := leftover_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not left:
        return
    kill_processes(left)
    lines = [f"{len(left)} process(es) started by the tests were still running at the end of the session "
             f"({SETTLE_S} s after it); killed now:"]
    lines += [f"  pid {p.pid} (group {p.pgid}, session {p.sid}): {p.cmdline[:300]}" for p in left]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter:
        reporter.write_sep("=", "processes left running", red=True, bold=True)
        for line in lines:
            reporter.write_line(line, red=True)
    else:
        import sys

        print("\n".join(lines), file=sys.stderr)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
