"""Artifacts by URI and checksum (guardserve/artifacts.py): the digest, fetching a folder or
an ``hf://`` repo from a Hugging Face cache (offline, laid out as the Hub lays it out), and
the adapter registry recording both, so that each replica loads the very files registered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from guardserve.artifacts import ArtifactError, digest, fetch, verify
from guardserve.policy import SQLiteStore
from guardserve.server.adapters import AdapterManager
from guardserve.unlearn.registry import AdapterError, AdapterRegistry

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _adapter(folder: Path) -> Path:
    """A tiny PEFT LoRA folder: what validate_adapter reads, no base model needed."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                            "target_modules": ["q_proj"]}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 2)},
              str(folder / "adapter_model.safetensors"))
    return folder


def _hub_cache(root: Path, repo: str) -> Path:
    """``repo`` at COMMIT (and ``main`` pointing to it) in a Hugging Face cache under ``root``."""
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(COMMIT)
    return _adapter(base / "snapshots" / COMMIT)


def test_the_digest_covers_names_and_bytes_and_skips_hidden_files(tmp_path):
    a = _adapter(tmp_path / "a")
    first = digest(a)
    assert first.startswith("sha256:") and digest(a) == first
    (a / ".gitattributes").write_text("*.safetensors filter=lfs")
    assert digest(a) == first
    (a / "README.md").write_text("notes")
    second = digest(a)
    assert second != first
    (a / "README.md").rename(a / "NOTES.md")
    assert digest(a) != second
    verify(a, digest(a))
    with pytest.raises(ArtifactError, match="differs from the registered"):
        verify(a, first)


def test_fetch_names_a_missing_folder_and_a_malformed_uri(tmp_path):
    assert fetch(str(tmp_path)) == tmp_path
    with pytest.raises(ArtifactError, match="no such folder on this host"):
        fetch(str(tmp_path / "nope"))
    with pytest.raises(ArtifactError, match="expected hf://org/name"):
        fetch("hf://not a repo")


_FETCH = """
import json, sys
from guardserve.artifacts import ArtifactError, pin
try:
    folder, uri = pin(sys.argv[1])
    print(json.dumps({"folder": str(folder), "uri": uri}))
except ArtifactError as e:
    print(json.dumps({"error": str(e)}))
"""


def _pin_offline(cache: Path, uri: str) -> dict:
    # huggingface_hub reads its cache and offline settings at import: a fresh interpreter each time.
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", _FETCH, uri], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_hub_uri_is_fetched_from_the_cache_and_pinned_to_its_commit(tmp_path):
    snapshot = _hub_cache(tmp_path / "hub", "guardserve-test/shred")
    got = _pin_offline(tmp_path / "hub", "hf://guardserve-test/shred")
    assert Path(got["folder"]).resolve() == snapshot.resolve()
    assert got["uri"] == f"hf://guardserve-test/shred@{COMMIT}"   # main may move later; the commit does not
    assert _pin_offline(tmp_path / "hub", got["uri"])["folder"] == got["folder"]
    missing = _pin_offline(tmp_path / "hub", "hf://guardserve-test/absent")
    assert "not available from the Hugging Face Hub or its local cache" in missing["error"]


def test_the_registry_records_uri_and_checksum_and_replicas_refuse_changed_files(tmp_path, monkeypatch):
    store = SQLiteStore(tmp_path / "policy.db")
    registry = AdapterRegistry(store, root=tmp_path / "shared" / "adapters")
    rec = registry.register(_adapter(tmp_path / "trained"), name="forget-two")
    assert rec["uri"] == rec["path"] and Path(rec["path"]).is_relative_to(tmp_path / "shared")
    assert rec["sha256"] == digest(tmp_path / "trained")
    # Another replica loads it by its URI, checked.
    assert AdapterManager.local_copy(registry.get("forget-two")) == Path(rec["path"])
    # Someone edits the stored copy: every replica refuses it, with the reason.
    (Path(rec["path"]) / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(AdapterError, match="differs from the registered"):
        AdapterManager.local_copy(registry.get("forget-two"))
    # A Hub adapter is pinned, not copied: replicas fetch it by commit.
    snapshot = _hub_cache(tmp_path / "hub", "guardserve-test/npo")
    monkeypatch.setattr("guardserve.artifacts.fetch", lambda uri: snapshot)
    hub = registry.register("hf://guardserve-test/npo", name="from-hub")
    assert hub["uri"] == f"hf://guardserve-test/npo@{COMMIT}" and hub["sha256"] == digest(snapshot)
    assert not (tmp_path / "shared" / "adapters" / "from-hub").exists()
    store.close()
