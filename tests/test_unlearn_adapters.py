"""Adapters outside the server: the PEFT files round-trip, the quantization attack, the
registry (versioned copies, retirement, routing choice), validation errors, and the CLI."""

from __future__ import annotations

import json

import pytest

from guardserve.unlearn.registry import AdapterError, AdapterRegistry, choose_adapter, validate_adapter


@pytest.fixture(scope="module")
def trained(demo, world, tmp_path_factory):
    """A SHRED adapter for one forget person (the fastest method: no retain set)."""
    from guardserve.unlearn import UnlearnConfig, Unlearner, get_method

    person = sorted({p["entity"] for p in world["forget"]})[0]
    forget = [p for p in world["forget"] if p["entity"] == person]
    cfg = UnlearnConfig(batch_size=16, probe_size=40, eval_every=5, max_steps=40, stop_ratio=0.3)
    result = Unlearner(get_method("SHRED"), cfg, progress=False).run(demo.model, forget, world["retain"][:200], targets=[person])
    path = result.save(tmp_path_factory.mktemp("trained") / "adapter")
    return result, path, forget


@pytest.mark.slow  # needs the demo model
def test_adapter_files_round_trip(trained, demo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from guardserve.textgen import answers

    result, path, forget = trained
    assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    meta = json.loads((path / "guardserve_adapter.json").read_text())
    assert meta["method"] == "SHRED" and meta["targets"] == [forget[0]["entity"]]
    cfg = validate_adapter(path, demo.model, max_rank=16)
    assert cfg["r"] == 8 and cfg["base_model_name_or_path"] == str(demo.model.resolve())
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo.model), str(path)).eval()
    assert answers(reloaded, result.tokenizer, forget) == answers(result.model, result.tokenizer, forget)


def test_rtn_quantization_per_output_channel():
    import torch

    from guardserve.unlearn.quantize import quantize_rtn_

    torch.manual_seed(0)
    w = torch.randn(6, 50) * torch.linspace(0.01, 3, 6).unsqueeze(1)  # rows of very different scale
    for bits in (8, 4):
        q = quantize_rtn_(w.clone(), bits)
        qmax = 2 ** (bits - 1) - 1
        scale = w.abs().amax(1, keepdim=True) / qmax
        assert ((q - w).abs() <= scale / 2 + 1e-6).all()
        for row in range(6):  # each row has its own grid of at most 2*qmax+1 levels
            assert len(torch.unique(q[row])) <= 2 * qmax + 1
            assert torch.allclose(q[row] / scale[row], torch.round(q[row] / scale[row]), atol=1e-4)
    with pytest.raises(ValueError):
        quantize_rtn_(w.clone(), 1)


@pytest.mark.slow  # needs the demo model
def test_quantization_attack_measures_recovery(trained, demo, world):
    from guardserve.unlearn.quantize import quantization_recovery

    _, path, forget = trained
    out = quantization_recovery(demo.model, path, world, bits=(8, 4), retain_pairs=world["retain"][:40], forget_pairs=forget)
    assert out["base_forget"] == 1.0 and out["full_forget"] <= 0.3
    assert out["base_forget_8bit"] == 1.0  # 8-bit keeps the base model's knowledge: a fair attack
    # 8-bit rounding is far finer than the adapter's change: the forgetting survives it.
    assert out["forgetting_kept_8bit"] >= 0.8
    assert 0.0 <= out["forget_4bit"] <= 1.0 and "forgetting_kept_4bit" in out


@pytest.mark.slow  # needs the demo model
def test_registry_versions_retire_and_route(trained, demo, tmp_path):
    from guardserve.policy import open_store

    _, path, forget = trained
    store = open_store(str(tmp_path / "policy.db"))
    reg = AdapterRegistry(store, root=tmp_path / "adapters")
    person = forget[0]["entity"]
    target = store.add({"name": person, "aliases": [person.split()[-1]]})
    other = store.add({"name": "Someone Else"})
    v1 = reg.register(path, name="shred", targets=[target.id, target.name])
    v2 = reg.register(path, name="shred", targets=[target.id, target.name])
    assert (v1["version"], v2["version"]) == (1, 2) and v1["path"] != v2["path"]
    assert v2["lora_name"] == "shred-v2" and v2["method"] == "SHRED"
    assert [r["lora_name"] for r in reg.list()] == ["shred-v2"]
    assert choose_adapter(reg.list(), [target]) == "shred-v2"
    assert choose_adapter(reg.list(), [other]) is None
    everyone = reg.register(path, name="everyone", route="all", targets=[])
    assert choose_adapter(reg.list(), [other]) == everyone["lora_name"]
    assert choose_adapter(reg.list(), [target]) == "shred-v2"  # the covering adapter wins over route=all
    reg.retire("shred")
    assert choose_adapter(reg.list(include_retired=True), [target]) == everyone["lora_name"]
    with pytest.raises(AdapterError, match="no adapter named"):
        reg.retire("nope")
    with pytest.raises(AdapterError, match="adapter name"):
        reg.register(path, name="../escape")


