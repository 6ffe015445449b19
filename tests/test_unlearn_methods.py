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
