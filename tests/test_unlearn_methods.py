"""Each unlearning method, trained into a LoRA adapter on the demo model, lowers forget
accuracy on the people it unlearns while accuracy on held-out retain questions stays
within RETAIN_BOUND of the base model's. Small on purpose (2 people, at most 60 steps)
so that each method runs in seconds on 2 cores; guardserve.benchmarks.unlearn has the full figures.

GradAscent does not reach FORGET_BOUND on the demo model, at any seed: forget and retain
answers share their templates, and ascent on the forget answers with no retain term breaks
retain answers as fast as it removes the facts (checked every step: forget 62% with the
probe's retain already at 87%; the retain answers start "The people speak in ..."). The
loop's utility criterion stops it first, as the bench shows on the full forget split. For
it the test checks that contract: stopped for utility, retain kept, something forgotten.
"""

from __future__ import annotations

import copy
import os
import random

import pytest

from guardserve.textgen import accuracy
from guardserve.unlearn import UnlearnConfig, Unlearner, get_method
from guardserve.unlearn.trainer import restore_optimizer

PEOPLE = 2
FORGET_BOUND = 0.5  # forget accuracy must fall to at most half the base model's
RETAIN_BOUND = 0.85  # held-out retain accuracy must stay at least 85% of the base model's (the training probe keeps 92%)
# Stopped by the utility criterion before FORGET_BOUND (module docstring).
STOPPED_FOR_UTILITY = {"GradAscent"}
# NPO's forget loss is per answer (log-probabilities summed over its tokens), its retain NLL a
# per-token mean: at the reference weight 1 the ascent outweighs it about tenfold, and the
# utility criterion stops NPO like GradAscent (forget 50-75% over seeds 0-4). Weighted by the
# answers' mean length (10 tokens on the demo) the two are on one scale and NPO forgets.
METHOD_CONFIG = {"NPO": {"retain_weight": 10.0}}


