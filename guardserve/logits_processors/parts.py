"""Per-target filter parts: compiled once per target version, merged per request for free.

The filter of a request used to be compiled for the request's whole phrase set, inside the
engine's step (every row of the batch waited), again for every new set of targets and after
every policy change. Here instead:

* A **part** is one target's compiled automaton (:func:`compile_phrases` over its forbidden
  phrases). The API server builds it when the target is registered or changed
  (:class:`FilterParts`, a worker thread and the admin call's own thread), and writes it to
  a shared on-disk cache, ``$GUARDSERVE_HOME/filters/<vocabulary digest>/<id>@v<version>.part``
  (:class:`PartStore`; files are written whole and renamed into place).
* A request carries target ids and versions (``guardserve_targets``), not phrases. The
  engine's processor loads the parts it names (memory first, then the file) and serves the
  request with a :class:`MergedFilter`: the K parts' automata run side by side as one lazily
  built product automaton. Building it costs one OR of K ban rows; its states and
  transitions are made on first use and memoised, so a step costs one dict lookup as before.
* An edit to one target compiles that target only; the other parts are reused as they are.
* Targets that guard every request of a tenant (mode ``always``) would make every request
  carry, and every engine step run, thousands of parts. They are compiled in **set parts**
  instead (:func:`chunk_members`, ``set~<digest>.part``): a few hundred targets each, cut so
  that registering more targets, or editing one, recompiles one or two sets, not all of
  them. A request names the sets (``guardserve_target_sets``); a set not built yet is
  carried as its targets' own parts until the worker has built it.

The product is exact: every part reads the same text, so the parts agree on whether the last
byte was a word byte, and a token is banned in the product state exactly when some part bans
it in its own state (the union of Aho-Corasick automata is their product).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .compile import (
    _TRANS_CACHE,
    _WORD,
    CompiledFilter,
    TextFilter,
    TokenizerView,
    _pack,
    as_tokenizer_view,
    compile_phrases,
    fold,
)

logger = logging.getLogger("guardserve.logits")

FORMAT = 1
SET_RETIRE_S = 300.0  # how long a replaced set part stays on disk for requests that still name it
ENGINE_LOG = "engine-compiles.log"
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,96}$")


# --------------------------------------------------------------------------- vocabulary identity


_FOLDED: OrderedDict[int, tuple[object, list[bytes], str]] = OrderedDict()
_FOLDED_LOCK = threading.Lock()


def folded_token_bytes(tokenizer) -> tuple[list[bytes], str]:
    """Each token's bytes as the text automaton reads them (folded), and the vocabulary's
    digest (the same as :class:`~.compile.VocabIndex`'s): parts compiled for one vocabulary
    are found under its digest by every process that loads the same tokenizer."""
    tv = as_tokenizer_view(tokenizer)
    key = id(tv._tok)
    with _FOLDED_LOCK:
        hit = _FOLDED.get(key)
        if hit is not None and hit[0] is tv._tok:
            return hit[1], hit[2]
    tb = [fold(b) for b in tv.token_bytes()]
    digest = hashlib.sha256(b"\x00".join(tb)).hexdigest()[:16]
    with _FOLDED_LOCK:
        _FOLDED[key] = (tv._tok, tb, digest)
        while len(_FOLDED) > 4:
            _FOLDED.popitem(last=False)
    return tb, digest


def part_name(target_id: str, version: int | None) -> str:
    """The file name (without ``.part``) of a target version's part."""
    tid = str(target_id)
    safe = tid if _SAFE_ID.match(tid) else "h" + hashlib.sha256(tid.encode()).hexdigest()[:24]
    return f"{safe}@v{version}"


SET_PREFIX = "set~"  # no target's part name has "~" (see part_name)
SET_CHUNK = 512  # members a set part holds on average
_SET_NAME = re.compile(r"^set~[0-9a-f]{24}$")


def chunk_members(members: Sequence, size: int | None = None) -> list[tuple]:
    """``members`` (targets, in registration order) cut into the chunks that become set parts
    (``size``: members a chunk holds on average, :data:`SET_CHUNK` by default).

    A chunk ends after a member whose id hashes to 0 modulo ``size`` (or at ``4 * size``
    members): the cuts depend on the members, not on their positions, so targets registered
    later change the last chunk only and add new ones, and an edit or a delete changes the
    chunk that held the target; every other chunk keeps its name and its compiled part.

    >>> from types import SimpleNamespace as T
    >>> ts = [T(id=f"t{i}", version=1) for i in range(2000)]
    >>> before, after = chunk_members(ts), chunk_members(ts + [T(id="new", version=1)])
    >>> before[:-1] == after[:len(before) - 1]
    True
    """
    size = size or SET_CHUNK
    out: list[tuple] = []
    cur: list = []
    for t in members:
        cur.append(t)
        if _id_hash(str(t.id)) % size == 0 or len(cur) >= 4 * size:
            out.append(tuple(cur))
            cur = []
    if cur:
        out.append(tuple(cur))
    return out


@functools.lru_cache(maxsize=1 << 17)
def _id_hash(target_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(target_id.encode(), digest_size=8).digest(), "little")


def set_name(members: Sequence) -> str:
    """The name of the set part of ``members`` (targets with ``id`` and ``version``):
    content-addressed, so every process names the same members the same way."""
    body = "\n".join(f"{t.id}@{t.version}" for t in members)
    return SET_PREFIX + hashlib.sha256(body.encode()).hexdigest()[:24]


def is_set_name(name) -> bool:
    return isinstance(name, str) and bool(_SET_NAME.match(name))


def phrases_name(phrases: Iterable[str]) -> str:
    """Content-addressed name of the part of a phrase list (targets named without a version)."""
    norm = sorted({" ".join(p.split()) for p in phrases if p and p.strip()})
    return "p-" + hashlib.sha256(json.dumps(norm, ensure_ascii=False).encode()).hexdigest()[:24]


# --------------------------------------------------------------------------- files


_MAGIC = b"GSPART1\n"


def save_part(f: CompiledFilter, path: Path, meta: dict | None = None) -> None:
    """Write ``f`` (a :class:`TextFilter`, or an empty filter) to ``path``, atomically: a
    JSON header (the arrays' dtypes, shapes and offsets) and the arrays' raw bytes, read back
    with one ``read`` and no copies (about 0.1 ms a part)."""
    header: dict = {"format": FORMAT, "vocab_size": int(f.vocab_size), "max_depth": int(f.max_depth),
                    "key": f.key, "meta": {**f.meta, **(meta or {})}}
    arrays: dict[str, np.ndarray] = {}
    if isinstance(f, TextFilter):
        header["kind"] = "text"
        header["root_after_space"] = int(f.root_after_space)
        off = np.zeros(len(f.kids) + 1, dtype=np.int64)
        syms: list[int] = []
        kids: list[int] = []
        for n, d in enumerate(f.kids):
            syms.extend(d.keys())
            kids.extend(d.values())
            off[n + 1] = len(syms)
        arrays.update(kid_off=off, kid_sym=np.asarray(syms, dtype=np.int16), kid_child=np.asarray(kids, dtype=np.int32),
                      trie_fail=np.asarray(f.trie_fail, dtype=np.int32), out_kind=np.asarray(f.out_kind, dtype=np.int8),
                      final_kind=np.asarray(f.final_kind, dtype=np.int8),
                      final_len=np.asarray(f.final_len, dtype=np.int32),
                      state_word=np.asarray(f.state_word, dtype=np.bool_),
                      masks=f.masks, state_mask=f.state_mask, sparse_offsets=f.sparse_offsets,
                      sparse_tokens=f.sparse_tokens)
    elif f.sparse_tokens.size or np.any(f.masks):
        raise ValueError("only text filters (or empty ones) are stored as parts")
    else:
        header["kind"] = "empty"
    layout, blobs, pos = {}, [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        layout[name] = [a.dtype.str, list(a.shape), pos]
        blobs.append(a.tobytes())
        pos += a.nbytes
        pad = (-pos) % 8
        blobs.append(b"\0" * pad)
        pos += pad
    header["arrays"] = layout
    head = json.dumps(header, ensure_ascii=False).encode()
    head += b" " * ((-len(head) - len(_MAGIC) - 8) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(_MAGIC + len(head).to_bytes(8, "little") + head)
        for b in blobs:
            fh.write(b)
    os.replace(tmp, path)


class _LazyKids:
    """A part's trie edges as per-node dicts, each made on first use from the stored arrays."""

    __slots__ = ("_off", "_sym", "_child", "_made")

    def __init__(self, off: np.ndarray, sym: np.ndarray, child: np.ndarray):
        self._off, self._sym, self._child = off, sym, child
        self._made: dict[int, dict[int, int]] = {}

    def __len__(self) -> int:
        return len(self._off) - 1

    def __getitem__(self, n: int) -> dict[int, int]:
        d = self._made.get(n)
        if d is None:
            a, b = int(self._off[n]), int(self._off[n + 1])
            d = self._made[n] = dict(zip(self._sym[a:b].tolist(), self._child[a:b].tolist()))
        return d

    def __iter__(self):
        return (self[n] for n in range(len(self)))


def load_part(path: Path, token_bytes: list[bytes]) -> TextFilter | None:
    """The part in ``path`` (None for a part that bans nothing). ``token_bytes``: the
    vocabulary's folded bytes (:func:`folded_token_bytes`), shared by every part loaded."""
    data = Path(path).read_bytes()
    if not data.startswith(_MAGIC):
        raise ValueError(f"{path}: not a guardserve filter part")
    n = int.from_bytes(data[len(_MAGIC):len(_MAGIC) + 8], "little")
    body = len(_MAGIC) + 8 + n
    header = json.loads(data[len(_MAGIC) + 8:body].decode())
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: part format {header.get('format')}, expected {FORMAT}")
    if header["kind"] == "empty":
        return None
    z = {}
    for name, (dt, shape, at) in header["arrays"].items():
        dtype = np.dtype(dt)
        count = int(np.prod(shape)) if shape else 1
        z[name] = np.frombuffer(data, dtype=dtype, count=count, offset=body + at).reshape(shape)
    trie_fail = z["trie_fail"].tolist()
    f = TextFilter(
        vocab_size=int(header["vocab_size"]), goto={}, fail=trie_fail + [0], max_depth=int(header["max_depth"]),
        masks=z["masks"], state_mask=z["state_mask"], sparse_offsets=z["sparse_offsets"],
        sparse_tokens=z["sparse_tokens"], sequences=[], ban_from=[], token_bytes=token_bytes,
        kids=_LazyKids(z["kid_off"], z["kid_sym"], z["kid_child"]),  # type: ignore[arg-type]  # a lazy list of dicts
        trie_fail=trie_fail, out_kind=z["out_kind"].tolist(), final_kind=z["final_kind"].tolist(),
        final_len=z["final_len"].tolist(), state_word=z["state_word"].tolist(),
        root_after_space=int(header["root_after_space"]),
    )
    f.key = header["key"]
    f.meta = header["meta"]
    return f


class PartStore:
    """The on-disk cache of parts of one vocabulary: ``<root>/<digest>/<name>.part``."""

    def __init__(self, root: Path | str, digest: str):
        self.dir = Path(root) / digest

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.part"

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def write(self, name: str, f: CompiledFilter, meta: dict | None = None) -> None:
        save_part(f, self.path(name), meta)

    def load(self, name: str, token_bytes: list[bytes]) -> TextFilter | None:
        return load_part(self.path(name), token_bytes)

    def drop_versions(self, target_id: str, keep_from: int | None = None) -> None:
        """Delete the parts of ``target_id``'s versions below ``keep_from`` (every version where
        None). By exact name where ``keep_from`` is given: a directory scan in every compile
        costs a pass over every part on disk (with 68,000 parts from earlier policies, the
        first request after registering 1,000 targets took 25 s); a scan only for the rare
        delete of a target whose newest version this process does not know."""
        if keep_from is not None:
            for version in range(1, keep_from):
                with contextlib.suppress(OSError):
                    self.path(part_name(target_id, version)).unlink()
            return
        prefix = part_name(target_id, 0).rsplit("@", 1)[0] + "@v"
        if not self.dir.is_dir():
            return
        for p in self.dir.glob(f"{prefix}*.part"):
            with contextlib.suppress(OSError):
                p.unlink()

    def engine_compiles(self) -> int:
        """How many parts engine processes had to compile themselves (see :class:`~.engine.FilterSource`)."""
        try:
            return len((self.dir / ENGINE_LOG).read_text().splitlines())
        except OSError:
            return 0


def default_root() -> Path:
    from guardserve import config

    return config.home() / "filters"


# --------------------------------------------------------------------------- the product automaton


class MergedFilter(CompiledFilter):
    """The union of K parts, run as their product automaton, built lazily.

    A state is ``(last byte was a word byte, ((part, state), ...))`` listing only the parts
    away from their root; state 0 is "nothing read" (every part at its root 0), state 1 is
    every part at its root after a space. A transition is memoised after its first use; the
    first time a token is read from a root, every part is asked once (also memoised, per
    token). Ban sets: two shared rows, the union of the parts' root bans after a word byte
    and after any other (every state of a part bans at least its root's set), plus, per
    state, the extra tokens the non-root parts ban there.
    """

    def __init__(self, parts: Sequence[TextFilter], vocab_size: int, token_bytes: list[bytes]):
        self.parts = list(parts)
        V = self.vocab_size = int(max([vocab_size] + [p.vocab_size for p in self.parts]))
        self.tb = token_bytes
        self.goto = {}
        self.fail = [0, 0]
        self.max_depth = max([1] + [p.max_depth for p in self.parts])
        W = (V + 31) // 32
        rows = []
        for word in (True, False):
            dense = np.zeros(W, dtype=np.int32)
            toks: list[int] = []
            for p in self.parts:
                s = 0 if word else p.root_after_space
                row = p.masks[p.state_mask[s]]
                dense[: row.shape[0]] |= row[:W]
                toks.extend(p.sparse_tokens[p.sparse_offsets[s]:p.sparse_offsets[s + 1]].tolist())
            rows.append(dense | _pack(toks, V)[:W])
        self.masks = np.stack(rows)
        self._row_bool = [np.unpackbits(r.view(np.uint8), bitorder="little")[:V].astype(bool) for r in rows]
        self.state_mask = np.zeros(2, dtype=np.int32)
        self.sparse_offsets = np.zeros(3, dtype=np.int64)
        self.sparse_tokens = np.zeros(0, dtype=np.int32)
        self.ban_from = []
        self.penalty = None
        h = hashlib.sha256(f"merged|{V}".encode())
        for p in self.parts:
            h.update(p.key.encode() + b"\x00")
        self.key = h.hexdigest()[:24]
        phrases = sorted({ph for p in self.parts for ph in p.meta.get("phrases", ())})
        self.meta = {"phrases": phrases, "parts": len(self.parts)}
        self._host = None
        self._root = None
        self._states: list[tuple[bool, tuple[tuple[int, int], ...]]] = [(True, ()), (False, ())]
        self._ids: dict[tuple[bool, tuple[tuple[int, int], ...]], int] = {s: i for i, s in enumerate(self._states)}
        self._trans: dict[int, int] = {}
        self._root_moves: dict[tuple[bool, int], tuple[tuple[int, int], ...]] = {}
        self._bans: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._dense_tokens: dict[tuple[int, int], np.ndarray] = {}

    @property
    def num_states(self) -> int:
        return len(self._states)

    @property
    def sequences(self) -> list[tuple[int, ...]]:  # type: ignore[override]
        out: list[tuple[int, ...]] = []
        for p in self.parts:
            out.extend(s for s in p.sequences if s not in out)
        return out

    def _moves_from_root(self, word: bool, token: int) -> tuple[tuple[int, int], ...]:
        key = (word, token)
        hit = self._root_moves.get(key)
        if hit is None:
            moves = []
            for i, p in enumerate(self.parts):
                if token >= p.vocab_size:
                    continue
                s = p.step(0 if word else p.root_after_space, token)
                if s and s != p.root_after_space:
                    moves.append((i, s))
            hit = self._root_moves[key] = tuple(moves)
        return hit

    def step(self, state: int, token: int) -> int:
        key = state * self.vocab_size + token
        nxt = self._trans.get(key)
        if nxt is not None:
            return nxt
        word, held = self._states[state]
        data = self.tb[token] if 0 <= token < len(self.tb) else b""
        if not data:
            nxt = 1  # a special token: the text restarts
        else:
            moved = dict(self._moves_from_root(word, token))
            for i, s in held:
                p = self.parts[i]
                s2 = p.step(s, token) if token < p.vocab_size else p.root_after_space
                if s2 and s2 != p.root_after_space:
                    moved[i] = s2
                else:
                    moved.pop(i, None)
            comp = (_WORD[data[-1]], tuple(sorted(moved.items())))
            nxt = self._ids.get(comp)
            if nxt is None:
                nxt = self._ids[comp] = len(self._states)
                self._states.append(comp)
        if len(self._trans) >= _TRANS_CACHE:
            self._trans.clear()
        self._trans[key] = nxt
        return nxt

    def run(self, ids: Sequence[int], state: int = 0) -> int:
        if state == 0 and len(ids) > self.max_depth:
            ids = ids[len(ids) - self.max_depth:]
        for t in ids:
            state = self.step(state, int(t)) if 0 <= t < self.vocab_size else 1
        return state

    def _part_tokens(self, i: int, s: int) -> np.ndarray:
        p = self.parts[i]
        m = int(p.state_mask[s])
        if not m:
            return p.sparse_tokens[p.sparse_offsets[s]:p.sparse_offsets[s + 1]].astype(np.int64)
        key = (i, m)
        hit = self._dense_tokens.get(key)
        if hit is None:
            bits = np.unpackbits(p.masks[m].view(np.uint8), bitorder="little")[: p.vocab_size]
            hit = self._dense_tokens[key] = np.flatnonzero(bits)
        return hit

    def host_bans(self):
        return self

    def __getitem__(self, state: int) -> tuple[int, tuple[int, ...]]:
        """(mask row, extra tokens) of ``state``: what :class:`~.core.GuardBatch` reads per step."""
        hit = self._bans.get(state)
        if hit is None:
            word, held = self._states[state]
            row = 0 if word else 1
            extra: tuple[int, ...] = ()
            if held:
                toks = np.unique(np.concatenate([self._part_tokens(i, s) for i, s in held]))
                toks = toks[(toks < self.vocab_size)]
                toks = toks[~self._row_bool[row][toks]]
                extra = tuple(toks.tolist())
            hit = self._bans[state] = (row, extra)
        return hit

    def banned(self, state: int) -> set[int]:
        row, extra = self[state]
        return set(np.flatnonzero(self._row_bool[row]).tolist()) | set(extra)

    def emitted(self, ids: Sequence[int], start: int = 0) -> list[tuple[int, ...]]:
        out: list[tuple[int, ...]] = []
        for p in self.parts:
            out.extend(s for s in p.emitted(ids, start) if s not in out)
        return out

    def nbytes(self) -> int:
        return int(self.masks.nbytes + sum(r.nbytes for r in self._row_bool)
                   + (len(self._trans) + len(self._states) + len(self._bans)) * 100)


def merge_parts(parts: Sequence[CompiledFilter | None], vocab_size: int, token_bytes: list[bytes]) -> CompiledFilter:
    """One filter for the union of ``parts`` (None: a part that bans nothing)."""
    live = [p for p in parts if p is not None]
    if not all(isinstance(p, TextFilter) for p in live):
        raise TypeError("only text-filter parts can be merged")
    if len(live) == 1:
        return live[0]
    from .compile import compile_token_sequences

    if not live:
        f = compile_token_sequences([], vocab_size)
        f.meta = {"phrases": []}
        return f
    return MergedFilter(live, vocab_size, token_bytes)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the API server's side


class FilterParts:
    """Compiles and stores each target version's part, in the API server process.

    ``ensure(targets, where)`` makes sure the parts of ``targets`` are on disk, compiling
    the missing ones in the calling thread; one lock per part, so a caller waits only for a
    part it needs itself, never for another target's (another tenant's) compile. The admin
    API calls it with ``where="registration"`` before it reports a change; the request path
    (``GuardService.plan``) with ``where="request"``, where it finds every part already
    there unless a compile is still under way or the cache was cleared. A worker thread
    (:meth:`start`, :meth:`poke`) compiles, in the background, the parts of targets changed
    elsewhere (the CLI, another replica) and those of every target at start. ``stats``
    counts compiles by where they ran.

    Set parts (many targets as one, see :func:`chunk_members`) are built the same way:
    :meth:`ensure_sets` at registration, the worker for the rest (``start(..., sets=...)``),
    and :meth:`set_plan` tells a request which sets it can name. A set no current group
    holds any more is deleted :data:`SET_RETIRE_S` after it was replaced (requests stamped
    before may still name it).
    """

    def __init__(self, tokenizer, root: Path | str | None = None):
        self.tv: TokenizerView = as_tokenizer_view(tokenizer)
        _, digest = folded_token_bytes(self.tv)
        self.store = PartStore(root or default_root(), digest)
        self.stats: Counter[str] = Counter()
        self._built: dict[str, int] = {}  # target id -> version whose part is on disk
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._source = None  # () -> iterable of targets, for the worker
        self._source_stamp = None
        self._wake = threading.Event()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error: str | None = None
        self._sets_source = None  # () -> groups of targets, for the worker
        self._sets_built: set[str] = set()
        self._chunks: OrderedDict[int, tuple[tuple, list[tuple[str, tuple]]]] = OrderedDict()
        self._retired: dict[str, float] = {}  # set part -> when no current group held it any more

    def has(self, target_id: str, version: int) -> bool:
        if self._built.get(target_id) == version:
            return True
        if self.store.exists(part_name(target_id, version)):
            self._built[target_id] = max(version, self._built.get(target_id, version))
            return True
        return False

    def _lock(self, name: str) -> threading.Lock:
        with self._guard:
            lock = self._locks.get(name)
            if lock is None:
                lock = self._locks[name] = threading.Lock()
            return lock

    def ensure(self, targets: Iterable, where: str = "request", budget_s: float | None = None) -> list[str]:
        """Compile the parts of ``targets`` (``ForgetTarget``-like: ``id``, ``version``) that
        are missing; returns the ids left undone when ``budget_s`` ran out (the worker
        thread takes them). Raises when a compile fails."""
        deadline = None if budget_s is None else time.monotonic() + budget_s
        left: list[str] = []
        for t in targets:
            if self.has(t.id, t.version):
                continue
            if deadline is not None and time.monotonic() > deadline:
                left.append(t.id)
                continue
            self._build(t, where)
        if left:
            self.poke()
        return left

    def _build(self, target, where: str) -> None:
        from guardserve.classifiers.retrieval import forbidden_phrases

        name = part_name(target.id, target.version)
        with self._lock(name):
            if self.has(target.id, target.version):
                return
            try:
                f = compile_phrases(self.tv, forbidden_phrases(target))
                self.store.write(name, f, {"target": target.id, "version": target.version, "compiled_by": where})
            except Exception as e:
                self.stats["failed"] += 1
                self._last_error = f"{target.id}: {e}"
                raise
            self.stats[where] += 1
            self._built[target.id] = target.version
            # In-flight requests may still name the previous version: keep it.
            self.store.drop_versions(target.id, target.version - 1)
        with self._guard:
            self._locks.pop(name, None)

    # ------------------------------------------------------------------ set parts
    def chunks(self, group: tuple) -> list[tuple[str, tuple]]:
        """(set name, members) of each chunk of ``group``; remembered per group object (a
        detector's groups live until the policy changes), so a request hashes nothing."""
        key = id(group)
        with self._guard:
            hit = self._chunks.get(key)
            if hit is not None and hit[0] is group:
                return hit[1]
        made = [(set_name(c), c) for c in chunk_members(group)]
        with self._guard:
            self._chunks[key] = (group, made)
            while len(self._chunks) > 64:
                self._chunks.popitem(last=False)
        return made

    def has_set(self, name: str) -> bool:
        if name in self._sets_built:
            return True
        if self.store.exists(name):
            self._sets_built.add(name)
            return True
        return False

    def ensure_sets(self, groups: Iterable[tuple], where: str = "registration", budget_s: float | None = None) -> int:
        """Build the missing set parts of ``groups`` (tuples of targets in registration order,
        e.g. ``Detector.always_groups()``); returns how many were left to the worker when
        ``budget_s`` ran out. Raises when a compile fails."""
        deadline = None if budget_s is None else time.monotonic() + budget_s
        left = 0
        for group in groups:
            for name, members in self.chunks(group):
                if self.has_set(name):
                    continue
                if deadline is not None and time.monotonic() > deadline:
                    left += 1
                    continue
                self._build_set(name, members, where)
        if left:
            self.poke()
        return left

    def _build_set(self, name: str, members: tuple, where: str) -> None:
        from guardserve.classifiers.retrieval import forbidden_phrases

        with self._lock(name):
            if self.has_set(name):
                return
            try:
                f = compile_phrases(self.tv, [p for t in members for p in forbidden_phrases(t)])
                self.store.write(name, f, {"targets": [[t.id, t.version] for t in members], "compiled_by": where})
            except Exception as e:
                self.stats["failed"] += 1
                self._last_error = f"{name}: {e}"
                raise
            self.stats["set:" + where] += 1
            self._sets_built.add(name)
        with self._guard:
            self._locks.pop(name, None)

    def set_plan(self, groups: Iterable[tuple]) -> tuple[list[str], list]:
        """What a request guarded by every target of ``groups`` carries: the names of their
        built set parts, and the targets of the chunks not built yet, to be carried one by one
        meanwhile (the worker is poked to build those sets)."""
        names: list[str] = []
        loose: list = []
        for group in groups:
            for name, members in self.chunks(group):
                if self.has_set(name):
                    names.append(name)
                else:
                    loose.extend(members)
        if loose:
            self.poke()
        return names, loose

    def _retire_sets(self, current: set[str]) -> None:
        now = time.monotonic()
        for name in list(self._sets_built):
            if name in current:
                self._retired.pop(name, None)
            elif now - self._retired.setdefault(name, now) > SET_RETIRE_S:
                self._sets_built.discard(name)
                self._retired.pop(name, None)
                with contextlib.suppress(OSError):
                    self.store.path(name).unlink()

    def forget(self, target_id: str) -> None:
        """A deleted target: drop its parts."""
        newest = self._built.pop(target_id, None)
        self.store.drop_versions(target_id, None if newest is None else newest + 1)

    # ------------------------------------------------------------------ the worker
    def start(self, source, sets=None) -> FilterParts:
        """Keep the parts of ``source()``'s targets (e.g. ``detector.targets``), and the set
        parts of ``sets()``'s groups (e.g. ``detector.always_groups``), built, in a daemon
        thread; ``poke()`` after the policy may have changed."""
        self._source = source
        self._sets_source = sets
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="guardserve-filter-parts", daemon=True)
            self._thread.start()
        self._wake.set()
        return self

    def poke(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._halt.set()
        self._wake.set()

    def pending(self) -> int:
        if self._source is None:
            return 0
        return sum(1 for t in self._source() if self._built.get(t.id) != t.version)

    def _loop(self) -> None:
        while not self._halt.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._halt.is_set():
                return
            try:
                targets: list = list(self._source() if self._source else ())
                for t in targets:
                    if self._halt.is_set():
                        return
                    if self._built.get(t.id) == t.version:
                        continue
                    started = time.monotonic()
                    with contextlib.suppress(Exception):  # counted in stats, the last error kept
                        self.ensure([t], where="background")
                    # At most about half of the API process's interpreter: requests go on beside it.
                    time.sleep(min(0.05, time.monotonic() - started))
                if self._sets_source is not None:
                    current: set[str] = set()
                    for group in self._sets_source():
                        for name, members in self.chunks(group):
                            current.add(name)
                            if self._halt.is_set():
                                return
                            if self.has_set(name):
                                continue
                            started = time.monotonic()
                            with contextlib.suppress(Exception):  # counted in stats, the last error kept
                                self._build_set(name, members, "background")
                            time.sleep(min(0.05, time.monotonic() - started))
                    self._retire_sets(current)
            except Exception:
                logger.exception("guardserve: building filter parts failed")

    def report(self) -> dict:
        return {"compiles": {k: self.stats[k] for k in ("registration", "background", "request")},
                "set_compiles": {k: self.stats["set:" + k] for k in ("registration", "background")},
                "failed": self.stats["failed"], "last_error": self._last_error, "pending": self.pending(),
                "engine_compiles": self.store.engine_compiles(), "vocabulary": self.store.dir.name}
