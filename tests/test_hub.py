"""Models named by folder or by Hub repo id, resolved the same way by every command.
The Hub is out of reach here: repo ids are tested against a local Hugging Face cache."""

from __future__ import annotations

import subprocess
import sys

import pytest

from guardserve.hub import ModelNotFound, is_repo_id, resolve_model


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding ``acme/tiny-llama`` (config.json only), the layout the Hub
    client writes: models--org--name/{refs/main, snapshots/<rev>/...}."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-llama"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_repo_ids_and_paths_are_told_apart():
    assert is_repo_id("mistralai/Mistral-7B-Instruct-v0.3") and is_repo_id("acme/tiny.llama_2")
    assert not any(is_repo_id(s) for s in ("./model", "/models/x", "~/m", "model", "a/b/c", "../x/y", "a/.."))


def test_folders(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelNotFound, match="no config.json there"):
        resolve_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_model(tmp_path / "m") == str((tmp_path / "m").resolve())
    with pytest.raises(ModelNotFound, match="no such folder, and not a Hub repo id"):
        resolve_model(str(tmp_path / "missing"))


def test_repo_ids_offline_need_the_cache(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("acme/tiny-llama") == "acme/tiny-llama"
    with pytest.raises(ModelNotFound, match="not in the local Hugging Face cache"):
        resolve_model("acme/other-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert resolve_model("acme/other-model") == "acme/other-model"  # downloaded when loaded


@pytest.mark.parametrize("model, ok", [("acme/tiny-llama", True), ("acme/not-cached", False), ("./nowhere", False)])
def test_serve_takes_a_repo_id(model, ok, hf_cache, tmp_path):
    env = {"HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1", "GUARDSERVE_HOME": str(tmp_path / "home"),
           "PATH": ""}
    r = subprocess.run([sys.executable, "-m", "guardserve", "serve", "--model", model, "--dry-run"],
                       capture_output=True, text=True, env=env, timeout=120)
    if ok:
        assert r.returncode == 0, r.stderr
        assert "--model acme/tiny-llama" in r.stdout
    else:
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.startswith("guardserve serve: error: --model ") and r.stderr.count("\n") == 1