@pytest.fixture(scope="module")
def setup(demo, world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    people = sorted({p["entity"] for p in world["forget"]})[:PEOPLE]
    forget = [p for p in world["forget"] if p["entity"] in people]
    retain = list(world["retain"])
    random.Random(7).shuffle(retain)
    held_out, train = retain[:80], retain[80:600]
    tok = AutoTokenizer.from_pretrained(demo.model)
    base = AutoModelForCausalLM.from_pretrained(demo.model).eval()
    base_retain = accuracy(base, tok, held_out)
    assert accuracy(base, tok, forget) == 1.0  # the demo model knows them: there is something to forget
    return {"forget": forget, "train": train, "held_out": held_out, "tok": tok, "base_retain": base_retain,
            "model": demo.model, "world": world, "people": people}


def _config(method, **changes) -> UnlearnConfig:
    # The utility probe has the trainer's default size, 200 retain questions (0.2 s a check).
    # On 60, one question is 1.7 points and the 92% bar falls between 55 and 56 of them:
    # one-question dips rolled back adapters whose held-out retain accuracy was 89-94%, until
    # the loop gave up (GradDiff + GU stopped at forget 69%).
    cfg = UnlearnConfig(**{**method.default_config, "batch_size": 16, "probe_size": 200, "eval_every": 5,
                           "max_steps": 60, "stop_ratio": 0.2, **changes})
    return cfg


@pytest.mark.slow  # needs the demo model (as every test that does)
@pytest.mark.parametrize("name,gu", [("GradAscent", False), ("GradDiff", False), ("NPO", False), ("SimNPO", False),
                                     ("RMU", False), ("SHRED", False), ("GradDiff", True)])
def test_method_forgets_and_keeps_retain(setup, name, gu):
    method = get_method(name)
    cfg = _config(method, gu=gu, seed=int(os.environ.get("GUARDSERVE_TEST_UNLEARN_SEED", "0")),
                  **METHOD_CONFIG.get(name, {}))
    result = Unlearner(method, cfg, progress=False).run(
        setup["model"], setup["forget"], setup["train"], setup["world"]["world_facts"], targets=setup["people"])
    forget_acc = accuracy(result.model, setup["tok"], setup["forget"])
    retain_acc = accuracy(result.model, setup["tok"], setup["held_out"])
    info = (name, cfg.seed, forget_acc, retain_acc, result.stop_reason, result.history)
    # The loop keeps only an adapter that kept utility on its probe.
    assert result.probe["retain"] >= cfg.min_retain * result.base_probe["retain"], info
    assert retain_acc >= RETAIN_BOUND * setup["base_retain"], info
    if name in STOPPED_FOR_UTILITY:
        assert result.stop_reason == "utility" or forget_acc <= FORGET_BOUND, info
        assert forget_acc < 1.0, info  # the base model's (setup): something was forgotten
    else:
        assert forget_acc <= FORGET_BOUND, info


@pytest.mark.slow
def test_same_seed_same_adapter(setup):
    import torch

    def weights(seed):
        method = get_method("GradDiff")
        cfg = _config(method, max_steps=3, eval_every=100, seed=seed, probe_size=60)
        r = Unlearner(method, cfg, progress=False).run(setup["model"], setup["forget"], setup["train"][:200])
        return {n: p.detach().clone() for n, p in r.model.named_parameters() if p.requires_grad}

    a, b, c = weights(0), weights(0), weights(1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_gu_projection_is_orthogonal_to_retain_gradients():
    import torch

    torch.manual_seed(0)
    trainer = Unlearner(get_method("GradDiff"), UnlearnConfig(gu_rank=2), progress=False)
    basis: list = []
    shapes = [(4, 3), (5,)]
    retain_grads = [[torch.randn(s) for s in shapes] for _ in range(2)]
    forget = [torch.randn(s) for s in shapes]
    for g_r in retain_grads:
        projected = trainer._project(forget, g_r, basis)
    flat = torch.cat([g.reshape(-1) for g in projected])
    for g_r in retain_grads:  # both recent retain gradients are in the protected span
        assert abs(float(flat @ torch.cat([g.reshape(-1) for g in g_r]))) < 1e-4
    assert [g.shape for g in projected] == [torch.Size(s) for s in shapes]
    assert flat.norm() > 0  # the forget update is not erased, only its retain component


def test_roll_back_restores_the_snapshot_every_time():
    """Two roll-backs to the same adapter restore the same optimizer state: the steps in
    between must not update the snapshot (load_state_dict keeps the tensors it is given)."""
    import torch

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    snapshot = copy.deepcopy(opt.state_dict())
    kept = copy.deepcopy(snapshot)
    for _ in range(2):
        restore_optimizer(opt, snapshot)
        p.grad = torch.full((3,), 5.0)
        opt.step()
    assert all(torch.equal(snapshot["state"][0][k], kept["state"][0][k]) for k in kept["state"][0])
    restore_optimizer(opt, snapshot)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], kept["state"][0]["exp_avg"])


def test_unknown_method_and_parameter():
    with pytest.raises(ValueError, match="unknown method"):
        get_method("Forgetron")
    with pytest.raises(ValueError, match="unknown parameter"):
        get_method("NPO", gamma=1)


# --------------------------------------------------------------------------- LoRA targets
# LoRA goes on every linear layer but the output head by default (PEFT's all-linear, whatever
# the architecture calls its layers); --lora-targets names modules instead. What the trainer
# wrote must pass the adapter registry's checks against its base, for non-Llama namings too.

