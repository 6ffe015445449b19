"""The guard-configuration registry: every registered configuration does what its flags say,
in the evaluation (which serves each one) and on the server (which runs the servable ones)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from guardserve.guard.configs import CONFIGS, get_config, servable_config, server_config

ADA = {"name": "Ada Quillfeather", "aliases": ["Quillfeather"], "kind": "person",
       "facts": {"birth_place": "Port Verity", "award": "the Golden Loom Prize"}}
ASK = [{"role": "user", "content": "Where was Ada Quillfeather born?"}]
OTHER = [{"role": "user", "content": "What is the capital of France?"}]
EVERY = [*CONFIGS, "adapter:NPO"]


@pytest.fixture(scope="module")
def confs(tmp_path_factory):
    from guardserve.eval.runner import Configurations

    c = Configurations(SimpleNamespace(targets=[ADA]), None, tmp_path_factory.mktemp("configs"), {}, "NPO", None, 8)
    yield c
    c.close()


@pytest.mark.parametrize("name", EVERY)
def test_every_configuration_serves_what_its_flags_say(confs, name):
    cfg = get_config(name)
    asked = confs.serve(name, ASK)
    assert bool(asked.phrases) == cfg.token_filter
    assert not cfg.token_filter or "Port Verity" in asked.phrases
    assert asked.semantic == cfg.semantic
    assert bool(asked.steer) == cfg.steering
    assert bool(asked.salt) == cfg.steering  # steered requests never share cached prefixes
    assert (asked.messages != ASK) == cfg.icul
    assert asked.adapter == ((cfg.method or "NPO") if cfg.adapter else None)
    other = confs.serve(name, OTHER)
    if cfg.detect:  # nothing to detect: nothing applied; `full`'s adapter, routed as a server routes it, neither
        assert (other.phrases, other.steer, other.messages, other.adapter) == ((), [], OTHER, None)
    else:  # every target on every request
        assert (bool(other.phrases), bool(other.steer), other.messages != OTHER) == (
            cfg.token_filter, cfg.steering, cfg.icul)


def test_the_registry_names_its_configurations_once():
    assert all(name == cfg.name for name, cfg in CONFIGS.items())
    assert CONFIGS["guard"].servable and not CONFIGS["none"].servable and not CONFIGS["sae"].servable
    with pytest.raises(ValueError, match="known: none, icul"):
        get_config("tokens")
    with pytest.raises(ValueError, match="known"):
        get_config("adapter:")
    assert get_config("adapter:SimNPO").method == "SimNPO" and get_config("full").method is None


def test_the_server_runs_the_configuration_it_is_given(monkeypatch):
    from guardserve.steering.flags import steering_enabled

    monkeypatch.delenv("GUARDSERVE_GUARD", raising=False)
    assert server_config() is CONFIGS["guard"] and not steering_enabled()
    monkeypatch.setenv("GUARDSERVE_GUARD", "full")
    assert server_config() is CONFIGS["full"] and steering_enabled()
    monkeypatch.setenv("GUARDSERVE_GUARD", "sae")  # steering alone does not fail closed on the filter
    with pytest.raises(ValueError, match="a server runs one of guard, guard\\+semantic, guard\\+sae, full"):
        server_config()
    for name, cfg in CONFIGS.items():
        assert cfg.servable == (name in ("guard", "guard+semantic", "guard+sae", "full"))
        if cfg.servable:
            assert servable_config(name) is cfg


@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if c.servable] + ["token"])
def test_serve_guard_flag(name, tmp_path, demo):
    sae = tmp_path / "sae"
    sae.mkdir()
    (sae / "cfg.json").write_text(json.dumps({}))
    env = {"GUARDSERVE_SAE": str(sae), "GUARDSERVE_HOME": str(demo.root.parent.parent), "PATH": ""}
    r = subprocess.run([sys.executable, "-m", "guardserve", "serve", "--guard", name, "--dry-run"],
                       capture_output=True, text=True, env=env, timeout=120)
    if not CONFIGS[name].servable:
        assert r.returncode == 2 and "a server runs one of" in r.stderr and "Traceback" not in r.stderr
        return
    assert r.returncode == 0, r.stderr
    assert f"GUARDSERVE_GUARD={name}" in r.stdout
    assert ("--enforce-eager" in r.stdout) == CONFIGS[name].steering
