"""Per-request activation: what ``SamplingParams.extra_args`` / ``vllm_xargs`` carry.

Flat values only (``vllm_xargs`` accepts nothing else); lists travel as JSON strings.

==============================  ====================================================
key                             value
==============================  ====================================================
``guardserve_phrases``          JSON list of forbidden phrases (a Python list is
                                accepted too when ``SamplingParams`` is built in
                                Python)
``guardserve_targets``          JSON list of target ids (or ``{"id", "version"}``),
                                turned into phrases by the registered resolver
``guardserve_semantic``         ``true``/``1``: also apply the semantic penalty
``guardserve_sem_threshold``    similarity at or above which a token is banned
                                (default 0.5, GUARD)
``guardserve_sem_weight``       weight of the similarity subtracted below it
                                (default 1.0)
==============================  ====================================================

A request carrying none of these keys is not guarded (its row is never touched).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

logger = logging.getLogger("guardserve.logits")

PHRASES = "guardserve_phrases"
TARGETS = "guardserve_targets"
SEMANTIC = "guardserve_semantic"
SEM_THRESHOLD = "guardserve_sem_threshold"
SEM_WEIGHT = "guardserve_sem_weight"

TargetResolver = Callable[[list], list[str]]
_resolver: TargetResolver | None = None


def register_target_resolver(fn: TargetResolver | None) -> None:
    """Set how ``guardserve_targets`` become phrases (``fn(targets) -> phrases``).

    In engine processes that did not call this, ``$GUARDSERVE_TARGET_RESOLVER``
    (``module:function``) is imported instead.
    """
    global _resolver
    _resolver = fn


def _get_resolver() -> TargetResolver | None:
    if _resolver is not None:
        return _resolver
    spec = os.environ.get("GUARDSERVE_TARGET_RESOLVER")
    if not spec:
        return None
    mod, _, name = spec.partition(":")
    return getattr(importlib.import_module(mod), name)


@dataclass(frozen=True)
class GuardRequest:
    phrases: tuple[str, ...]
    semantic: bool = False
    sem_threshold: float = 0.5
    sem_weight: float = 1.0


def _json_list(value, key: str) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        try:
            v = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{key} must be a JSON list: {e}") from e
        if isinstance(v, list):
            return v
    raise ValueError(f"{key} must be a JSON list (a string), got {type(value).__name__}")


def _flag(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def parse_request(extra_args: Mapping | None, resolve: bool = True) -> GuardRequest | None:
    """The guard a request asks for, or None. Raises ``ValueError`` on bad input.

    ``resolve=False`` validates without calling the target resolver (frontend).
    """
    if not extra_args or (PHRASES not in extra_args and TARGETS not in extra_args):
        return None
    phrases: list[str] = []
    if PHRASES in extra_args:
        ps = _json_list(extra_args[PHRASES], PHRASES)
        if not all(isinstance(p, str) for p in ps):
            raise ValueError(f"{PHRASES} must be a list of strings")
        phrases.extend(ps)
    if TARGETS in extra_args:
        targets = _json_list(extra_args[TARGETS], TARGETS)
        if resolve and targets:
            fn = _get_resolver()
            if fn is None:
                raise ValueError(
                    f"{TARGETS} given but no target resolver is registered "
                    "(register_target_resolver or $GUARDSERVE_TARGET_RESOLVER)")
            phrases.extend(fn(targets))
    try:
        thr = float(extra_args.get(SEM_THRESHOLD, 0.5))
        w = float(extra_args.get(SEM_WEIGHT, 1.0))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{SEM_THRESHOLD}/{SEM_WEIGHT} must be numbers") from e
    return GuardRequest(
        phrases=tuple(sorted({" ".join(p.split()) for p in phrases if p.strip()})),
        semantic=_flag(extra_args.get(SEMANTIC, False)),
        sem_threshold=thr,
        sem_weight=w,
    )
