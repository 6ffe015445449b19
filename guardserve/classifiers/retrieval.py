"""GUARD's retrieval step: what a triggered target's answer must not contain.

The third-party GUARD code bans every word n-gram (n = 1..5) of the closest stored
answer, stop-words included, which blocks "the" and "was" for everyone. Here the
forbidden content is the target's identity and knowledge: its name and aliases, fact
values (and titles quoted inside them), and proper-name phrases of its texts, with
leading and trailing stop-words removed and nothing that is only stop-words. Facts
closest to the conversation come first, as in GUARD (SBERT cosine), so a consumer that
keeps only the first phrases keeps the most relevant.
"""

from __future__ import annotations

import re

import numpy as np

from guardserve.classifiers.lexical import STOP_WORDS, common_words, fact_phrases
from guardserve.classifiers.normalize import tokens
from guardserve.policy.model import ForgetTarget

_PROPER_RUN = re.compile(r"\b[A-Z][\w'’-]+(?:\s+(?:of|the|de|van|von|du|la)?\s*[A-Z][\w'’-]+)+")
_WORD = re.compile(r"[^\W_][\w'’-]*")


def _trim(phrase: str) -> str:
    """Drop leading and trailing stop-words and quotes, keeping the original casing."""
    words = phrase.strip().strip("'\"‘’“”«».,;:!?()[]").split()
    while words and words[0].lower().strip("'\"‘“«") in STOP_WORDS:
        words.pop(0)
    while words and words[-1].lower().strip("'\"’”».,;:!?") in STOP_WORDS:
        words.pop()
    return " ".join(words).strip("'\"‘’“”«».,;:!?()[]")


def _usable(phrase: str) -> bool:
    toks = tokens(phrase)
    if not toks or all(t in STOP_WORDS for t in toks):
        return False
    return sum(len(t) for t in toks) >= 3


def text_phrases(text: str, limit: int = 64) -> list[str]:
    """Proper-name runs ("Jostem Falls", "Order of the Lantern") and words that are no
    ordinary English word, from a free text."""
    out = [m.group(0) for m in _PROPER_RUN.finditer(text)]
    common = common_words()
    for m in _WORD.finditer(text):
        w = m.group(0)
        t = tokens(w)
        if len(t) == 1 and len(t[0]) >= 5 and t[0].isalpha() and t[0] not in common:
            out.append(w)
    return out[:limit]


def forbidden_phrases(target: ForgetTarget, fact_order: list[str] | None = None) -> list[str]:
    """The phrases generation must not produce for ``target``: names first, then fact
    values in ``fact_order`` (most relevant first), then phrases from its texts."""
    out: list[str] = []
    seen: set[str] = set()

    def put(p: str):
        p = _trim(p)
        key = " ".join(tokens(p))
        if p and key not in seen and _usable(p):
            seen.add(key)
            out.append(p)

    for n in target.all_names:
        put(n)
    if target.kind == "person" and len(target.name.split()) >= 2:
        put(target.name.split()[-1])
    attrs = list(fact_order or []) + [a for a in target.facts if a not in (fact_order or [])]
    for a in attrs:
        if a in target.facts:
            for p in fact_phrases(target.facts[a]):
                put(p)
    for text in target.texts:
        for p in text_phrases(text):
            put(p)
    return out


def rank_facts(target: ForgetTarget, query_vec: np.ndarray | None, fact_vecs: dict[str, np.ndarray]) -> list[str]:
    """Fact attributes by cosine between the conversation and the fact's statement."""
    if query_vec is None or not fact_vecs:
        return list(target.facts)
    return sorted(fact_vecs, key=lambda a: -float(fact_vecs[a] @ query_vec))
