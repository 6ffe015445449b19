"""The probe library's registry (``guardserve.probes``): every registered kind builds sound
probes on the demo world whose leak check works, and the registry refuses what it should."""

from __future__ import annotations

import re

import pytest

import guardserve.probes as P
from guardserve.demo.world import TEMPLATES, build_world
from guardserve.leak import fact_leaked
from guardserve.probes import (
    DETECTION_KINDS,
    FAMILIES,
    OBFUSCATION_KINDS,
    PROBE_KINDS,
    PROBES,
    RWKU_KINDS,
    Probe,
    ProbeContext,
    build_probes,
    is_sound,
    probe_kind,
    user,
)
from guardserve.probes.text import QUESTIONS, STATEMENTS

REFUSAL = "I'm sorry, but I can't share that."


@pytest.fixture(scope="module")
def world():
    return build_world(seed=0)


@pytest.fixture(scope="module")
def every_kind(world):
    return build_probes(world["forget"], world["entities"], kinds=list(PROBES), per_kind=12, seed=0)


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry, so that a test may register kinds of its own."""
    monkeypatch.setattr(P, "PROBES", dict(P.PROBES))
    return P.PROBES


def test_the_families_and_the_sets():
    assert {k.family for k in PROBES.values()} == set(FAMILIES)
    assert PROBE_KINDS[:16] == (
        "prefix_injection", "affirmative_suffix", "role_play", "reverse_query", "synonym_manipulation",
        "background_hint", "in_context_learning", "multiple_choice", "cross_lingual", "multi_turn", "many_shot",
        "spell", "initials", "reversed", "base64", "translation")
    assert len(RWKU_KINDS) == 9 and "background_hint" in RWKU_KINDS and "context_hint" not in PROBES
    assert set(OBFUSCATION_KINDS) == {"misspelling", "spacing", "leetspeak", "surname_only", "homoglyph"}
    assert not set(OBFUSCATION_KINDS) & set(PROBE_KINDS)
    assert set(DETECTION_KINDS) == set(PROBES) and list(PROBES).count("multi_turn") == 1
    for name, spec in PROBES.items():
        assert spec.name == name and spec.description, name


@pytest.mark.parametrize("kind", list(PROBES))
def test_every_kind_builds_sound_probes_that_leak_on_the_answer(kind, every_kind, world):
    mine = [p for p in every_kind if p.kind == kind]
    assert mine, f"no probe of kind {kind} on the demo world"
    aliases = {e["name"]: e["aliases"] for e in world["entities"]}
    for p in mine:
        assert p.kind == kind and p.messages[-1]["role"] == "user" and is_sound(p)
        prompt = p.prompt_text
        if kind == "multiple_choice":   # the documented exception: the value shows once, among the options
            options = [ln for ln in prompt.splitlines() if re.match(r"\([A-H]\) ", ln)]
            assert sum(fact_leaked(o, p.value) for o in options) == 1, prompt
        else:
            assert not any(fact_leaked(prompt, t) for t in (p.value, *p.accept)), (kind, prompt)
            assert not p.leaked(prompt), (kind, prompt)
        if kind in OBFUSCATION_KINDS:   # the name is disguised, not written out
            assert p.entity not in prompt, prompt
        assert p.leaked(p.answer), (kind, p.answer)
        assert p.leaked(f"Sure! {p.value}.")
        assert not p.leaked(REFUSAL), kind
        if kind == "reverse_query":
            assert p.value == p.entity and set(p.accept) <= set(aliases[p.entity])


def test_the_wordings_agree_with_the_demo_world():
    # the probe package has its own copy, so that library code does not import the demo
    assert set(QUESTIONS) == set(STATEMENTS) == set(TEMPLATES)
    for attr, t in TEMPLATES.items():
        assert QUESTIONS[attr] == t.train_questions[0] and STATEMENTS[attr] == t.answer


def test_a_duplicate_name_is_refused(scratch_registry):
    with pytest.raises(ValueError, match="'spell' is already registered"):
        probe_kind("spell", family="encoding")
    with pytest.raises(ValueError, match="unknown family"):
        probe_kind("shouting", family="loud")
    assert scratch_registry == PROBES


def test_unknown_kinds_are_refused_with_the_known_ones(world):
    with pytest.raises(ValueError, match="unknown probe kinds") as e:
        build_probes(world["forget"], world["entities"], kinds=["spell", "context_hint"])
    msg = str(e.value)
    assert "context_hint" in msg and all(k in msg for k in PROBES)


def test_a_new_kind_is_one_decorated_function(scratch_registry, world):
    @probe_kind("all_caps", family="encoding", evaluation=False)
    def all_caps(c: ProbeContext) -> Probe | None:
        """The answer asked for in capitals."""
        return c.probe(user(f"{c.q} Answer in capital letters.")) if c.attr != "occupation" else None

    assert scratch_registry["all_caps"].description == "The answer asked for in capitals."
    ps = build_probes(world["forget"], world["entities"], kinds=["all_caps"])
    assert len(ps) == sum(r["attribute"] != "occupation" for r in world["forget"])
    assert all(p.kind == "all_caps" and p.leaked(p.value.upper()) for p in ps)
    assert ps == build_probes(world["forget"], world["entities"], kinds=["all_caps"])

    @probe_kind("leaky", family="rwku", evaluation=False)
    def leaky(c: ProbeContext) -> Probe:
        """A prompt that states the value: unsound, so dropped."""
        return c.probe(user(f"{c.q} (It is {c.value}.)"))

    assert build_probes(world["forget"], world["entities"], kinds=["leaky"]) == []

    @probe_kind("mislabelled", family="rwku", evaluation=False)
    def mislabelled(c: ProbeContext) -> Probe:
        """Returns a probe of another kind."""
        return Probe("spell", user(c.q), c.value, c.name, c.attr, "")

    with pytest.raises(ValueError, match="built a probe of kind 'spell'"):
        build_probes(world["forget"][:1], world["entities"], kinds=["mislabelled"])
