"""Shared fixtures: the demo world and models (built once, cached), and one real vLLM
server on the demo model for the whole test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardserve.server.process import start_server



@pytest.fixture(scope="session")
def demo():
    """The default demo build (world, tokenizer, model, retain model); built on first use."""
    from guardserve.demo import ensure_demo

    return ensure_demo()


@pytest.fixture(scope="session")
def world(demo):
    return demo.load_world()


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
