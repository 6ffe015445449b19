"""The load test (guardserve.benchmarks.load_test), short, against the session's real server."""

import asyncio

import pytest
from conftest import ADMIN_KEY

pytestmark = pytest.mark.slow


def test_load_smoke(server, world, admin):
    """guardserve.benchmarks.load_test, short: concurrent streams while the policy changes."""
    from guardserve.benchmarks import load_test

    assert admin.get("/targets").json()["count"] == 0
    report = asyncio.run(load_test.run(server.base_url, 12, 12.0, world, seed=3, admin_key=ADMIN_KEY, api_key="key-a"))
    assert report["requests"] > 20 and report["status_5xx"] == 0 and report["status_other_non_200"] == 0
    assert report["leaks"] == 0, report["leak_examples"]
    assert report["policy_changes"] >= 5 and report["admin_errors"] == 0, report["admin_error_examples"]
    assert admin.get("/targets").json()["count"] == 0
