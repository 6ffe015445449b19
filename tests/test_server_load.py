"""The load test script (bench/load_test.py), short, against the session's real server."""

import asyncio
import importlib.util
from pathlib import Path

import pytest
from conftest import ADMIN_KEY

pytestmark = pytest.mark.slow


def test_load_smoke(server, world, admin):
    """bench/load_test.py, short: concurrent streams while the policy changes."""
    assert admin.get("/targets").json()["count"] == 0
    path = Path(__file__).resolve().parents[1] / "bench" / "load_test.py"
    spec = importlib.util.spec_from_file_location("load_test", path)
    load_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_test)
    report = asyncio.run(load_test.run(server.base_url, 12, 12.0, world, seed=3, admin_key=ADMIN_KEY, api_key="key-a"))
    assert report["requests"] > 20 and report["status_5xx"] == 0 and report["status_other_non_200"] == 0
    assert report["leaks"] == 0, report["leak_examples"]
    assert report["policy_changes"] >= 5 and report["admin_errors"] == 0, report["admin_error_examples"]
    assert admin.get("/targets").json()["count"] == 0
