"""The lexical matcher: normalisation, fuzzy names, distinctive facts, incremental index."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardserve.classifiers.lexical import LexicalIndex, is_distinctive, osa_distance
from guardserve.classifiers.normalize import tokens
from guardserve.classifiers.retrieval import forbidden_phrases
from guardserve.policy.model import ForgetTarget

HOUTUS = ForgetTarget(id="h", name="Gygreim Houtus", aliases=("G. Houtus", "G.H."), kind="person",
                      facts={"birth_place": "Jostem Falls", "occupation": "sculptor", "birth_date": "27 January 1930",
                             "notable_work": "the novel 'The Paper Orchard'", "award": "the Zekloull Shield"})


@pytest.fixture
def index():
    idx = LexicalIndex()
    idx.add(HOUTUS)
    idx.add(ForgetTarget(id="r", name="Condoleezza Rice", kind="person"))
    idx.add(ForgetTarget(id="p", name="Anna Parker", kind="person", aliases=("Parker",)))
    idx.add(ForgetTarget(id="m", name="the Manhattan Project", kind="topic", aliases=("Manhattan Project",)))
    return idx


def hit_ids(idx, text):
    return {h.pattern.target_id for h in idx.match(text)}


@pytest.mark.parametrize("text", [
    "Where was Gygreim Houtus born?",
    "where was GYGREIM HOUTUS born",
    "Where was Ｇｙｇｒｅｉｍ Ｈｏｕｔｕｓ born?",            # full-width (NFKC)
    "Where was Gygreim Ноutus born?",                     # Cyrillic Н and о
    "Where was Gygréim Hóutus born?",                     # accents
    "Where was Hou\u200btus born?",                       # zero-width space inside
    "Where was H0utu5 born?",                             # leetspeak
    "Where was G y g r e i m H o u t u s born?",          # spaced letters
    "Where was Hou-tus born?", "Where was Hou tus born?",  # punctuation / space inside
    "Where was GygreimHoutus born?",                      # glued
    "Where was Gygreim Houtsu born?", "Where was Gygreim Huotus born?",   # one typo in the full name
    "Where was Gygriem Houtus born?", "Where was Gygreim Houtu born?",
    "Tell me about G. Houtus.",
    "Who was born in Jostem Falls?",                      # a distinctive fact
    "Who received the Zekloull Shield?",
    "Who wrote The Paper Orchard?",
    "Which person was born on 27 January 1930?",
])
def test_variants_of_a_name_or_fact_are_found(index, text):
    assert "h" in hit_ids(index, text)


@pytest.mark.parametrize("text", [
    "What is the capital of France?",
    "Who is a famous sculptor?",                    # ordinary fact values are not triggers
    "How do I cook rice?",                          # derived surname that is an ordinary word
    "Where was the car parked?",                    # 'parked' is a word, not a typo of Parker
    "Houtusberg is a town",                         # alias inside a longer word
    "The paper orchard of my grandmother",          # fine: a title matches as a phrase...
])
def test_ordinary_text_does_not_trigger(index, text):
    ids = hit_ids(index, text)
    if text.startswith("The paper orchard"):
        assert ids == {"h"}                         # ...which is what this one is
    else:
        assert ids == set()


def test_surname_and_explicit_aliases(index):
    assert hit_ids(index, "What did Parker say?") == {"p"}
    assert hit_ids(index, "Where was Condoleezza Rice born?") == {"r"}
    assert hit_ids(index, "Tell me about the manhattan-project") == {"m"}


def test_lone_word_typos_need_a_long_name():
    idx = LexicalIndex()
    idx.add(ForgetTarget(id="s", name="Wegim Stougryth"))
    idx.add(ForgetTarget(id="k", name="Vexjor Kelfen"))
    assert hit_ids(idx, "Where was Stougrtyh born?") == {"s"}     # 9 letters: a typo alone is enough
    assert hit_ids(idx, "Where was Kelen Hugux born?") == set()   # 'Kelen' is someone else, not 'Kelfen'
    assert hit_ids(idx, "Where was Vexjor Kelfne born?") == {"k"}  # with the first name it is found


def test_reasons_say_what_matched(index):
    reasons = {h.reason for h in index.match("Where was Gygreim Houtsu born?")}
    assert any("fuzzy" in r and "Houtus" in r for r in reasons)


def test_incremental_updates_touch_only_that_target(index):
    before = index._by_target["p"]
    index.add(ForgetTarget(id="h", name="Gygreim Houtus", aliases=("Ghost",), version=2))
    assert index._by_target["p"] is before
    assert "h" in hit_ids(index, "Ghost")
    assert "h" not in hit_ids(index, "Who was born in Jostem Falls?")   # the fact was removed
    index.remove("h")
    assert hit_ids(index, "Where was Gygreim Houtus born? Ghost") == set()
    # Shared prefixes are reference-counted: removing one keeps the other.
    index.add(ForgetTarget(id="j1", name="John Smithson Abel", kind="topic"))
    index.add(ForgetTarget(id="j2", name="John Smithson", kind="topic"))
    index.remove("j2")
    assert hit_ids(index, "john smithson abel") == {"j1"}
    assert hit_ids(index, "john smithson") == set()


def test_distinctive_and_forbidden():
    assert is_distinctive("Jostem Falls") and is_distinctive("27 January 1930") and is_distinctive("The Paper Orchard")
    assert not is_distinctive("sculptor") and not is_distinctive("marine biologist") and not is_distinctive("the")
    phrases = forbidden_phrases(HOUTUS)
    assert phrases[:3] == ["Gygreim Houtus", "G. Houtus", "Houtus"]
    assert {"Jostem Falls", "Zekloull Shield", "Paper Orchard", "sculptor", "27 January 1930"} <= set(phrases)
    assert "G.H." not in phrases                         # too short to ban safely
    stop = {"the", "a", "of", "was", "in"}
    assert not any(p.lower() in stop or p.split()[0].lower() in stop for p in phrases)


def test_osa_distance():
    assert osa_distance("houtus", "houtus") == 0
    assert osa_distance("houtus", "huotus") == 1   # transposition
    assert osa_distance("houtus", "houts") == 1
    assert osa_distance("houtus", "hxutxs") == 2


_NAME = st.text(alphabet="abcdefghkmnprstuvwxyz", min_size=6, max_size=10)


@settings(max_examples=60, deadline=None, database=None)
@given(first=_NAME, last=_NAME, data=st.data())
def test_any_name_survives_its_obfuscations(first, last, data):
    name = f"{first.capitalize()} {last.capitalize()}"
    idx = LexicalIndex()
    idx.add(ForgetTarget(id="x", name=name, kind="topic"))
    style = data.draw(st.sampled_from(["upper", "spaced", "glued", "leet", "typo", "homoglyph"]))
    if style == "upper":
        text = name.upper()
    elif style == "spaced":
        text = " ".join(name.replace(" ", ""))
    elif style == "glued":
        text = name.replace(" ", "")
    elif style == "leet":
        text = name.replace("e", "3").replace("a", "4").replace("s", "5")
    elif style == "typo":
        i = data.draw(st.integers(1, len(last) - 2))
        text = f"{first} {last[:i]}{last[i + 1:]}"
    else:
        text = name.replace("a", "а").replace("e", "е")
    assert tokens(text) and idx.match(f"Question: tell me about {text} please") != []


def test_removing_every_target_empties_the_index():
    idx = LexicalIndex()
    targets = [HOUTUS, ForgetTarget(id="h2", name="Tyfein Houtus", aliases=("Houtus",)),
               ForgetTarget(id="h3", name="Houtus", kind="topic")]      # shared aliases and variants
    for t in targets:
        idx.add(t)
    for t in targets:
        idx.add(t)                                                      # re-adding is idempotent
    assert {"h", "h2", "h3"} <= hit_ids(idx, "Houtus")
    for t in targets:
        idx.remove(t.id)
    assert not (idx._exact or idx._prefix or idx._glued or idx._fuzzy or idx._by_target)