DEMO_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def _lora_keys(path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.slow
def test_default_lora_targets_are_every_linear_layer_but_the_head(setup, tmp_path):
    import json

    from guardserve.policy import open_store
    from guardserve.unlearn.registry import AdapterRegistry, validate_adapter

    method = get_method("SHRED")
    cfg = _config(method, max_steps=1, eval_every=100, probe_size=20)
    assert cfg.target_modules == "all-linear"
    result = Unlearner(method, cfg, progress=False).run(setup["model"], setup["forget"][:8], setup["train"][:40])
    path = result.save(tmp_path / "adapter")
    assert result.lora_modules == DEMO_LINEAR
    saved = json.loads((path / "adapter_config.json").read_text())
    assert saved["target_modules"] == DEMO_LINEAR  # concrete names, not the shorthand: vLLM and PEFT load them
    meta = json.loads((path / "guardserve_adapter.json").read_text())
    assert meta["lora_modules"] == DEMO_LINEAR and meta["config"]["target_modules"] == "all-linear"
    keys = _lora_keys(path)
    layers = json.loads((setup["model"] / "config.json").read_text())["num_hidden_layers"]
    for i in range(layers):
        for sub, names in (("self_attn", ["q_proj", "k_proj", "v_proj", "o_proj"]), ("mlp", ["gate_proj", "up_proj", "down_proj"])):
            for name in names:
                assert f"base_model.model.model.layers.{i}.{sub}.{name}.lora_A.weight" in keys
    assert not any("lm_head" in k or "embed_tokens" in k for k in keys)
    assert validate_adapter(path, setup["model"], max_rank=16)["target_modules"] == DEMO_LINEAR
    store = open_store(str(tmp_path / "policy.db"))
    try:
        rec = AdapterRegistry(store, root=tmp_path / "adapters").register(path, name="all-linear")
    finally:
        store.close()
    assert rec["lora_name"] == "all-linear-v1" and rec["rank"] == cfg.rank


@pytest.mark.slow
def test_cli_lora_targets_override(demo, tmp_path, monkeypatch, capsys):
    import json

    from guardserve.cli import main
    from guardserve.unlearn.registry import validate_adapter

    monkeypatch.setenv("GUARDSERVE_DB", str(tmp_path / "policy.db"))
    monkeypatch.setenv("GUARDSERVE_ADAPTER_DIR", str(tmp_path / "adapters"))
    out = tmp_path / "qv"
    rc = main(["unlearn", "--method", "SHRED", "--steps", "1", "--out", str(out), "--no-progress",
               "--lora-targets", " q_proj, v_proj ", "--register", "qv"])
    assert rc == 0, capsys.readouterr().err
    assert "LoRA on q_proj, v_proj" in capsys.readouterr().out
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    assert {k.split(".")[-3] for k in _lora_keys(out)} == {"q_proj", "v_proj"}
    validate_adapter(out, demo.model)
    # A name the model does not have: one line, naming the layers it does have.
    assert main(["unlearn", "--method", "SHRED", "--steps", "1", "--out", str(tmp_path / "x"), "--no-progress",
                 "--lora-targets", "c_attn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the weights' loading bar
    assert "error: --lora-targets c_attn does not fit" in err and "q_proj" in err and "all-linear" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("text,expected", [
    ("all-linear", "all-linear"), ("ALL-LINEAR", "all-linear"), ("q_proj,v_proj", ("q_proj", "v_proj")),
    ("q_proj, q_proj ,v_proj,", ("q_proj", "v_proj")), ("self_attn.q_proj", ("self_attn.q_proj",)),
])
def test_parse_lora_targets(text, expected):
    from guardserve.unlearn.trainer import parse_lora_targets

    assert parse_lora_targets(text) == expected


@pytest.mark.parametrize("text", ["", " , ", "q_proj;v_proj", "q proj", ".q_proj"])
def test_parse_lora_targets_refuses(text):
    from guardserve.unlearn.trainer import parse_lora_targets

    with pytest.raises(ValueError, match="--lora-targets"):
        parse_lora_targets(text)


def _tiny(arch: str, hidden: int):
    import transformers as T

    small = {"vocab_size": 64, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}
    return {
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**small)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**small)),
        "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**small, pad_token_id=0)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=hidden, n_layer=2, n_head=4, n_positions=64,
                                                       bos_token_id=0, eos_token_id=0)),
    }[arch]()


@pytest.mark.parametrize("arch,modules", [
    ("qwen2", DEMO_LINEAR), ("mistral", DEMO_LINEAR), ("phi3", ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]),
    ("gpt2", ["c_attn", "c_fc", "c_proj"]),  # Conv1D layers: weights stored [in, out]
])
def test_registry_accepts_all_linear_adapters_of_other_architectures(arch, modules, tmp_path):
    """Adapters on other namings (fused qkv, GPT-2's Conv1D) pass the registry's shape
    check against their own base, and fail it against a base of another size."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model

    from guardserve.unlearn.registry import AdapterError, validate_adapter
    from guardserve.unlearn.trainer import lora_modules

    torch.manual_seed(0)
    for hidden in (32, 64):
        _tiny(arch, hidden).save_pretrained(tmp_path / f"base{hidden}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes that Conv1D needs fan_in_fan_out
        model = get_peft_model(_tiny(arch, 32), LoraConfig(r=4, target_modules="all-linear"))
    assert lora_modules(model) == modules
    model.save_pretrained(tmp_path / "adapter")
    validate_adapter(tmp_path / "adapter", tmp_path / "base32")
    with pytest.raises(AdapterError, match="different base model"):
        validate_adapter(tmp_path / "adapter", tmp_path / "base64")
