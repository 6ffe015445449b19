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
    (``module:function``) is imported instead, and without it
    :func:`policy_store_resolver` reads the policy store.
    """
    global _resolver
    _resolver = fn


def _get_resolver() -> TargetResolver | None:
    if _resolver is not None:
        return _resolver
    from guardserve import config

    spec = config.get("GUARDSERVE_TARGET_RESOLVER")
    if not spec:
        return policy_store_resolver
    mod, _, name = spec.partition(":")
    return getattr(importlib.import_module(mod), name)


_store = None
_phrases_by_version: dict[tuple[str, int | None], list[str]] = {}


def policy_store_resolver(targets: list) -> list[str]:
    """The default: each target's forbidden phrases from the policy store
    (``$GUARDSERVE_DB``), as ``guardserve.classifiers.retrieval`` derives them; cached
    per (id, version), so a new version of a target is read again."""
    global _store
    from guardserve.classifiers.retrieval import forbidden_phrases
    from guardserve.policy import open_store

    if _store is None:
        _store = open_store()
    out: list[str] = []
    for t in targets:
        tid, version = (t.get("id"), t.get("version")) if isinstance(t, dict) else (str(t), None)
        key = (tid, version)
        if key not in _phrases_by_version:
            _phrases_by_version[key] = forbidden_phrases(_store.get(tid))
        out.extend(_phrases_by_version[key])
    return out


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
        if not all(isinstance(t, (str, dict)) for t in targets):
            raise ValueError(f"{TARGETS} must list target ids or {{'id', 'version'}} objects")
        if resolve and targets:
            try:
                phrases.extend(_get_resolver()(targets))
            except Exception as e:  # unknown target, store down: the caller fails closed
                raise ValueError(f"could not resolve {TARGETS} {targets!r}: {e}") from e
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
