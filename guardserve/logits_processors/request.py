"""Per-request activation in the engine: the guard's plan read back from ``extra_args``.

The keys and their encoding are the request contract (:mod:`guardserve.contract`); this
module adds what only the engine does: ``guardserve_targets`` read as (id, version) pairs and
``guardserve_target_sets`` as set-part names (the engine loads their compiled parts; the
resolver turns targets into phrases only where a part must be compiled in the engine), and the
semantic penalty's parameters validated. A request carrying no phrases, targets nor sets is
not guarded (its row is never touched).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from guardserve.contract import PHRASES, SEM_THRESHOLD, SEM_WEIGHT, SEMANTIC, SETS, TARGETS, flag, json_list

logger = logging.getLogger("guardserve.logits")

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


def _get_resolver() -> TargetResolver:
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
        # str(): what the SQL stores do to the id anyway (a {"version": ...} without an id looks up "None" and fails)
        tid, version = (str(t.get("id")), t.get("version")) if isinstance(t, dict) else (str(t), None)
        key = (tid, version)
        if key not in _phrases_by_version:
            _phrases_by_version[key] = forbidden_phrases(_store.get(tid))
        out.extend(_phrases_by_version[key])
    return out


def resolve_targets(targets: list) -> list[str]:
    """The forbidden phrases of ``targets`` through the configured resolver (see
    :func:`register_target_resolver`). Raises ``ValueError`` when they cannot be resolved."""
    try:
        return list(_get_resolver()(targets))
    except Exception as e:  # unknown target, store down: the caller fails closed
        raise ValueError(f"could not resolve {TARGETS} {targets!r}: {e}") from e


def parse_targets(value) -> tuple[tuple[str, int | None], ...]:
    """``(id, version or None)`` of each entry of a ``guardserve_targets`` value."""
    targets = json_list(value, TARGETS)
    out: list[tuple[str, int | None]] = []
    for t in targets:
        if isinstance(t, str):
            out.append((t, None))
        elif isinstance(t, dict) and isinstance(t.get("id"), str):
            v = t.get("version")
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"{TARGETS}: a version must be an integer, got {v!r}")
            out.append((t["id"], v))
        else:
            raise ValueError(f"{TARGETS} must list target ids or {{'id', 'version'}} objects")
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class GuardRequest:
    """The guard one request asks for: phrases sent as such, targets (id, version) and set
    parts (many targets compiled as one), whose compiled parts the engine looks up
    (:class:`~.engine.FilterSource`)."""

    phrases: tuple[str, ...]
    semantic: bool = False
    sem_threshold: float = 0.5
    sem_weight: float = 1.0
    targets: tuple[tuple[str, int | None], ...] = ()
    sets: tuple[str, ...] = ()


def parse_request(extra_args: Mapping | None, resolve: bool = False) -> GuardRequest | None:
    """The guard a request asks for, or None. Raises ``ValueError`` on bad input.

    Targets are not resolved here (``resolve`` is kept for callers of the old signature):
    the engine looks up their compiled parts.
    """
    if not extra_args or (PHRASES not in extra_args and TARGETS not in extra_args and SETS not in extra_args):
        return None
    phrases: list[str] = []
    if PHRASES in extra_args:
        ps = json_list(extra_args[PHRASES], PHRASES)
        if not all(isinstance(p, str) for p in ps):
            raise ValueError(f"{PHRASES} must be a list of strings")
        phrases.extend(ps)
    targets = parse_targets(extra_args[TARGETS]) if TARGETS in extra_args else ()
    sets = json_list(extra_args[SETS], SETS) if SETS in extra_args else []
    if not all(isinstance(x, str) for x in sets):
        raise ValueError(f"{SETS} must list set-part names")
    try:
        thr = float(extra_args.get(SEM_THRESHOLD, 0.5))
        w = float(extra_args.get(SEM_WEIGHT, 1.0))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{SEM_THRESHOLD}/{SEM_WEIGHT} must be numbers") from e
    return GuardRequest(
        phrases=tuple(sorted({" ".join(p.split()) for p in phrases if p.strip()})),
        semantic=flag(extra_args.get(SEMANTIC, False)),
        sem_threshold=thr,
        sem_weight=w,
        targets=targets,
        sets=tuple(dict.fromkeys(sets)),
    )