@pytest.mark.slow  # needs the demo model
def test_validation_errors(trained, tmp_path):
    import shutil

    _, path, _ = trained
    with pytest.raises(AdapterError, match="not a folder"):
        validate_adapter(tmp_path / "missing")
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    with pytest.raises(AdapterError, match="rank 8 is above"):
        validate_adapter(bad, max_rank=4)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="only LORA"):
        validate_adapter(bad)
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 0}))
    with pytest.raises(AdapterError, match="positive integer"):
        validate_adapter(bad)
    other_base = tmp_path / "other_base"
    other_base.mkdir()
    (other_base / "config.json").write_text(json.dumps({"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
                                                         "num_attention_heads": 8}))
    with pytest.raises(AdapterError, match="different base model"):
        validate_adapter(path, other_base)


@pytest.mark.slow  # needs the demo model
def test_cli_unlearns_registered_target_and_rejects_mistakes(demo, world, tmp_path, monkeypatch, capsys):
    from guardserve.cli import main
    from guardserve.policy import open_store

    monkeypatch.setenv("GUARDSERVE_DB", str(tmp_path / "policy.db"))
    monkeypatch.setenv("GUARDSERVE_ADAPTER_DIR", str(tmp_path / "adapters"))
    person = sorted({p["entity"] for p in world["forget"]})[1]
    open_store().add({"name": person})
    out = tmp_path / "adapter"
    rc = main(["unlearn", "--method", "GradDiff", "--targets", person, "--out", str(out), "--steps", "5",
               "--no-progress", "--register", "cli-test"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "adapter_model.safetensors").is_file()
    assert "registered as cli-test-v1" in capsys.readouterr().out
    assert main(["adapters", "list"]) == 0 and "cli-test-v1" in capsys.readouterr().out

    assert main(["unlearn", "--method", "NPO", "--targets", "Nobody Atall", "--out", str(tmp_path / "x")]) == 2
    assert "no target with id or name 'Nobody Atall'" in capsys.readouterr().err
    assert main(["unlearn", "--method", "Forgetron", "--out", str(tmp_path / "x")]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["adapters", "add", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def quick_adapter(demo, world, tmp_path_factory):
    """A real SHRED adapter after two steps: only its files and guardserve_adapter.json matter."""
    from guardserve.unlearn import UnlearnConfig, Unlearner, get_method

    person = sorted({p["entity"] for p in world["forget"]})[2]
    forget = [p for p in world["forget"] if p["entity"] == person]
    cfg = UnlearnConfig(batch_size=8, eval_every=2, max_steps=2)
    result = Unlearner(get_method("SHRED"), cfg, progress=False).run(demo.model, forget, [], targets=[person])
    return result.save(tmp_path_factory.mktemp("quick") / "adapter"), person


@pytest.mark.slow  # needs the demo model
def test_quantize_scores_what_the_adapter_forgets(quick_adapter, demo, world, tmp_path, monkeypatch, capsys):
    import shutil

    from guardserve.cli import main
    from guardserve.policy import open_store
    from guardserve.unlearn import quantize

    path, person = quick_adapter
    seen: dict = {}

    def recovery(base, adapter, world=None, bits=(8, 4), retain_pairs=None, forget_pairs=None, **kw):
        seen.update(base=str(base), world=world, bits=bits, forget=forget_pairs, retain=retain_pairs)
        return {"base_forget": 1.0}

    monkeypatch.setattr(quantize, "quantization_recovery", recovery)
    monkeypatch.setenv("GUARDSERVE_DB", str(tmp_path / "policy.db"))

    # The targets come from guardserve_adapter.json: the person's pairs, everyone else's retain pairs.
    assert main(["adapters", "quantize", str(path), "--bits", "8"]) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert seen["forget"] == [p for p in world["forget"] if p["entity"] == person]
    assert seen["retain"] == [p for p in world["retain"] if p["entity"] != person] and seen["retain"]
    assert seen["base"] == str(demo.model.resolve()) and seen["bits"] == (8,) and seen["world"] is None
    assert out == {"targets": [person], "forget_questions": len(seen["forget"]),
                   "retain_questions": len(seen["retain"]), "base_forget": 1.0}

    # --targets overrides, by a registered target's id (looked up as `guardserve unlearn --targets` does).
    other = sorted({p["entity"] for p in world["forget"]})[3]
    target = open_store().add({"name": other})
    assert main(["adapters", "quantize", str(path), "--targets", target.id]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert {p["entity"] for p in seen["forget"]} == {other} and other not in {p["entity"] for p in seen["retain"]}
    assert main(["adapters", "quantize", str(path), "--targets", "Nobody Atall"]) == 2
    assert "'Nobody Atall'" in capsys.readouterr().err

    # An adapter without guardserve_adapter.json, or naming no targets, says so in one line.
    bare = tmp_path / "bare"
    shutil.copytree(path, bare)
    (bare / "guardserve_adapter.json").unlink()
    assert main(["adapters", "quantize", str(bare)]) == 2
    err = capsys.readouterr().err.strip()
    assert "was not written by `guardserve unlearn`" in err and "pass --targets" in err and "\n" not in err
    (bare / "guardserve_adapter.json").write_text(json.dumps({"method": "SHRED", "targets": []}))
    assert main(["adapters", "quantize", str(bare)]) == 2
    assert "pass --targets" in capsys.readouterr().err
    assert main(["adapters", "quantize", str(bare), "--targets", person]) == 0
    assert {p["entity"] for p in seen["forget"]} == {person}
