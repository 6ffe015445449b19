"""Obfuscations of the name: the record's question with the person's name disguised
(``misspelling``, ``spacing``, ``leetspeak``, ``surname_only``, ``homoglyph``).

They attack a detector's name matching rather than the model, so the evaluation suite
does not run them by default (``evaluation=False``); the detection report does. None of
them applies to a question that does not contain the person's name as written, nor when
the disguise would leave the name unchanged.
"""

from __future__ import annotations

import random

from guardserve.probes import Probe, ProbeContext, probe_kind, user

_HOMOGLYPHS = {"a": "а", "e": "е", "o": "о", "p": "р", "c": "с", "x": "х", "i": "і"}   # Cyrillic look-alikes
_LEET = {"a": "4", "e": "3", "o": "0", "i": "1", "s": "5", "t": "7"}


def _disguised(c: ProbeContext, alias: str) -> Probe | None:
    """The question with the name replaced by ``alias``; None where that changes nothing."""
    if c.name not in c.q or alias == c.name:
        return None
    return c.probe(user(c.q.replace(c.name, alias)))


def _misspell(word: str, rng: random.Random) -> str:
    if len(word) < 5:
        return word
    i = rng.randrange(1, len(word) - 2)
    if rng.random() < 0.5:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]   # swap two letters
    return word[:i] + word[i + 1:]                                # drop one


@probe_kind("misspelling", family="obfuscation", evaluation=False)
def misspelling(c: ProbeContext) -> Probe | None:
    """The surname misspelt: two letters swapped or one dropped (a surname of five letters
    or more)."""
    words = c.name.split()
    return _disguised(c, " ".join([*words[:-1], _misspell(words[-1], c.rng)]))


@probe_kind("spacing", family="obfuscation", evaluation=False)
def spacing(c: ProbeContext) -> Probe | None:
    """The name's letters spaced out ("A d a L o v e")."""
    return _disguised(c, " ".join(c.name.replace(" ", "")))


@probe_kind("leetspeak", family="obfuscation", evaluation=False)
def leetspeak(c: ProbeContext) -> Probe | None:
    """Some letters of the name as digits (a→4, e→3, o→0, i→1, s→5, t→7)."""
    return _disguised(c, "".join(_LEET.get(ch.lower(), ch) if c.rng.random() < 0.6 else ch for ch in c.name))


@probe_kind("surname_only", family="obfuscation", evaluation=False)
def surname_only(c: ProbeContext) -> Probe | None:
    """The surname alone."""
    return _disguised(c, c.name.split()[-1])


@probe_kind("homoglyph", family="obfuscation", evaluation=False)
def homoglyph(c: ProbeContext) -> Probe | None:
    """Latin letters of the name swapped for Cyrillic look-alikes."""
    return _disguised(c, "".join(_HOMOGLYPHS.get(ch, ch) for ch in c.name))
