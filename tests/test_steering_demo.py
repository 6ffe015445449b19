"""Steering on the demo model: an SAE trained on its residual stream, per-target selections
(recomputed on a new policy version), and the transformers hook lowering forget accuracy."""

from __future__ import annotations

import collections

import pytest
import torch

from guardserve.textgen import answer_accuracy, chat_prompt, generate_answers

pytestmark = pytest.mark.slow  # needs the demo model

LAYER, N_FEATURES, CLAMP = 2, 30, 100.0


@pytest.fixture(scope="module")
def steering(demo, world, tmp_path_factory):
    """An SAE trained on the demo model and the forget people's selections, in a private
    $GUARDSERVE_HOME-like folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from guardserve.demo.corpora import sae_corpus, steering_retain
    from guardserve.demo.world import biographies
    from guardserve.policy import ForgetTarget
    from guardserve.steering.features import FeatureSelector, SteeringStore
    from guardserve.steering.train import residual_activations, train_sae

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # Laid out as $GUARDSERVE_HOME/steering, where serving (the vLLM workers) looks.
    home = tmp_path_factory.mktemp("steering-home")
    root = home / "steering"
    tok = AutoTokenizer.from_pretrained(demo.model)
    model = AutoModelForCausalLM.from_pretrained(demo.model).eval()
    acts = torch.cat(residual_activations(model, tok, sae_corpus(world, tok), LAYER))
    sae, stats = train_sae(acts, d_sae=1024, architecture="jumprelu", layer=LAYER, epochs=4, progress=False)
    assert stats["explained_variance"] > 0.9 and stats["mean_l0"] < 200
    sae.save(root / "sae")
    selector = FeatureSelector(model, tok, sae, steering_retain(world, tok), n=N_FEATURES)
    store = SteeringStore(root)
    targets = {}
    for i, e in enumerate(x for x in world["entities"] if x["split"] == "forget"):
        t = ForgetTarget(id=f"forget{i}", name=e["name"], aliases=tuple(e["aliases"]), facts=e["facts"],
                         texts=tuple(biographies(e)))
        sel, fresh = selector.ensure(store, t)
        assert fresh and selector.ensure(store, t) == (sel, False)
        targets[e["name"]] = sel
    torch.set_num_threads(threads)
    return {"home": home, "root": root, "sae": sae, "model": model, "tok": tok, "targets": targets}


def test_selection_recomputed_on_new_version(steering):
    from dataclasses import replace

    from guardserve.policy import ForgetTarget
    from guardserve.steering.features import SteeringStore

    store = SteeringStore(steering["root"])
    sel = next(iter(steering["targets"].values()))
    assert store.get(sel.target_id).version == 1
    # A changed target (version 2) no longer matches the stored record.
    t = ForgetTarget(id=sel.target_id, name="x", version=2)
    assert not store.is_current(t, steering["sae"]) and store.is_current(replace(t, version=1), steering["sae"])


def test_transformers_steering_lowers_forget_accuracy(steering, world):
    from guardserve.steering import SteeringHook

    model, tok, sae = steering["model"], steering["tok"], steering["sae"]
    pairs = world["forget"]
    by_entity = collections.defaultdict(list)
    for p in pairs:
        by_entity[p["entity"]].append(p)
    base, steered = [], []
    for name, ps in by_entity.items():
        prompts = [chat_prompt(tok, p["question"]) for p in ps]
        base += generate_answers(model, tok, prompts, max_new_tokens=24)
        with SteeringHook(model, sae, [steering["targets"][name].as_target()], CLAMP):
            steered += generate_answers(model, tok, prompts, max_new_tokens=24)
    values = [p["value"] for ps in by_entity.values() for p in ps]
    before, after = answer_accuracy(base, values), answer_accuracy(steered, values)
    assert before > 0.9 and after < before * 0.85, (before, after)
