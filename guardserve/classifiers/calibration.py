"""Data for calibrating the embedding threshold, made from the policy itself.

Negatives are questions that must not trigger: everyday questions and, the hard part,
the same question shapes as the targets' facts asked about invented people who are not
targets ("Who is the mother of Brask Ulleroy?"), since an embedder scores "Who is the
mother of X" close to "Who is the mother of Y" whoever X and Y are. Positives are
questions about the targets that do not name them (those that do are the lexical
matcher's). The threshold keeps the false-positive rate on the negatives under a bound
and is stored with the policy.
"""

from __future__ import annotations

import random

import numpy as np

from guardserve.policy.model import ForgetTarget, name_key

GENERIC_QUESTIONS = [
    "What is the capital of Australia?", "How do I bake sourdough bread?", "Explain how photosynthesis works.",
    "What is the boiling point of water at sea level?", "Write a haiku about autumn leaves.",
    "How many legs does a spider have?", "Translate 'good morning' into Spanish.", "What causes the seasons?",
    "Who painted the Mona Lisa?", "What is the square root of 144?", "Recommend a good book about history.",
    "How do vaccines train the immune system?", "What is the difference between a virus and a bacterium?",
    "Summarise the plot of Romeo and Juliet.", "How do I reverse a list in Python?", "What is inflation?",
    "Give me three tips for a job interview.", "Why is the sky blue?", "How far is the Moon from Earth?",
    "What language is spoken in Brazil?", "Who wrote Pride and Prejudice?", "What is a prime number?",
    "How does a bicycle stay upright?", "Describe the water cycle.", "What is the tallest mountain in Africa?",
    "When did the Second World War end?", "How do I change a flat tyre?", "What is machine learning?",
    "Which planet is known as the red planet?", "What should I cook for dinner tonight?",
    "Tell me a joke about cats.", "What is the population of Canada?", "How do bees make honey?",
    "Who discovered penicillin?", "What are the rules of chess?", "How do I write a cover letter?",
    "What is the function of the heart?", "Explain the theory of relativity simply.",
    "What is the largest ocean on Earth?", "How do I stay motivated while studying?",
    # Person-shaped questions in ordinary words: no rare name to ground them, so only
    # the threshold keeps them from matching a target's facts.
    "Who was born in Paris?", "Who won the Nobel Prize in Physics last year?", "Which painter studied in Florence?",
    "Who is the mother of the current king?", "Who wrote the novel about the white whale?",
    "Which architect designed the bridge in our city?", "When was the first emperor born?",
    "Who received the gold medal in the marathon?", "Which composer wrote a famous symphony in the winter?",
    "Who is the father of modern physics?", "Where did the famous poet go to university?",
    "What does a clockmaker do?", "How do I become a sculptor?", "Which school is best for music?",
    "Who created the first printing press?", "Which scientist discovered radium?",
    "What award did the film win?", "Tell me about the history of the academy awards.",
    "Who was the first woman to fly across the Atlantic?", "Which writer is famous for detective stories?",
]

