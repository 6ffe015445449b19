"""Unlearning adapters in a real vLLM server (started with LoRA, its own policy store):
an adapter trained here loads through the admin API without a restart and changes the
answers; requests that trigger a covered target are routed to it; bad adapters are
refused with a clear message while the server keeps serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.slow
ADMIN = "adapter-admin"
MAX_RANK = 16


@pytest.fixture(scope="module")
def adapter_dir(demo, world, tmp_path_factory):
    """SHRED on two forget people: retain-set-free and the fastest method."""
    from guardserve.unlearn import UnlearnConfig, Unlearner, get_method

    people = sorted({p["entity"] for p in world["forget"]})[:2]
    forget = [p for p in world["forget"] if p["entity"] in people]
    method = get_method("SHRED")
    cfg = UnlearnConfig(**{**method.default_config, "batch_size": 16, "probe_size": 60, "eval_every": 5,
                           "max_steps": 60, "stop_ratio": 0.3})
    result = Unlearner(method, cfg, progress=False).run(demo.model, forget, world["retain"][:300], targets=people)
    return SimpleNamespace(path=result.save(tmp_path_factory.mktemp("adapter") / "shred"), people=people, forget=forget)


@pytest.fixture(scope="module")
def lora_server(demo, tmp_path_factory):
    from guardserve.server.process import start_server

    tmp = tmp_path_factory.mktemp("lora_server")
    env = {"GUARDSERVE_DB": str(tmp / "policy.db"), "GUARDSERVE_ADMIN_KEY": ADMIN, "GUARDSERVE_HOME": str(tmp / "home"),
           "GUARDSERVE_AUDIT_LOG": str(tmp / "audit.jsonl"), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
           # Its own Hugging Face cache, offline: hf:// adapters come from there, as from a Hub mirror.
           "HF_HUB_CACHE": str(tmp / "hf"), "HF_HUB_OFFLINE": "1"}
    # The demo model by path: GUARDSERVE_HOME is this test's own (adapter copies land there).
    srv = start_server(["--model", str(demo.model), "--served-model-name", "guardserve-demo",
                        "--", "--enable-lora", "--max-loras", "4", "--max-lora-rank", str(MAX_RANK),
                        # It may run beside the session server: a small KV cache is plenty for these requests.
                        "--gpu-memory-utilization", "0.1"], tmp / "server.log", env=env)
    srv.audit_log = tmp / "audit.jsonl"
    srv.db, srv.home, srv.hf_cache = tmp / "policy.db", tmp / "home", tmp / "hf"
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def admin(lora_server):
    import httpx

    with httpx.Client(base_url=lora_server.base_url + "/v1/unlearning", headers={"Authorization": f"Bearer {ADMIN}"},
                      timeout=120) as c:
        yield c


def _ask(server, model: str, question: str) -> str:
    import httpx

    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 32})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _still_serving(server, world):
    q = world["retain"][0]
    assert q["value"].lower() in _ask(server, "guardserve-demo", q["question"]).lower()


def test_adapter_hot_loads_and_changes_answers(lora_server, admin, adapter_dir, world):
    pairs = adapter_dir.forget
    base_hits = sum(p["value"].lower() in _ask(lora_server, "guardserve-demo", p["question"]).lower() for p in pairs)
    r = admin.post("/adapters", json={"path": str(adapter_dir.path), "name": "forget-two"})
    assert r.status_code == 201, r.text
    rec = r.json()
    assert rec["lora_name"] == "forget-two-v1" and rec["loaded"] and rec["method"] == "SHRED"
    assert rec["path"] != str(adapter_dir.path)  # served from its own versioned copy
    hits = sum(p["value"].lower() in _ask(lora_server, rec["lora_name"], p["question"]).lower() for p in pairs)
    assert base_hits == len(pairs) and hits <= len(pairs) // 2, (base_hits, hits)
    retain = world["retain"][::36]  # 40 questions across the retain people
    base_kept = sum(p["value"].lower() in _ask(lora_server, "guardserve-demo", p["question"]).lower() for p in retain)
    kept = sum(p["value"].lower() in _ask(lora_server, rec["lora_name"], p["question"]).lower() for p in retain)
    assert kept >= 0.8 * base_kept, (kept, base_kept)  # SHRED has no retain set: a looser bound than the methods test's

    # A second registration under the same name is a new version at a new path; the old one is unloaded.
    r2 = admin.post("/adapters", json={"path": str(adapter_dir.path), "name": "forget-two"})
    assert r2.status_code == 201, r2.text
    assert r2.json()["lora_name"] == "forget-two-v2" and r2.json()["path"] != rec["path"]
    listed = {a["lora_name"]: a for a in admin.get("/adapters").json()["adapters"]}
    assert listed["forget-two-v2"]["loaded"] and not listed.get("forget-two-v1", {}).get("loaded")
    # Clients see the served model only: which adapters exist is the operator's business.
    models = __import__("httpx").get(lora_server.base_url + "/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["guardserve-demo"] and "/" not in json.dumps([m.get("root") for m in models[1:]])

    assert admin.delete("/adapters/forget-two").status_code == 200
    assert not any(a["loaded"] for a in admin.get("/adapters").json()["adapters"])
    _still_serving(lora_server, world)


def test_triggered_target_is_routed_to_its_adapter(lora_server, admin, adapter_dir, world):
    person = adapter_dir.people[0]
    ent = next(e for e in world["entities"] if e["name"] == person)
    r = admin.post("/targets", json={"name": person, "aliases": ent["aliases"][1:2]})
    assert r.status_code == 201, r.text
    r = admin.post("/adapters", json={"path": str(adapter_dir.path), "name": "routed", "targets": [person]})
    assert r.status_code == 201, r.text
    try:
        import httpx

        q = next(p for p in adapter_dir.forget if p["entity"] == person)
        resp = httpx.post(lora_server.base_url + "/v1/chat/completions", timeout=60, json={
            "model": "guardserve-demo", "messages": [{"role": "user", "content": q["question"]}], "temperature": 0})
        assert resp.status_code == 200, resp.text
        # The response names the model asked for; the audit log says the adapter served it.
        assert resp.json()["model"] == "guardserve-demo"
        served = [json.loads(line) for line in lora_server.audit_log.read_text().splitlines()]
        assert served and served[-1]["adapter"] == r.json()["lora_name"], served[-1:]
        # Naming another adapter does not dodge the covering one.
        other_person = adapter_dir.people[1]
        assert admin.post("/targets", json={"name": other_person}).status_code == 201
        decoy = admin.post("/adapters", json={"path": str(adapter_dir.path), "name": "decoy", "targets": [other_person]})
        assert decoy.status_code == 201, decoy.text
        resp = httpx.post(lora_server.base_url + "/v1/chat/completions", timeout=60, json={
            "model": decoy.json()["lora_name"], "messages": [{"role": "user", "content": q["question"]}],
            "temperature": 0})
        assert resp.status_code == 200, resp.text
        served = json.loads(lora_server.audit_log.read_text().splitlines()[-1])
        assert served["adapter"] == r.json()["lora_name"], served
        admin.delete("/adapters/decoy")
        other = world["retain"][0]  # nothing triggered: the base model answers
        before = len(lora_server.audit_log.read_text().splitlines())
        resp = httpx.post(lora_server.base_url + "/v1/chat/completions", timeout=60, json={
            "model": "guardserve-demo", "messages": [{"role": "user", "content": other["question"]}], "temperature": 0})
        assert resp.status_code == 200 and resp.json()["model"] == "guardserve-demo"
        assert len(lora_server.audit_log.read_text().splitlines()) == before  # no adapter, nothing triggered
    finally:
        admin.delete("/adapters/routed")


def test_adapters_load_by_uri_and_a_changed_copy_is_refused(lora_server, admin, adapter_dir, world):
    """A Hub adapter (hf://, from the server's offline cache) is registered pinned to its commit
    and loaded; an adapter whose stored copy changed after registration (another host's copy,
    a partial sync) is refused by the replica that loads it, with the reason."""
    from guardserve.policy import SQLiteStore
    from guardserve.unlearn.registry import AdapterRegistry

    commit = "c0ffee" + "0" * 34
    repo = lora_server.hf_cache / "models--guardserve-test--shred"
    shutil.copytree(adapter_dir.path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    r = admin.post("/adapters", json={"path": "hf://guardserve-test/shred", "name": "hub-shred"})
    assert r.status_code == 201, r.text
    rec = r.json()
    assert rec["uri"] == f"hf://guardserve-test/shred@{commit}" and rec["sha256"].startswith("sha256:") and rec["loaded"]
    assert admin.delete("/adapters/hub-shred").status_code == 200

    # Registered elsewhere (the CLI, another replica), then its stored copy is edited.
    store = SQLiteStore(lora_server.db)
    try:
        tampered = AdapterRegistry(store, root=lora_server.home / "adapters").register(adapter_dir.path, name="tampered")
    finally:
        store.close()
    (Path(tampered["path"]) / "extra.bin").write_bytes(b"not part of the registered adapter")
    result = admin.post("/adapters/sync").json()
    assert "differs from the registered" in result["failed"].get("tampered-v1", ""), result
    assert not next(a for a in admin.get("/adapters").json()["adapters"] if a["name"] == "tampered")["loaded"]
    admin.delete("/adapters/tampered")
    _still_serving(lora_server, world)


def _blank_adapter(model_dir, out, rank: int, hidden: int | None = None):
    """A real PEFT adapter of the given rank; with ``hidden`` on a different (tiny) base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if hidden is None:
        base = AutoModelForCausalLM.from_pretrained(model_dir)
    else:
        base = LlamaForCausalLM(LlamaConfig(vocab_size=4103, hidden_size=hidden, intermediate_size=2 * hidden,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("case", ["unknown_target", "mismatch", "corrupt_config", "truncated_weights", "no_weights",
                                  "rank_too_high", "not_a_folder"])
def test_bad_adapters_are_refused_and_server_keeps_serving(lora_server, admin, adapter_dir, demo, world, tmp_path, case):
    path = tmp_path / "adapter"
    body = {"name": f"bad-{case.replace('_', '-')}"}
    if case == "unknown_target":
        shutil.copytree(adapter_dir.path, path)
        body["targets"] = ["Nobody Atall"]
        expect = "unknown target"
    elif case == "mismatch":
        _blank_adapter(demo.model, path, rank=4, hidden=64)
        expect = "different base model"
    elif case == "corrupt_config":
        shutil.copytree(adapter_dir.path, path)
        (path / "adapter_config.json").write_text("{not json")
        expect = "unreadable"
    elif case == "truncated_weights":
        shutil.copytree(adapter_dir.path, path)
        blob = (path / "adapter_model.safetensors").read_bytes()
        (path / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 3])
        expect = "unreadable safetensors"
    elif case == "no_weights":
        shutil.copytree(adapter_dir.path, path)
        (path / "adapter_model.safetensors").unlink()
        expect = "no adapter_model.safetensors"
    elif case == "rank_too_high":
        _blank_adapter(demo.model, path, rank=2 * MAX_RANK)
        expect = f"above the server's --max-lora-rank {MAX_RANK}"
    else:
        path = tmp_path / "missing"
        expect = "no such folder on this host"
    r = admin.post("/adapters", json={**body, "path": str(path)})
    assert r.status_code == 400, r.text
    assert expect in r.json()["error"]["message"]
    assert body["name"] not in json.dumps(admin.get("/adapters").json())  # nothing recorded
    _still_serving(lora_server, world)
