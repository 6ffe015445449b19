"""Configurations in which the guard would not apply: the server refuses to start, in one line."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from guardserve.server.launcher import plugin_env
from guardserve.server.preflight import argv_problem, engine_problem


@pytest.mark.parametrize("extra,needle", [
    (["--logprobs-mode", "raw_logprobs"], "logprobs"),
    (["--logprobs-mode=raw_logits"], "logprobs"),
    (["--speculative-config", '{"method": "ngram"}'], "speculative"),
    (["--grpc"], "gRPC"),
    (["--grpc-port", "50051"], "gRPC"),
])
def test_serve_refuses_where_the_guard_would_not_apply(tmp_path, extra, needle):
    (tmp_path / "config.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "guardserve", "serve", "--model", str(tmp_path), "--dry-run", "--", *extra],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_serve_dry_run_passes_with_defaults(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "guardserve", "serve", "--model", str(tmp_path), "--dry-run"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--logprobs-mode processed_logprobs" in r.stdout


def test_engine_checks():
    ok = SimpleNamespace(model_config=SimpleNamespace(logprobs_mode="processed_logprobs"), speculative_config=None)
    assert engine_problem(ok, SimpleNamespace()) is None
    raw = SimpleNamespace(model_config=SimpleNamespace(logprobs_mode="raw_logprobs"), speculative_config=None)
    assert "logprobs" in engine_problem(raw, SimpleNamespace())
    spec = SimpleNamespace(model_config=ok.model_config, speculative_config=object())
    assert "speculative" in engine_problem(spec, SimpleNamespace())
    assert "gRPC" in engine_problem(ok, SimpleNamespace(grpc=True))
    assert argv_problem(["--model", "m", "--logprobs-mode", "processed_logprobs"]) is None


def test_other_vllm_plugins_stay_loaded(monkeypatch):
    from importlib.metadata import entry_points

    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    # Unset: every plugin vLLM would load anyway, and guardserve's endpoint plugin.
    named = plugin_env()["VLLM_PLUGINS"].split(",")
    assert "guardserve" in named
    assert {ep.name for ep in entry_points(group="vllm.general_plugins")} <= set(named)
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    assert plugin_env() == {"VLLM_PLUGINS": "other,guardserve"}
