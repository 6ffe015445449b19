"""Shared fixtures: the demo world and models (built once, cached), and one real vLLM
server on the demo model for the whole test session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo():
    """The default demo build (world, tokenizer, model, retain model); built on first use."""
    from guardserve.demo import ensure_demo

    return ensure_demo()


@pytest.fixture(scope="session")
def world(demo):
    return demo.load_world()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running ``guardserve serve`` process."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.base_url = f"http://127.0.0.1:{port}"

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def start_server(args: list[str], log: Path, env: dict | None = None, timeout: float = 420) -> Server:
    import httpx

    port = free_port()
    fh = open(log, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "guardserve", "serve", "--port", str(port), *args],
        stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    server = Server(proc, port, log)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.base_url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.stop()
    raise RuntimeError(f"server not healthy after {timeout}s:\n{server.log_tail()}")


# The session server's keys: two tenants and the admin.
API_KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
ADMIN_KEY = "admin-secret"


@pytest.fixture(scope="session")
def server(demo, tmp_path_factory):
    """One real guarded vLLM server on the demo model, shared by every test that needs it,
    with its own empty policy store."""
    tmp = tmp_path_factory.mktemp("server")
    env = {
        "GUARDSERVE_DB": str(tmp / "policy.db"),
        "GUARDSERVE_API_KEYS": ",".join(f"{k}:{t}" for k, t in API_KEYS.items()),
        "GUARDSERVE_ADMIN_KEY": ADMIN_KEY,
        "GUARDSERVE_AUDIT_LOG": str(tmp / "audit.jsonl"),
    }
    srv = start_server([], tmp / "server.log", env=env)
    srv.db = env["GUARDSERVE_DB"]
    srv.audit_log = Path(env["GUARDSERVE_AUDIT_LOG"])
    yield srv
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
