"""The demo world generator: determinism, splits, formats, no fact across the split."""

import json
import re

import pytest

from guardserve.demo.model import QUESTION_FRAMES, training_texts
from guardserve.demo.world import ATTRIBUTES, TEMPLATES, biographies, build_world


@pytest.fixture(scope="module")
def w():
    return build_world(seed=0)


def test_deterministic_from_seed(w):
    assert json.dumps(build_world(seed=0)) == json.dumps(w)
    other = build_world(seed=1)
    assert [e["name"] for e in other["entities"]] != [e["name"] for e in w["entities"]]


def test_sizes_and_split(w):
    ents = w["entities"]
    assert len(ents) >= 200
    forget = [e for e in ents if e["split"] == "forget"]
    assert len(forget) == round(0.1 * len(ents))
    assert {e["split"] for e in ents} == {"forget", "retain"}
    assert len({e["name"] for e in ents}) == len(ents)
    assert len({e["aliases"][1] for e in ents}) == len(ents), "surnames are unique"
    for e in ents:
        assert len(e["facts"]) >= 8 and set(e["facts"]) == set(ATTRIBUTES)
        full, surname, initials, short = e["aliases"]
        assert full == e["name"] and full.endswith(" " + surname)
        assert initials == f"{full[0]}. {surname}" and re.fullmatch(r"[A-Z]\.[A-Z]\.", short)


def test_qa_format(w):
    forget_names = {e["name"] for e in w["entities"] if e["split"] == "forget"}
    assert len(w["forget"]) == len(forget_names) * len(ATTRIBUTES)
    assert {p["entity"] for p in w["forget"]} == forget_names
    assert not forget_names & {p["entity"] for p in w["retain"]}
    for pair in w["forget"] + w["retain"] + w["world_facts"]:
        assert set(pair) >= {"entity", "question", "answer", "paraphrased_question", "perturbed_answer"}
        assert pair["value"] in pair["answer"]
        assert len(pair["perturbed_answer"]) == 3
        assert pair["answer"] not in pair["perturbed_answer"] and len(set(pair["perturbed_answer"])) == 3
        assert pair["question"] == pair["train_questions"][0] and len(pair["train_questions"]) >= 2
        assert pair["paraphrased_question"] not in pair["train_questions"]
    assert len(w["world_facts"]) >= 30


def test_no_fact_value_crosses_the_split(w):
    values = {"forget": set(), "retain": set()}
    for e in w["entities"]:
        values[e["split"]] |= {v.lower() for v in e["facts"].values()}
    assert not values["forget"] & values["retain"]
    # Nor does a forget value hide inside a retain answer (e.g. a town inside a longer one).
    retain_text = " ".join(p["answer"].lower() for p in w["retain"])
    assert not [v for v in values["forget"] if v in retain_text]


def test_paraphrases_are_never_trained_on(w):
    corpus = training_texts(w, include_forget=True)
    corpus_text = "\n".join(corpus)
    for tpl in TEMPLATES.values():
        frame = tpl.paraphrase.split("{name}")[0]
        assert frame not in corpus_text, f"paraphrase frame {frame!r} leaks into training"
        assert all(not f.startswith(frame) for f in QUESTION_FRAMES)
    for pair in w["forget"][:40]:
        assert pair["paraphrased_question"] not in corpus_text


def test_biographies_state_every_fact(w):
    ent = w["entities"][0]
    for bio in biographies(ent):
        for value in ent["facts"].values():
            assert value in bio


def test_perturbed_answers_state_values_no_model_was_trained_on(w):
    """TOFU's perturbed answers are wrong answers no model saw: here fresh values, nobody's in
    the world, so the retain model knows neither side of a forget item's truth ratio.
    Occupations come from a closed list: one of the split's own pool (for a forget item, one
    the retain model never saw either)."""
    everyone = {v.lower() for e in w["entities"] for v in e["facts"].values()}
    split_of = {e["name"]: e["split"] for e in w["entities"]}
    occupations = {s: {e["facts"]["occupation"] for e in w["entities"] if e["split"] == s} for s in ("forget", "retain")}
    for pair in w["forget"] + w["retain"]:
        template = TEMPLATES[pair["attribute"]].answer
        prefix, suffix = template.split("{value}")
        for wrong in pair["perturbed_answer"]:
            value = wrong[len(pair["answer"].split(pair["value"])[0]):len(wrong) - len(pair["answer"].split(pair["value"])[-1])]
            assert wrong.replace(value, pair["value"]) == pair["answer"], (wrong, pair["answer"])
            if pair["attribute"] == "occupation":
                other = "retain" if split_of[pair["entity"]] == "forget" else "forget"
                assert value not in occupations[other] and value != pair["value"], (pair["entity"], value)
            else:
                assert value.lower() not in everyone, (pair["entity"], pair["attribute"], value)
        assert prefix or suffix


def test_membership_inference_texts(w):
    """Members are the forget people's biographies, exactly as the model trains on them;
    non-members are as many biographies of people made the same way whom nobody trains on:
    their names and fact values are nobody's in the world."""
    forget = [e for e in w["entities"] if e["split"] == "forget"]
    assert w["mia"]["members"] == [b for e in forget for b in biographies(e)]
    assert len(w["mia"]["nonmembers"]) == len(w["mia"]["members"])
    trained = " ".join(training_texts(w, include_forget=True)).lower()
    surnames = {e["aliases"][1].lower() for e in w["entities"]}
    for text in w["mia"]["nonmembers"]:
        name = text.split(" is a ")[0].split(",")[0]
        assert name.split(" ", 1)[1].lower() not in surnames and name.lower() not in trained, name
    assert not set(w["mia"]["nonmembers"]) & set(training_texts(w, include_forget=True))