# Question shapes about a person, an attribute and a value; {name} is filled with an
# invented name for negatives, {value} with a target's fact for positives.
PERSON_QUESTIONS = [
    "Where was {name} born?", "When was {name} born?", "What does {name} do for a living?",
    "Who is the mother of {name}?", "Who is the father of {name}?", "Where did {name} study?",
    "Which award did {name} win?", "What is {name} best known for?", "Tell me about {name}.",
    "Can you write a short biography of {name}?", "What is the profession of {name}?",
    "Which school did {name} attend?", "Who are the parents of {name}?", "What did {name} create?",
    "Which prize was given to {name}?", "In which town did {name} grow up?",
    "Can you tell me where {name} comes from?", "Who raised {name}?", "How does {name} make money?",
    "Which university did {name} graduate from?", "What honours has {name} received?",
    "What is the date of birth of {name}?", "What work made {name} famous?", "Who was {name}'s mother?",
    "What is {name}'s job?", "Where did {name} go to school?", "Is {name} still alive?",
    "What is {name} doing these days?",
]
# The same questions asked about someone named in a sentence before: a window's sentences
# that name no one are read on their own too (``Detector._views``), so these must not fire.
FOLLOW_UPS = [
    "Where was {s} born?", "When was {s} born?", "Who is {p} mother?", "Who is {p} father?",
    "What does {s} do for a living?", "Which award did {s} win?", "Where did {s} study?", "What is {p} job?",
    "What is the date of birth?", "Which prize was given to {o}?", "What is {s} best known for?",
    "Which school did {s} attend?", "Where did {s} grow up?", "What is the profession?",
]
INTRODUCTIONS = ["I am reading about {name}.", "{name} is a friend of mine.", "A question about {name}:", "{name}?"]
REVERSE_QUESTIONS = [
    "Who has the {attr} {value}?", "Which person is associated with {value}?", "Tell me who is linked to {value}.",
    "Whose {attr} is {value}?", "I am thinking of someone whose {attr} is {value}. Who is it?",
]

_SYL_A = ["ka", "lo", "mir", "te", "van", "sol", "ri", "den", "bu", "ha", "nor", "ze", "qui", "pel", "ur", "ost"]
_SYL_B = ["rak", "men", "tis", "dor", "lin", "vay", "sek", "mon", "rud", "bel", "gan", "fur", "lox", "pim"]


def decoy_names(n: int, seed: int = 1) -> list[str]:
    """Invented full names (not drawn from any data set the targets come from)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        first = (rng.choice(_SYL_A) + rng.choice(_SYL_B)).capitalize()
        last = (rng.choice(_SYL_A) + rng.choice(_SYL_B) + rng.choice(["", "er", "sen", "ova", "is"])).capitalize()
        out.append(f"{first} {last}")
    return out


def negatives(n_people: int = 60, seed: int = 1) -> list[str]:
    out = list(GENERIC_QUESTIONS)
    rng = random.Random(seed)
    for k, name in enumerate(decoy_names(n_people, seed)):
        out += [q.format(name=name) for q in PERSON_QUESTIONS]
        s_, p_, o_ = (("he", "his", "him"), ("she", "her", "her"))[k % 2]
        for q in rng.sample(FOLLOW_UPS, 5):
            out.append(f"{rng.choice(INTRODUCTIONS).format(name=name)} {q.format(s=s_, p=p_, o=o_)}")
    return out


def positives(targets: list[ForgetTarget], per_target: int = 6, seed: int = 2) -> list[tuple[str, str]]:
    """(target id, question) pairs that describe a target without naming it. The same targets
    give the same questions in whatever order they come (a store lists them by their random
    ids), so calibrating the same policy twice reports the same recall."""
    rng = random.Random(seed)
    out = []
    for t in sorted(targets, key=lambda t: (name_key(t.name), t.tenant or "", t.created_at)):
        items = [(a.replace("_", " "), v) for a, v in t.facts.items()]
        rng.shuffle(items)
        for attr, value in items[:per_target]:
            out.append((t.id, rng.choice(REVERSE_QUESTIONS).format(attr=attr, value=value)))
        if t.description:
            out.append((t.id, f"Tell me about {t.description.rstrip('.')}."))
    return out


def choose_threshold(neg_scores: np.ndarray, max_fp: float = 0.005, floor: float = 0.6) -> float:
    """The lowest threshold whose false-positive rate on the negatives is at most max_fp."""
    if len(neg_scores) == 0:
        return max(floor, 0.8)
    s = np.sort(np.asarray(neg_scores, dtype=np.float64))[::-1]
    allowed = int(np.floor(max_fp * len(s)))
    # Strictly above the (allowed+1)-th highest negative.
    t = float(s[allowed]) + 1e-4 if allowed < len(s) else float(s[-1])
    return max(floor, t)
