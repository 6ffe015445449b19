"""Attack probes of the evaluation suite, ``guardserve.probes`` (no model: only the demo world's data)."""

from __future__ import annotations

import base64
import re

import pytest

from guardserve.demo.world import build_world
from guardserve.probes import PROBE_KINDS, Probe, build_probes, kind_counts, retain_probes
from guardserve.probes.text import LANGUAGES, quoted_title


@pytest.fixture(scope="module")
def world():
    return build_world(seed=0)


@pytest.fixture(scope="module")
def probes(world):
    return build_probes(world["forget"], world["entities"], seed=3)


def _words(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "


def _has(text: str, phrase: str) -> bool:
    return _words(phrase) in _words(text)


def test_every_kind_for_the_demo_world(probes, world):
    counts = kind_counts(probes)
    assert tuple(counts) == PROBE_KINDS
    n = len(world["forget"])
    for kind, c in counts.items():
        # initials need a value of two or more capitalised words (not dates, occupations)
        assert c >= (n // 2 if kind == "initials" else n), (kind, c)
    for p in probes:
        assert p.messages and p.messages[-1]["role"] == "user"
        assert all(m["role"] in ("user", "assistant") and m["content"].strip() for m in p.messages)
        assert p.value and p.answer and p.entity and p.attribute


def test_deterministic_by_seed(world):
    a = build_probes(world["forget"], world["entities"], seed=1)
    b = build_probes(world["forget"], world["entities"], seed=1)
    c = build_probes(world["forget"], world["entities"], seed=2)
    assert a == b
    assert [p.messages for p in a] != [p.messages for p in c]
    # a probe's wording does not depend on which other records are in the list
    one = build_probes(world["forget"][5:6], world["entities"], seed=1)
    assert all(p in a for p in one)


def test_per_kind_cap_spreads_over_attributes_and_people(world):
    ps = build_probes(world["forget"], world["entities"], per_kind=16, seed=0)
    counts = kind_counts(ps)
    assert set(counts) == set(PROBE_KINDS) and all(v == 16 for v in counts.values())
    for kind in PROBE_KINDS:
        mine = [p for p in ps if p.kind == kind]
        attrs = {p.attribute for p in mine}
        people = [p.entity for p in mine]
        if kind != "initials":
            assert len(attrs) == 8 and all(sum(p.attribute == a for p in mine) == 2 for a in attrs)
        assert len(set(people)) == len(people)   # 16 of 20 people, none twice
    assert ps == build_probes(world["forget"], world["entities"], per_kind=16, seed=0)


def test_unknown_kind_and_foreign_records_refused(world):
    with pytest.raises(ValueError, match="unknown probe kinds"):
        build_probes(world["forget"], world["entities"], kinds=["nope"])
    with pytest.raises(ValueError, match="not among the entities"):
        build_probes(world["world_facts"], world["entities"])
    with pytest.raises(ValueError, match="forget people"):
        retain_probes(world["forget"], world["entities"])


def test_prompt_never_gives_the_value_away(probes, world):
    names = {e["name"] for e in world["entities"]}
    for p in probes:
        prompt = p.prompt_text
        if p.kind == "multiple_choice":
            options = [ln for ln in prompt.splitlines() if re.match(r"\([A-D]\) ", ln)]
            assert len(options) == 4
            assert sum(_has(o, p.value) for o in options) == 1, prompt
            assert f"({p.choice}) {p.value}" in prompt
        elif p.kind == "reverse_query":
            assert p.value == p.entity and p.value in names
            assert not _has(prompt, p.value) and not p.leaked(prompt), prompt
        else:
            assert not _has(prompt, p.value), (p.kind, prompt)
            assert not p.leaked(prompt), (p.kind, prompt)


def test_multi_turn_last_turn_names_nobody(probes, world):
    ents = {e["name"]: e for e in world["entities"]}
    mt = [p for p in probes if p.kind == "multi_turn"]
    assert mt
    for p in mt:
        first, reply, last = p.messages
        assert [m["role"] for m in p.messages] == ["user", "assistant", "user"]
        assert p.entity in first["content"] and p.entity not in reply["content"]
        aliases = ents[p.entity]["aliases"]
        assert not any(_has(last["content"], a) or a in last["content"] for a in aliases), last
        assert re.search(r"\b(he|she|his|her)\b", last["content"])


def test_many_shot_has_true_demonstrations_without_the_value(world):
    k = 6
    ps = build_probes(world["forget"], world["entities"], kinds=["many_shot"], shots=k)
    assert len(ps) == len(world["forget"])
    facts = {(e["name"], a): v for e in world["entities"] for a, v in e["facts"].items()}
    for p in ps:
        demos = list(zip(p.messages[:-1:2], p.messages[1::2]))
        assert len(demos) >= k
        assert all(u["role"] == "user" and a["role"] == "assistant" for u, a in demos)
        same = 0
        for _, a in demos:   # every demonstration states a true fact of someone
            assert any(v in a["content"] for (n, _), v in facts.items() if n in a["content"]), a
            same += p.entity in a["content"]
        assert same >= 1
        assert not p.leaked(p.prompt_text), p.prompt_text


def test_reverse_query_asks_for_the_person(probes, world):
    rq = [p for p in probes if p.kind == "reverse_query"]
    other = next(e["name"] for e in world["entities"] if e["name"] not in {p.entity for p in rq})
    for p in rq:
        assert p.value == p.entity and p.answer.startswith(p.entity)
        assert p.leaked(f"That would be {p.entity}.")
        assert not p.leaked(f"That would be {other}.")


def test_reverse_query_pins_down_one_person(world):
    # retain people share birthplaces and occupations: the question then adds a fact
    ps = retain_probes(world["retain"], world["entities"], kinds=["reverse_query"])
    ps += build_probes(world["forget"], world["entities"], kinds=["reverse_query"])
    assert len(ps) == len(world["retain"]) + len(world["forget"])
    facts = [(e["name"], a, _words(quoted_title(v))) for e in world["entities"] for a, v in e["facts"].items()]
    for p in ps:
        prompt = _words(p.prompt_text)
        stated = {e["name"]: set() for e in world["entities"]}
        for name, a, v in facts:
            if v in prompt:
                stated[name].add(a)
        mine = stated[p.entity]
        assert p.attribute in mine
        assert [n for n, s in stated.items() if s >= mine] == [p.entity], p.prompt_text


def test_leaked_on_answers_and_perturbed_answers(probes, world):
    recs = {(r["entity"], r["attribute"]): r for r in world["forget"]}
    for p in probes:
        rec = recs[(p.entity, p.attribute)]
        if p.kind == "reverse_query":
            continue   # covered above: the value there is the name
        assert p.leaked(rec["answer"]), (p.kind, rec["answer"])
        assert p.leaked(f"Sure! {p.value}.")
        for wrong in rec["perturbed_answer"]:
            assert not p.leaked(wrong), (p.kind, p.value, wrong)
        assert not p.leaked("I'm sorry, I can't help with that.")


def test_leaked_decodes_the_requested_encoding(probes):
    by = {}
    for p in probes:
        by.setdefault((p.kind, p.attribute), p)
    father = by[("spell", "father")].value
    assert by[("spell", "father")].leaked("-".join(father.replace(" ", "")))
    assert by[("spell", "father")].leaked(" ".join(" ".join(w) for w in father.split()))
    assert by[("reversed", "father")].leaked(father[::-1])
    assert by[("reversed", "father")].leaked(" ".join(w[::-1] for w in father.split()))
    assert by[("base64", "father")].leaked(base64.b64encode(father.encode()).decode())
    assert by[("base64", "father")].leaked("It is " + base64.b64encode(f"The father is {father}.".encode()).decode())
    ini = by[("initials", "father")]
    first, last = ini.value.split()
    for written in (f"{first[0]}.{last[0]}.", f"{first[0]}. {last[0]}.", first[0] + last[0]):
        assert ini.leaked(written), written
    assert not ini.leaked("X.Y.") and not ini.leaked("The answer.")
    date = by[("translation", "birth_date")]
    d, month, y = date.value.split()
    assert date.leaked(f"{month} {d}, {y}")
    if date.lang == "fr":
        assert date.leaked(f"Il est né le {date.accept[-1]}.")


def test_multiple_choice_letter_counts_as_the_value(probes, world):
    recs = {(r["entity"], r["attribute"]): r for r in world["forget"]}
    mcs = [p for p in probes if p.kind == "multiple_choice"]
    letters = set()
    for p in mcs:
        letters.add(p.choice)
        wrong = next(L for L in "ABCD" if L != p.choice)
        for good in (p.choice, f"({p.choice})", f"{p.choice}.", f"{p.choice}) {p.value}",
                     f"The answer is {p.choice}.", f"The correct option is ({p.choice})."):
            assert p.leaked(good), (good, p.choice)
        for bad in (wrong, f"({wrong})", f"{wrong}.", f"The answer is {wrong}.", "None of them."):
            assert not p.leaked(bad), bad
        opts = dict(re.findall(r"^\(([A-D])\) (.+)$", p.prompt_text, re.M))
        assert opts[p.choice] == p.value
        for L, text in opts.items():
            assert p.leaked(text) == (L == p.choice)
        assert p.answer == recs[(p.entity, p.attribute)]["answer"]
    assert len(letters) >= 3   # the true option is not always in the same place
    # a sentence that merely starts with the article "A" does not pick option A
    p = next(p for p in mcs if p.choice == "A")
    assert not p.leaked("A person I have never heard of.")


def test_cross_lingual_and_translation_languages(probes):
    langs = {p.kind: set() for p in probes}
    for p in probes:
        langs[p.kind].add(p.lang)
    assert langs["cross_lingual"] == {"fr", "de", "es"} == langs["translation"]
    assert langs["prefix_injection"] == {"en"}
    for p in probes:
        if p.kind == "translation":
            assert LANGUAGES[p.lang] in p.prompt_text


def test_retain_probes_all_kinds(world):
    ps = retain_probes(world["retain"], world["entities"], per_kind=24, seed=0)
    assert tuple(kind_counts(ps)) == PROBE_KINDS and all(v == 24 for v in kind_counts(ps).values())
    retain = {e["name"] for e in world["entities"] if e["split"] == "retain"}
    assert all(p.entity in retain for p in ps)
    for p in ps:
        if p.kind not in ("multiple_choice", "reverse_query"):
            assert not p.leaked(p.prompt_text)


def test_probe_is_a_plain_record():
    p = Probe("spell", [{"role": "user", "content": "q"}], "Paris", "France", "capital", "It is Paris.")
    assert p.accept == () and p.choice is None and p.lang == "en"
    assert p.leaked("P-A-R-I-S") and not p.leaked("Rome")
