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

For training-based unlearning the same question is asked of adapters
(:func:`sequential_adapters`): the forget people arrive as ``n`` deletion requests, and after
each one an adapter is trained either on that request alone, starting from the model the
previous requests left (their adapters merged into the weights: what a server that cannot
retrain does), or from the base model on the union of the requests so far (what retraining
costs); forget accuracy on every request so far, retain and world-fact accuracy after each.

>>> filler_targets(3, seed=0)[0]["name"]                              # doctest: +SKIP
'Vaeth Drulomir'
"""

from __future__ import annotations

import random
import time
from pathlib import Path

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


def deletion_requests(forget: list[dict], n: int) -> list[list[dict]]:
    """The forget rows as ``n`` deletion requests: the people in order of first appearance,
    dealt into ``n`` nearly equal groups, each request all rows of its people."""
    people = list(dict.fromkeys(it["entity"] for it in forget))
    if not 1 <= n <= len(people):
        raise ValueError(f"{n} deletion requests need between 1 and {len(people)} (the forget people)")
    groups = [people[i * len(people) // n:(i + 1) * len(people) // n] for i in range(n)]
    return [[it for it in forget if it["entity"] in set(g)] for g in groups]


def sequential_adapters(method, model_dir: str | Path, requests: list[list[dict]], retain: list[dict],
                        world: list[dict], work: str | Path, *, train_retain: list[dict] | None = None,
                        world_facts: list[dict] | None = None, probe_retain: int = 120, seed: int = 0,
                        overrides: dict | None = None, progress: bool = False, log=print) -> dict:
    """Adapters after each deletion request, trained one request at a time (``sequential``:
    request ``k`` alone, on the model requests ``1..k-1`` left, merged) and on the union
    (``union``: requests ``1..k`` from the base model). Each step reports, for both,
    ``forget_accuracy`` (every request so far), ``retain_accuracy`` and ``world_accuracy``
    (greedy chat answers, :func:`guardserve.textgen.accuracy`) and the training seconds."""
    from guardserve.textgen import accuracy
    from guardserve.unlearn import train_adapter

    work = Path(work)
    rng = random.Random(seed)
    probe = rng.sample(retain, min(probe_retain, len(retain)))
    current = str(model_dir)
    steps, so_far = [], []
    for k, request in enumerate(requests, start=1):
        so_far += request
        row: dict = {"requests": k, "forget_rows": len(so_far)}
        for mode, base, rows in (("sequential", current, request), ("union", str(model_dir), so_far)):
            started = time.perf_counter()
            result, _ = train_adapter(method, base, rows, train_retain if train_retain is not None else retain,
                                      work / f"{mode}-{k}", world_facts=world_facts,
                                      targets=sorted({it["entity"] for it in rows}), seed=seed,
                                      overrides=overrides, progress=progress)
            seconds = time.perf_counter() - started
            merged = result.model.merge_and_unload().eval()
            row[mode] = {"forget_accuracy": round(accuracy(merged, result.tokenizer, so_far), 4),
                         "retain_accuracy": round(accuracy(merged, result.tokenizer, probe), 4),
                         "world_accuracy": round(accuracy(merged, result.tokenizer, world), 4) if world else None,
                         "train_s": round(seconds, 1), "steps": result.steps}
            if mode == "sequential":  # the next request starts from this model
                folder = work / f"sequential-{k}-merged"
                merged.save_pretrained(folder)
                result.tokenizer.save_pretrained(folder)
                current = str(folder)
        steps.append(row)
        log(f"eval: sequential {method.name} adapters, request {k}/{len(requests)}: " + "; ".join(
            f"{m} forget {row[m]['forget_accuracy']:.3f} retain {row[m]['retain_accuracy']:.3f}"
            for m in ("sequential", "union")))
    return {"method": method.name, "requests": len(requests), "retain_probe": len(probe), "steps": steps}
