"""What both vLLM adapters share: tokenizer, the filter parts of a request, fail-closed filter.

A request names its targets and their versions (``guardserve_targets``); their parts were
compiled by the API server when each target was registered or changed
(:class:`~.parts.FilterParts`) and are read here from the shared on-disk cache, once per
engine process, then kept in memory. The request's filter is the product of its parts
(:class:`~.parts.MergedFilter`): building it compiles nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, OrderedDict

from .compile import (
    CompiledFilter,
    FilterCache,
    TextFilter,
    as_tokenizer_view,
    compile_phrases,
    compile_token_sequences,
)
from .parts import (
    ENGINE_LOG,
    PartStore,
    default_root,
    folded_token_bytes,
    is_set_name,
    merge_parts,
    part_name,
    phrases_name,
)
from .request import GuardRequest, resolve_targets

logger = logging.getLogger("guardserve.logits")

_MAX_PARTS = 65_536  # parts kept in memory per engine process
_MAX_MERGED = 256


class FilterSource:
    """Turns a :class:`GuardRequest` into a :class:`CompiledFilter` for one model.

    The tokenizer loads on first use (it is not needed by engines that never see a
    guarded request). Failures fail closed: the request gets a filter that bans every
    token but end-of-sequence, so it ends at once instead of being served unguarded, and
    the error is logged.

    ``stats`` counts parts ``loaded`` from disk, parts ``compiled`` here (a part missing from
    the cache: a target used without the server, e.g. an in-process ``LLM``, or a cleared
    cache; each is also logged to the cache's ``engine-compiles.log``), filters ``merged``,
    and requests ``refused``.
    """

    def __init__(self, vllm_config, parts_root=None):
        self.vllm_config = vllm_config
        self.model_vocab = int(vllm_config.model_config.get_vocab_size())
        self._tok = None
        self._tb: list[bytes] | None = None
        self._store: PartStore | None = None
        self._root = parts_root
        self._lock = threading.Lock()
        self.cache = FilterCache()
        self._parts: OrderedDict[str, CompiledFilter | None] = OrderedDict()
        self._merged: OrderedDict[tuple, CompiledFilter] = OrderedDict()
        self._refuse: CompiledFilter | None = None
        self.stats: Counter[str] = Counter()

    @property
    def tokenizer(self):
        with self._lock:
            if self._tok is None:
                from vllm.tokenizers.registry import cached_tokenizer_from_config

                self._tok = as_tokenizer_view(cached_tokenizer_from_config(self.vllm_config.model_config))
            return self._tok

    @property
    def store(self) -> PartStore:
        if self._store is None:
            self._tb, digest = folded_token_bytes(self.tokenizer)
            self._store = PartStore(self._root or default_root(), digest)
        return self._store

    def filter_for(self, req: GuardRequest) -> CompiledFilter:
        try:
            parts = [self._target_part(tid, version) for tid, version in req.targets]
            parts += [self._set_part(name) for name in req.sets]
            names = [n for n, _ in parts]
            filters = [f for _, f in parts]
            if req.phrases:  # phrases sent as such (in-process users): compiled here
                names.append(phrases_name(req.phrases))
                pf = self.cache.get(self.tokenizer, req.phrases, vocab_size=self.model_vocab)
                filters.append(pf if isinstance(pf, TextFilter) else None)
            f = self._merge(tuple(names), filters)
            if req.semantic:
                from .semantic import with_semantic_penalty

                f = with_semantic_penalty(f, self.tokenizer, f.meta.get("phrases") or list(req.phrases),
                                          threshold=req.sem_threshold, weight=req.sem_weight)
            return f
        except Exception:
            self.stats["refused"] += 1
            logger.exception("guardserve: the request's filter could not be obtained; refusing the request "
                             "(only end-of-sequence allowed) rather than serving it unguarded")
            return self.refusal()

    def _merge(self, names: tuple, filters: list) -> CompiledFilter:
        key = tuple(sorted(names))
        hit = self._merged.get(key)
        if hit is not None:
            self._merged.move_to_end(key)
            return hit
        store = self.store
        assert self._tb is not None and store is not None
        f = merge_parts(filters, self.model_vocab, self._tb)
        self.stats["merged"] += 1
        self._merged[key] = f
        while len(self._merged) > _MAX_MERGED:
            self._merged.popitem(last=False)
        return f

    def _target_part(self, tid: str, version: int | None) -> tuple[str, CompiledFilter | None]:
        store = self.store
        phrases = None
        if version is None:  # no version: the resolver's phrases name the part
            phrases = resolve_targets([tid])
            name = phrases_name(phrases)
        else:
            name = part_name(tid, version)
        if name in self._parts:
            self._parts.move_to_end(name)
            return name, self._parts[name]
        assert self._tb is not None
        part: CompiledFilter | None
        if store.exists(name):
            part = store.load(name, self._tb)
            self.stats["loaded"] += 1
        else:
            part = self._compile_here(tid, version, name, phrases)
        self._parts[name] = part
        while len(self._parts) > _MAX_PARTS:
            self._parts.popitem(last=False)
        return name, part

    def _set_part(self, name: str) -> tuple[str, CompiledFilter | None]:
        """A set part (many targets compiled as one). The server builds it before it names it
        in a request; one missing here cannot be rebuilt from its name, so the request is refused."""
        if not is_set_name(name):
            raise ValueError(f"not a set-part name: {name!r}")
        if name in self._parts:
            self._parts.move_to_end(name)
            return name, self._parts[name]
        store = self.store
        assert self._tb is not None
        if not store.exists(name):
            raise ValueError(f"set part {name} is not in the cache {store.dir}")
        part = store.load(name, self._tb)
        self.stats["loaded"] += 1
        self._parts[name] = part
        while len(self._parts) > _MAX_PARTS:
            self._parts.popitem(last=False)
        return name, part

    def _compile_here(self, tid: str, version: int | None, name: str, phrases) -> CompiledFilter | None:
        """A part the cache does not hold: compiled here, in the engine step. The server never
        lets this happen (its engine entry builds the parts of a request before stamping it)."""
        started = time.perf_counter()
        if phrases is None:
            phrases = resolve_targets([{"id": tid, "version": version}])
        f = compile_phrases(self.tokenizer, phrases)
        self.stats["compiled"] += 1
        try:
            self.store.write(name, f, {"target": tid, "version": version, "compiled_by": "engine"})
            with open(self.store.dir / ENGINE_LOG, "a") as fh:
                fh.write(f"{os.getpid()} {name} {time.perf_counter() - started:.3f}s\n")
        except OSError:
            logger.warning("guardserve: could not write filter part %s to %s", name, self.store.dir)
        logger.warning("guardserve: compiled the filter part of target %s in the engine (%.0f ms): it was not in "
                       "the cache %s", tid, (time.perf_counter() - started) * 1000, self.store.dir)
        return f if isinstance(f, TextFilter) else None

    def refusal(self) -> CompiledFilter:
        if self._refuse is None:
            V = self.model_vocab
            eos = set()
            try:
                tok = self.tokenizer.raw
                for name in ("eos_token_id", "eos_id"):
                    v = getattr(tok, name, None)
                    if isinstance(v, int):
                        eos.add(v)
                    elif isinstance(v, (list, tuple)):
                        eos.update(int(x) for x in v)
            except Exception:
                logger.exception("guardserve: no tokenizer for the refusal filter")
            f = compile_token_sequences([(t,) for t in range(V) if t not in eos], V)
            f.meta = {"refusal": True}
            self._refuse = f
        return self._refuse
