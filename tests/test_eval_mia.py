"""Membership inference (guardserve.eval.mia): the AUC, the four scores by their definitions,
token statistics in closed form on the toy model, and what a guarded configuration lets an
attacker score (tests/eval_toys.py: one token per character, a model that favours the next)."""

from __future__ import annotations

import math
import random
import zlib

import pytest
import torch
from eval_toys import CharTokenizer, SuccessorLM, ToyScorer

from guardserve.eval import mia
from guardserve.eval.runner import MembershipInference, Served


def test_auc_is_the_chance_a_member_outscores_a_non_member():
    rng = random.Random(0)
    for _ in range(50):
        pos = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(rng.randint(1, 12))]
        neg = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(rng.randint(1, 12))]
        pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
        assert mia.auc(pos, neg) == pytest.approx(pairs / (len(pos) * len(neg)))
    assert mia.auc([2, 3], [0, 1]) == 1.0 and mia.auc([0], [1]) == 0.0
    assert mia.auc([], [1.0]) is None and mia.auc([math.nan], [1.0]) is None


def test_scores_follow_their_definitions():
    logp = [-0.1, -2.0, -0.5, -4.0, -0.2, -0.3, -0.1, -0.2, -1.0, -0.4]
    mu, sigma = [-1.0] * 10, [2.0] * 10
    text = "Gygreim Houtus was born in Jostem Falls."
    s = mia.scores([mia.TokenStats(logp, mu, sigma)], [text])
    assert s["loss"] == [pytest.approx(sum(logp) / 10)]
    assert s["zlib"] == [pytest.approx(sum(logp) / len(zlib.compress(text.encode())))]
    assert s["min_k"] == [pytest.approx((-4.0 - 2.0) / 2)]  # the lowest 20% of 10 tokens
    assert s["min_k_plus_plus"] == [pytest.approx(((-4.0 + 1) / 2 + (-2.0 + 1) / 2) / 2)]
    empty = mia.scores([mia.TokenStats([], [], [])], [""])
    assert all(math.isnan(v[0]) for v in empty.values())


def test_token_stats_in_closed_form():
    (stats,) = mia.token_stats(SuccessorLM(), CharTokenizer(), ["abd"])
    assert [-lp for lp in stats.logp] == pytest.approx([SuccessorLM.token_loss("a", "b"), SuccessorLM.token_loss("b", "d")])
    logits = torch.zeros(SuccessorLM.V)
    logits[0] = SuccessorLM.HIT
    lp = torch.log_softmax(logits, 0)
    mu = float((lp.exp() * lp).sum())
    sd = math.sqrt(float((lp.exp() * lp.square()).sum()) - mu * mu)
    assert stats.mu == pytest.approx([mu, mu]) and stats.sigma == pytest.approx([sd, sd], rel=1e-4)


def test_the_attack_tells_what_the_model_predicts_from_what_it_does_not():
    members = ["abcdefg", "lmnopq", "rstuvw"]            # every next character is the successor
    nonmembers = ["agbfce", "qlpmon", "wrvsut"]
    aucs = mia.attack(SuccessorLM(), CharTokenizer(), members, nonmembers)
    assert set(aucs) == set(mia.METHODS) and all(a == 1.0 for a in aucs.values()), aucs


class _Confs:
    """Detection that triggers on texts naming Ada; ``full``'s adapter is none."""

    full_adapter = None

    def serve(self, config, messages):
        text = messages[-1]["content"]
        return Served(list(messages), phrases=("Ada",) if "Ada" in text else ())


def test_what_each_configuration_lets_an_attacker_score():
    members = ["Ada was born in Verity. abcdef", "Ada works as a potter. bcdefg"]
    nonmembers = ["Bo was born in Lisbon. xqzr", "Bo works as a baker. kxqz", "Ada is a name. abc"]
    attack = MembershipInference(ToyScorer(), CharTokenizer(), members, nonmembers)
    row, reason = attack("none", _Confs())
    assert reason is None and row["mia_refused"] == {"members": 0.0, "nonmembers": 0.0}
    assert set(row["mia"]) == set(mia.METHODS)
    # Detection: every forget text triggers, so the guard scores none of them.
    row, reason = attack("guard", _Confs())
    assert row["mia"] is None and "every forget text" in reason
    assert row["mia_refused"] == {"members": 1.0, "nonmembers": pytest.approx(1 / 3, abs=1e-4)}
    # A configuration that guards every request refuses every prompt.
    row, reason = attack("token", _Confs())
    assert row["mia"] is None and row["mia_refused"] == {"members": 1.0, "nonmembers": 1.0}


def test_the_report_has_the_table_with_the_retain_model_first():
    from guardserve.eval.report import markdown

    results = {"meta": {"mia": {"members": 40, "nonmembers": 40, "min_k": 0.2,
                                "retain_model_auc": {m: 0.5 for m in mia.METHODS}}},
               "configs": {"none": {"mia": {m: 0.99 for m in mia.METHODS}, "mia_refused": {"members": 0.0, "nonmembers": 0.0}},
                           "guard": {"mia": None, "mia_refused": {"members": 1.0, "nonmembers": 0.05}}}}
    md = markdown(results).split("Membership inference")[1]
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[0] == "| model | LOSS | Zlib | Min-K% | Min-K%++ | refused |"
    assert lines[1] == "| retain model | 0.500 | 0.500 | 0.500 | 0.500 | – |"
    assert lines[2] == "| `none` | 0.990 | 0.990 | 0.990 | 0.990 | 0% / 0% |"
    assert lines[3] == "| `guard` | n/a | n/a | n/a | n/a | 100% / 5% |"
