"""The request contract: how the guard's plan for one request reaches the engine.

The guard decides in the API process; the logits processors and the steering hook act in the
engine's processes. Between them the plan travels inside the request itself, as flat values of
``SamplingParams.extra_args`` (``vllm_xargs`` accepts nothing else; lists travel as JSON
strings), and as its prefix-cache salt. This module is both directions of that contract, so
the writer (:mod:`guardserve.guard`, the evaluation, the benchmarks) and the readers
(:mod:`guardserve.logits_processors.request`, :mod:`guardserve.steering.vllm_hook`) cannot
drift apart.

==============================  ====================================================
key                             value
==============================  ====================================================
``guardserve_phrases``          JSON list of forbidden phrases
``guardserve_targets``          JSON list of ``{"id", "version"}`` (or bare ids): the
                                engine bans them with their compiled filter parts
``guardserve_target_sets``      JSON list of set-part names (``set~<digest>``): many
                                targets' parts compiled as one (a tenant's always-on
                                targets), banned like ``guardserve_targets``
``guardserve_semantic``         ``true``: also apply the semantic penalty
``guardserve_sem_threshold``    similarity at or above which a token is banned (0.5)
``guardserve_sem_weight``       weight of the similarity subtracted below it (1.0)
``guardserve_steer``            JSON list of ``[target id, policy version]`` pairs (or
                                of bare ids) whose SAE features are clamped
==============================  ====================================================

Every key starting with ``guardserve_`` belongs to the guard: a client's own are refused.

>>> plan = GuardPlan(targets=(("t1", 2),), steer=(("t1", 2),), sets=("set~0123456789abcdef01234567",))
>>> xargs = plan.to_xargs({"client_key": 1})
>>> GuardPlan.from_xargs(xargs) == plan, xargs["client_key"]
(True, 1)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

RESERVED_PREFIX = "guardserve_"
PHRASES = "guardserve_phrases"
TARGETS = "guardserve_targets"
SETS = "guardserve_target_sets"
SEMANTIC = "guardserve_semantic"
SEM_THRESHOLD = "guardserve_sem_threshold"
SEM_WEIGHT = "guardserve_sem_weight"
STEER = "guardserve_steer"


def json_list(value, key: str) -> list:
    """A list carried as a JSON string (or a Python list, where ``SamplingParams`` is built in Python)."""
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


def flag(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def parse_steer(value) -> list[tuple[str, int | None]]:
    """``(target id, policy version or None)`` pairs from a ``guardserve_steer`` value: a JSON
    list of ids or of ``[id, version]`` pairs, or a single id."""
    if value is None or value == "" or value is False:
        return []
    items = value if isinstance(value, (list, tuple)) else None
    if items is None:
        text = str(value).strip()
        items = json.loads(text) if text.startswith("[") else [text]
    out: list[tuple[str, int | None]] = []
    for item in items:
        if isinstance(item, (list, tuple)):
            if len(item) != 2:
                raise ValueError(f"bad steering entry {item!r}")
            out.append((str(item[0]), int(item[1])))
        else:
            out.append((str(item), None))
    return out


@dataclass(frozen=True)
class GuardPlan:
    """What the engine does to one request: ban ``phrases`` (and, with ``semantic``, their
    near-synonyms) and clamp the SAE features of the ``steer`` targets. The empty plan is an
    unguarded request."""

    phrases: tuple[str, ...] = ()
    semantic: bool = False
    steer: tuple[tuple[str, int | None], ...] = ()
    targets: tuple[tuple[str, int | None], ...] = ()  # banned through their filter parts
    sets: tuple[str, ...] = ()  # banned through set parts (many targets compiled as one)

    def __bool__(self) -> bool:
        return bool(self.phrases or self.steer or self.targets or self.sets)

    def to_xargs(self, client: Mapping | None = None) -> dict:
        """``vllm_xargs`` carrying this plan: the client's own keys kept, any ``guardserve_``
        key replaced by the plan's."""
        out = {k: v for k, v in (client or {}).items() if not str(k).startswith(RESERVED_PREFIX)}
        if self.phrases:
            out[PHRASES] = json.dumps(list(self.phrases), ensure_ascii=False)
        if self.targets:
            out[TARGETS] = json.dumps([{"id": t, "version": v} if v is not None else t for t, v in self.targets])
        if self.sets:
            out[SETS] = json.dumps(list(self.sets))
        if self.semantic and (self.phrases or self.targets or self.sets):
            out[SEMANTIC] = "true"
        if self.steer:
            out[STEER] = json.dumps([list(s) for s in self.steer])
        return out

    @classmethod
    def from_xargs(cls, xargs: Mapping | None) -> GuardPlan:
        """The plan that ``xargs`` carries (phrases and targets as given). Raises ValueError on a
        malformed value."""
        xargs = xargs or {}
        phrases = json_list(xargs[PHRASES], PHRASES) if PHRASES in xargs else []
        if not all(isinstance(p, str) for p in phrases):
            raise ValueError(f"{PHRASES} must be a list of strings")
        targets: list[tuple[str, int | None]] = []
        for t in json_list(xargs[TARGETS], TARGETS) if TARGETS in xargs else []:
            if isinstance(t, dict):
                targets.append((str(t.get("id")), None if t.get("version") is None else int(t["version"])))
            else:
                targets.append((str(t), None))
        sets = json_list(xargs[SETS], SETS) if SETS in xargs else []
        if not all(isinstance(x, str) for x in sets):
            raise ValueError(f"{SETS} must be a list of set-part names")
        return cls(tuple(phrases), flag(xargs.get(SEMANTIC, False)), tuple(parse_steer(xargs.get(STEER))),
                   tuple(targets), tuple(sets))


def steered_salt(user_salt, steer) -> str:
    """A prefix-cache salt for steered requests: steering changes the prompt's KV from the SAE's
    layer on, so a steered request must neither reuse nor leave cached blocks that unsteered
    requests (or requests steered for other targets) would share. A client's own salt is kept."""
    digest = hashlib.sha256(json.dumps([list(s) for s in steer]).encode()).hexdigest()[:16]
    prefix = f"{user_salt[:100]}." if isinstance(user_salt, str) and user_salt else ""
    return f"{prefix}guardserve-steer-{digest}"


def tenant_salt(tenant: str, user_salt=None, steer=None) -> str:
    """The prefix-cache salt of every guarded request: per tenant, so one tenant learns nothing
    from another's cache hits (a fast first token tells that someone sent the same prefix),
    and per steering flag (see :func:`steered_salt`). A client's own salt is kept inside it."""
    base = steered_salt(user_salt, steer) if steer else (user_salt[:100] if isinstance(user_salt, str) else "")
    digest = hashlib.sha256(f"guardserve-tenant:{tenant}".encode()).hexdigest()[:16]
    return f"{base}.t-{digest}" if base else f"t-{digest}"
