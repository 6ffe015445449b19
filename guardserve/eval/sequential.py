"""Sequential deletions at scale (FIT, GS-LoRA): deletion requests arrive one after another, and
the guard must forget each new target while what it already forgot stays forgotten and
everything else keeps working, at a cost that stays flat as the policy grows.

The evaluation registers targets in steps (by default to 10, 100 and 1,000 targets): the data's
own targets first (the demo's 20 forget people, in order), then made-up people with facts of
their own (:func:`filler_targets`) that stand for the unrelated deletion requests a server
accumulates. After each step it asks, through the configuration (``guard`` by default), the
forget questions of the targets registered so far, the retain and world-fact questions, and
measures TPOT one request at a time: ``forget_accuracy`` (registered targets),
``pending_forget_accuracy`` (data targets not registered yet: they must still be answered),
``retain_accuracy``, ``world_accuracy``, ``tpot_ms``, ``detect_ms``.

>>> filler_targets(3, seed=0)[0]["name"]                              # doctest: +SKIP
'Vaeth Drulomir'
"""

from __future__ import annotations

import random

_ONSET = ["b", "br", "d", "dr", "f", "g", "k", "kl", "l", "m", "n", "p", "r", "s", "st", "t", "v", "z", "sh", "th"]
_VOWEL = ["a", "e", "i", "o", "u", "ae", "ou", "ei", "y"]
_CODA = ["", "", "n", "r", "l", "s", "m", "x", "nd", "rk"]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSET) + rng.choice(_VOWEL) + (rng.choice(_CODA) if i == syllables - 1 else "")
                   for i in range(syllables)).capitalize()


def filler_targets(n: int, seed: int = 0, taken: set[str] | None = None) -> list[dict]:
    """``n`` made-up people as target specs (``name``, ``aliases``, ``facts``), none of whose
    names is in ``taken`` (casefolded) or repeats: unrelated deletion requests that grow the
    policy. Their facts are made-up words, so they ban nothing a real answer needs."""
    rng = random.Random(f"guardserve-filler-{seed}")
    seen = {t.casefold() for t in taken or ()}
    out: list[dict] = []
    while len(out) < n:
        first, last = _word(rng, 2), _word(rng, rng.choice([2, 3]))
        name = f"{first} {last}"
        if name.casefold() in seen or last.casefold() in seen:
            continue
        seen |= {name.casefold(), last.casefold()}
        facts = {"birth_place": _word(rng, 2) + rng.choice([" Falls", "port", "burg"]),
                 "notable_work": f"the novel 'The {_word(rng, 2)} {_word(rng, 2)}'",
                 "award": f"the {_word(rng, 2)} Medal"}
        out.append({"name": name, "aliases": [last, f"{first[0]}. {last}"], "facts": facts})
    return out


def schedule(real: list[dict], steps: list[int], seed: int = 0) -> list[list[dict]]:
    """The specs registered at each step: step ``k`` brings the total to ``steps[k]``, the data's
    targets first, then fillers."""
    if sorted(steps) != list(steps) or not steps or steps[0] < 1:
        raise ValueError(f"steps must be increasing target counts, got {steps}")
    taken = {n for t in real for n in [t["name"], *t.get("aliases", [])]}
    pool = list(real) + filler_targets(max(0, steps[-1] - len(real)), seed, taken)
    out, done = [], 0
    for total in steps:
        out.append(pool[done:total])
        done = total
    return out
