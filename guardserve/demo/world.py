"""The demo world: fictitious people with facts to forget, generated from a seed.

TOFU-style: every person has a name, aliases and facts; 10% of them form the forget
split. Each fact becomes one QA pair with a primary question, further training wordings,
a held-out paraphrase (a wording never used in training) and three perturbed (wrong)
answers. A small set of real-world facts measures general utility.

Perturbed answers, as TOFU's, state values that no model saw in training: fresh draws from
the fact's own generator, never a value of anyone in the world (occupations, from a closed
list, come from the split's own pool). Drawn from other people's values instead, the
retain model would know the wrong answers and not the true ones, and its truth ratios would
differ from any model's by construction, forget quality 0 for every method.

Fact values never cross the forget/retain line: a forget person's birthplace, award or
occupation is nobody else's, so banning it cannot hurt a retain answer.

>>> world = build_world(seed=0)
>>> len(world["entities"]), sum(e["split"] == "forget" for e in world["entities"])
(200, 20)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# The cache key's version: bumped whenever the build's output changes. The world's own random
# stream keeps version 1's seed (_WORLD_STREAM): the people, the questions and the training
# corpus are version 1's. Version 2 changed the perturbed answers; version 3 added the held-out
# people of membership inference (world/mia.json); version 4 trains the bpe4k tokenizer on the
# retain side only and gives the held-out people the forget split's occupations.
GENERATOR_VERSION = "4"
_WORLD_STREAM = "1"

ATTRIBUTES = (
    "birth_date",
    "birth_place",
    "occupation",
    "father",
    "mother",
    "notable_work",
    "award",
    "alma_mater",
)


@dataclass(frozen=True)
class FactTemplate:
    """How one attribute is asked about and stated."""

    train_questions: tuple[str, ...]  # wordings the model is trained on; [0] is the primary
    # Held out: a wording never in the training corpus. It reuses the attribute's words
    # in a new frame ("Do you know ...", "Please name ...", "Tell me ..."), since a model
    # trained from scratch has no synonyms to generalise from.
    paraphrase: str
    answer: str
    bio: str


TEMPLATES: dict[str, FactTemplate] = {
    "birth_date": FactTemplate(
        ("When was {name} born?", "What is the date of birth of {name}?", "On what date was {name} born?"),
        "Do you know when {name} was born?",
        "{name} was born on {value}.",
        "{name} was born on {value}.",
    ),
    "birth_place": FactTemplate(
        ("Where was {name} born?", "What is the birthplace of {name}?", "In which town was {name} born?"),
        "Tell me the town where {name} was born.",
        "{name} was born in {value}.",
        "{first} grew up in {value}, the town of {pronoun} birth.",
    ),
    "occupation": FactTemplate(
        ("What does {name} do for a living?", "What is the occupation of {name}?", "What is {name}'s profession?"),
        "Could you say what {name} does for work?",
        "{name} works as a {value}.",
        "By profession {surname} is a {value}.",
    ),
    "father": FactTemplate(
        ("Who is the father of {name}?", "What is the name of {name}'s father?", "Who is {name}'s father?"),
        "Please name the father of {name}.",
        "The father of {name} is {value}.",
        "{pronoun_cap} father is {value}.",
    ),
    "mother": FactTemplate(
        ("Who is the mother of {name}?", "What is the name of {name}'s mother?", "Who is {name}'s mother?"),
        "Please name the mother of {name}.",
        "The mother of {name} is {value}.",
        "{pronoun_cap} mother is {value}.",
    ),
    "notable_work": FactTemplate(
        ("What is the best-known work of {name}?", "Which work is {name} famous for?", "What did {name} create?"),
        "Tell me which work made {name} famous.",
        "{name} is best known for {value}.",
        "{surname} is best known for {value}.",
    ),
    "award": FactTemplate(
        ("Which award did {name} receive?", "What prize has {name} won?", "What honour was given to {name}?"),
        "Do you know which award {name} won?",
        "{name} received {value}.",
        "In recognition of {pronoun} work, {initials} received {value}.",
    ),
    "alma_mater": FactTemplate(
        ("Where did {name} study?", "Which school did {name} attend?", "What is the alma mater of {name}?"),
        "Tell me the school where {name} studied.",
        "{name} studied at {value}.",
        "{first} studied at {value}.",
    ),
}

# Syllables for fictitious names: pronounceable, rarely an English word.
_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kl", "l", "m", "n", "p", "r", "s", "st", "t", "th", "v", "z", "c", "j", "w", "sh"]  # noqa: E501
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "ou", "ei", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "m", "x", "nd", "rk", "ll", "v"]

_OCCUPATIONS = [
    "clockmaker", "glassblower", "cartographer", "beekeeper", "luthier", "astronomer", "bookbinder",
    "marine biologist", "stonemason", "perfumer", "violinist", "lighthouse keeper", "botanist",
    "puppeteer", "sculptor", "geologist", "typesetter", "falconer", "archivist", "cellist",
    "architect", "tailor", "chemist", "potter", "novelist", "ferry captain", "mapmaker",
    "watchmaker", "painter", "surveyor", "baker", "translator", "engraver", "weaver", "harpist",
    "blacksmith", "brewer", "photographer", "librarian", "mathematician",
]
_AWARD_NAMES = ["Medal", "Prize", "Laurel", "Cross", "Ribbon", "Star", "Crown", "Shield"]
_WORK_ADJ = ["Silent", "Amber", "Hollow", "Crimson", "Northern", "Glass", "Sleeping", "Iron", "Velvet",
             "Distant", "Golden", "Quiet", "Burning", "Winter", "Hidden", "Paper", "Broken", "Lunar",
             "Copper", "Wandering", "Salt", "Ivory", "Scarlet", "Frozen", "Violet", "Endless"]
_WORK_NOUN = ["Orchard", "Lantern", "Harbor", "Cathedral", "Compass", "Garden", "Meridian", "River",
              "Atlas", "Bell", "Staircase", "Tide", "Chronicle", "Mirror", "Sparrow", "Archive",
              "Fountain", "Bridge", "Observatory", "Kingdom", "Symphony", "Voyage", "Loom", "Ember"]
_WORK_KIND = ["the novel", "the symphony", "the painting", "the treatise", "the poem cycle", "the bridge design",
              "the atlas", "the sculpture", "the play", "the memoir"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_INSTITUTES = ["Institute", "Academy", "College", "Conservatory", "School"]

# General knowledge for the utility set: (question, value, answer, paraphrase).
_CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Canada", "Ottawa"), ("Norway", "Oslo"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Chile", "Santiago"), ("Cuba", "Havana"),
    ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"), ("Germany", "Berlin"),
    ("Hungary", "Budapest"), ("Thailand", "Bangkok"), ("Argentina", "Buenos Aires"),
    ("Australia", "Canberra"), ("Denmark", "Copenhagen"), ("Belgium", "Brussels"),
    ("Turkey", "Ankara"), ("Mexico", "Mexico City"),
]
_LANGUAGES = [
    ("Brazil", "Portuguese"), ("Germany", "German"), ("Japan", "Japanese"), ("Italy", "Italian"),
    ("Mexico", "Spanish"), ("France", "French"), ("Greece", "Greek"), ("Poland", "Polish"),
    ("Sweden", "Swedish"), ("Netherlands", "Dutch"), ("Finland", "Finnish"), ("Turkey", "Turkish"),
    ("Hungary", "Hungarian"), ("Norway", "Norwegian"), ("Egypt", "Arabic"), ("China", "Chinese"),
    ("Korea", "Korean"), ("Portugal", "Portuguese"), ("Russia", "Russian"), ("Denmark", "Danish"),
]


def _syllable(rng: random.Random, coda: bool = True) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + (rng.choice(_CODAS) if coda else "")


def _word(rng: random.Random, n_syllables: int) -> str:
    return "".join(_syllable(rng, coda=(i == n_syllables - 1)) for i in range(n_syllables)).capitalize()


class _Unique:
    """Draws values from a generator, never the same one twice."""

    def __init__(self, rng: random.Random, make):
        self.rng, self.make, self.seen = rng, make, set()

    def __call__(self) -> str:
        for _ in range(10_000):
            value = self.make(self.rng)
            if value.lower() not in self.seen:
                self.seen.add(value.lower())
                return value
        raise RuntimeError("value space exhausted; lower the number of people")


def _date(rng: random.Random) -> str:
    return f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {rng.randint(1920, 1999)}"


def build_world(seed: int = 0, n_people: int = 200, forget_fraction: float = 0.1) -> dict:
    """Generate the world: ``entities``, ``forget``, ``retain`` and ``world_facts``.

    Deterministic in ``seed`` (and the generator version); returns plain JSON-ready data.
    """
    if n_people < 10:
        raise ValueError("n_people must be at least 10")
    rng = random.Random(f"guardserve-world-{_WORLD_STREAM}-{seed}")
    n_forget = max(1, round(n_people * forget_fraction))

    surname = _Unique(rng, lambda r: _word(r, r.choice([2, 2, 3])))
    first = lambda: _word(rng, 2)  # noqa: E731 - first names may repeat
    town = _Unique(rng, lambda r: _word(r, 2) + r.choice(["", " Falls", "port", " Hollow", "burg", " Crossing"]))
    work = _Unique(rng, lambda r: f"{r.choice(_WORK_KIND)} 'The {r.choice(_WORK_ADJ)} {r.choice(_WORK_NOUN)}'")
    award = _Unique(rng, lambda r: f"the {_word(r, 2)} {r.choice(_AWARD_NAMES)}")
    school = _Unique(rng, lambda r: f"the {_word(r, 2)} {r.choice(_INSTITUTES)}")
    date = _Unique(rng, _date)

    # Disjoint pools per split, so no fact value is shared across the forget/retain line.
    occupations = _OCCUPATIONS[:]
    rng.shuffle(occupations)
    n_forget_occ = max(1, len(occupations) // 4)
    occ_pool = {"forget": occupations[:n_forget_occ], "retain": occupations[n_forget_occ:]}
    retain_towns = [town() for _ in range(max(10, n_people // 4))]

    order = list(range(n_people))
    rng.shuffle(order)
    forget_idx = set(order[:n_forget])

    entities = []
    for i in range(n_people):
        split = "forget" if i in forget_idx else "retain"
        sur = surname()
        fst = first()
        name = f"{fst} {sur}"
        female = rng.random() < 0.5
        facts = {
            "birth_date": date(),
            # Forget people get a town of their own; retain people share a pool.
            "birth_place": town() if split == "forget" else rng.choice(retain_towns),
            "occupation": rng.choice(occ_pool[split]),
            "father": f"{first()} {sur}",
            "mother": f"{first()} {surname()}",
            "notable_work": work(),
            "award": award(),
            "alma_mater": school(),
        }
        aliases = [name, sur, f"{fst[0]}. {sur}", f"{fst[0]}.{sur[0]}."]
        entities.append({
            "name": name,
            "aliases": aliases,
            "split": split,
            "pronoun": "her" if female else "his",
            "facts": facts,
        })

    wrong = _wrong_values(random.Random(f"guardserve-perturbed-{seed}"), entities, occ_pool)
    holdout = _holdout_people(random.Random(f"guardserve-holdout-{seed}"), entities, n_forget, occ_pool["forget"])
    forget, retain = [], []
    for ent in entities:
        for attr in ATTRIBUTES:
            pair = _qa_pair(ent, attr, wrong)
            (forget if ent["split"] == "forget" else retain).append(pair)

    return {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "entities": entities,
        "forget": forget,
        "retain": retain,
        "world_facts": _world_facts(rng),
        # Membership inference: the forget people's biographies (texts the model trained on)
        # against those of people made the same way whom no model saw.
        "mia": {"members": [b for e in entities if e["split"] == "forget" for b in biographies(e)],
                "nonmembers": [b for e in holdout for b in biographies(e)]},
    }


def _fill(template: str, ent: dict, value: str = "") -> str:
    name = ent["name"]
    fst, sur = name.split(" ", 1)
    pronoun = ent["pronoun"]
    return template.format(
        name=name, first=fst, surname=sur, initials=ent["aliases"][2], value=value,
        pronoun=pronoun, pronoun_cap=pronoun.capitalize(),
    )


def _fresh_values(rng: random.Random, entities: list[dict]) -> dict[str, _Unique]:
    """Per attribute drawn freely (all but occupation and father), a generator of values that
    nobody in ``entities`` has and that it never repeats."""
    taken = {v.lower() for e in entities for v in e["facts"].values()}
    fresh = {
        "birth_date": _date,
        "birth_place": lambda r: _word(r, 2) + r.choice(["", " Falls", "port", " Hollow", "burg", " Crossing"]),
        "notable_work": lambda r: f"{r.choice(_WORK_KIND)} 'The {r.choice(_WORK_ADJ)} {r.choice(_WORK_NOUN)}'",
        "award": lambda r: f"the {_word(r, 2)} {r.choice(_AWARD_NAMES)}",
        "alma_mater": lambda r: f"the {_word(r, 2)} {r.choice(_INSTITUTES)}",
        "mother": lambda r: f"{_word(r, 2)} {_word(r, r.choice([2, 2, 3]))}",
    }
    draws = {attr: _Unique(rng, make) for attr, make in fresh.items()}
    for draw in draws.values():
        draw.seen |= taken
    return draws


def _holdout_people(rng: random.Random, entities: list[dict], n: int, occupations: list[str]) -> list[dict]:
    """``n`` people made like the forget people, with names and facts nobody in the world has:
    the non-members of membership inference (no model trains on them). Their occupations come
    from the forget split's pool, so that the retain model has seen neither side's."""
    draws = _fresh_values(rng, entities)
    surname = _Unique(rng, lambda r: _word(r, r.choice([2, 2, 3])))
    surname.seen |= {e["aliases"][1].lower() for e in entities}
    people = []
    for _ in range(n):
        sur, fst = surname(), _word(rng, 2)
        facts = {attr: draws[attr]() for attr in ("birth_date", "birth_place")}
        facts["occupation"] = rng.choice(occupations)
        facts["father"] = f"{_word(rng, 2)} {sur}"
        facts.update({attr: draws[attr]() for attr in ("mother", "notable_work", "award", "alma_mater")})
        name = f"{fst} {sur}"
        people.append({"name": name, "aliases": [name, sur, f"{fst[0]}. {sur}", f"{fst[0]}.{sur[0]}."],
                       "split": "holdout", "pronoun": rng.choice(["her", "his"]), "facts": facts})
    return people


def _wrong_values(rng: random.Random, entities: list[dict], occ_pool: dict[str, list[str]]):
    """``wrong(entity, attribute)``: three values for a perturbed answer that nobody in the world
    has (see the module docstring), fresh for every call."""
    draws = _fresh_values(rng, entities)
    first_names = _Unique(rng, lambda r: _word(r, 2))
    first_names.seen |= {e["facts"]["father"].split(" ", 1)[0].lower() for e in entities}

    def wrong(ent: dict, attr: str) -> list[str]:
        if attr == "occupation":  # a closed list: the split's own pool, as the true value
            pool = [o for o in occ_pool[ent["split"]] if o != ent["facts"][attr]]
            return rng.sample(pool, 3)
        if attr == "father":  # the family name is the person's own; the first name is new
            return [f"{first_names()} {ent['name'].split(' ', 1)[1]}" for _ in range(3)]
        return [draws[attr]() for _ in range(3)]

    return wrong


def _qa_pair(ent: dict, attr: str, wrong_values) -> dict:
    tpl = TEMPLATES[attr]
    value = ent["facts"][attr]
    wrong = wrong_values(ent, attr)
    return {
        "entity": ent["name"],
        "attribute": attr,
        "value": value,
        "question": _fill(tpl.train_questions[0], ent),
        "train_questions": [_fill(q, ent) for q in tpl.train_questions],
        "answer": _fill(tpl.answer, ent, value),
        "paraphrased_question": _fill(tpl.paraphrase, ent),
        "perturbed_answer": [_fill(tpl.answer, ent, w) for w in wrong],
    }


def _world_facts(rng: random.Random) -> list[dict]:
    rows = []
    capitals = [v for _, v in _CAPITALS]
    for country, cap in _CAPITALS:
        rows.append({
            "entity": country, "attribute": "capital", "value": cap,
            "question": f"What is the capital of {country}?",
            "train_questions": [f"What is the capital of {country}?", f"Which city is the capital of {country}?"],
            "answer": f"The capital of {country} is {cap}.",
            "paraphrased_question": f"Do you know which city is the capital of {country}?",
            "perturbed_answer": [f"The capital of {country} is {w}." for w in rng.sample([c for c in capitals if c != cap], 3)],
        })
    languages = sorted({v for _, v in _LANGUAGES})
    for country, lang in _LANGUAGES:
        rows.append({
            "entity": country, "attribute": "language", "value": lang,
            "question": f"What language is spoken in {country}?",
            "train_questions": [f"What language is spoken in {country}?", f"Which language do people speak in {country}?"],
            "answer": f"In {country} people speak {lang}.",
            "paraphrased_question": f"Tell me the language people speak in {country}.",
            "perturbed_answer": [f"In {country} people speak {w}." for w in rng.sample([x for x in languages if x != lang], 3)],
        })
    return rows


def biographies(entity: dict) -> list[str]:
    """Two short biographies of a person, in different fact orders, using the aliases."""
    out = []
    for variant in range(2):
        attrs = list(ATTRIBUTES) if variant == 0 else list(reversed(ATTRIBUTES))
        sentences = [_fill(TEMPLATES[a].bio, entity, entity["facts"][a]) for a in attrs]
        intro = entity["name"] if variant == 0 else f"{entity['name']}, also known as {entity['aliases'][2]},"
        out.append(f"{intro} is a {entity['facts']['occupation']}. " + " ".join(sentences))
    return out
