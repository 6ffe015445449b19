"""The one way in to detection: ``Detector.detect(messages) -> list[Triggered]``.

The evidence comes from signals (``classifiers/signals/``: lexical, embedding, hidden-state
MLP, ``always``), one file each, named in ``DetectorConfig.signals``; the detector builds
the ``Query`` they share (embedding windows and vectors computed at most once), merges their
hits (per target the highest score, the reasons in order, deduplicated), drops targets the
tenant cannot see, and adds GUARD's retrieval step (``Triggered.forbidden``).

It keeps its indexes in step with the policy store by reading the audit log
(``changes_since``), so a target registered anywhere (another process, another replica
on Postgres) is detected from the next request on, and each change costs only that
target's entries. Any failure inside detection raises ``DetectionError``: the caller
refuses the request rather than serve it unguarded.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from operator import itemgetter
from typing import TYPE_CHECKING

import numpy as np

from guardserve.classifiers.lexical import LexicalIndex, common_words
from guardserve.classifiers.normalize import tokens
from guardserve.classifiers.retrieval import forbidden_phrases, rank_facts
from guardserve.classifiers.signals import DEFAULT_SIGNALS, SIGNALS, Query, Signal
from guardserve.classifiers.signals.always import REASON as ALWAYS_REASON
from guardserve.classifiers.signals.always import AlwaysSignal
from guardserve.policy.model import ForgetTarget, name_key
from guardserve.policy.store import PolicyStore

if TYPE_CHECKING:
    from guardserve.classifiers.embedding import VectorHit

log = logging.getLogger("guardserve.classifiers")
_CAPITALISED = re.compile(r"\b[A-Z][\w'’-]*")
_SENTENCE_END = re.compile(r"(?<=[.?!:;])\s+")
_POSSESSIVE = re.compile(r"['’]s$")
_SOMEONE_RUN = re.compile(r"someone\s+(?=someone)")  # "Brask Ulleroy" is one someone, not two

THRESHOLD_SETTING = "detector.embedding_threshold"
DEFAULT_THRESHOLD = 0.8  # used until `calibrate` has stored one; conservative on purpose
DEFAULT_NAMED_MARGIN = 0.1  # likewise: how much more a window with a name read as "someone" must score
# What the embedder reads of a window (``Detector._views``); a threshold calibrated under an
# earlier reading is not used, since the same questions score differently under this one.
CALIBRATION_RULE = "names-as-someone"


class DetectionError(RuntimeError):
    """Detection could not run; the request must be refused (fail closed)."""


class PolicyStaleError(DetectionError):
    """The detector's policy is older than its bound allows: the store may hold targets it has
    not seen, so it decides nothing (a replica answers 503 and a router drains it)."""


@dataclass(frozen=True)
class Triggered:
    target_id: str
    name: str
    version: int
    score: float
    reasons: tuple[str, ...]
    forbidden: tuple[str, ...]
    mode: str = "detected"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        d["forbidden"] = list(self.forbidden)
        return d


def _triggered_order(t: Triggered) -> tuple[float, tuple]:
    """The order of ``Detector.detect``'s answer: highest score first, then by name."""
    return (-t.score, name_key(t.name))


@dataclass(frozen=True, eq=False)
class AlwaysOn:
    """A tenant's always-on targets (mode ``always``) under one policy version, made once per
    tenant and policy change and shared by every request of the tenant until the next one.

    A request carries the set whole instead of its thousands of members one by one: the guard
    names the set's precompiled parts (``logits_processors.parts.FilterParts.set_plan``), the
    audit line its size and :attr:`digest`.

    ``groups``: the members by the tenant that owns them (global targets first), each in
    registration order, so that targets registered later extend a group at its end.
    """

    triggered: tuple[Triggered, ...]  # in Detector.detect's order
    ids: frozenset[str]
    groups: tuple[tuple[ForgetTarget, ...], ...]

    @functools.cached_property
    def phrases(self) -> tuple[str, ...]:
        """Every member's forbidden phrases, member by member (neither sorted nor deduplicated:
        that would cost the first request after each policy change tens of milliseconds)."""
        return tuple(itertools.chain.from_iterable(t.forbidden for t in self.triggered))

    @functools.cached_property
    def digest(self) -> str:
        """Names the set's members and versions (the audit log's ``always_on_set`` line lists them)."""
        return hashlib.sha256("\n".join(f"{t.id}@{t.version}" for g in self.groups for t in g).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Detection:
    """:meth:`Detector.examine`'s answer: ``triggered`` as :meth:`Detector.detect` returns it,
    and the tenant's always-on set (None when it has none) with how many of its members
    triggered on their mode alone (``always_only``; the others also triggered on what the
    conversation says)."""

    triggered: list[Triggered]
    always: AlwaysOn | None = None
    always_only: int = 0


@dataclass
class DetectorConfig:
    use_embeddings: bool = True
    threshold: float | None = None      # None: the calibrated value stored with the policy
    top_k: int = 16
    approx_above: int = 50_000          # vectors beyond which the faiss index is approximate
    sync_interval_s: float = 0.5        # how often detect() looks for policy changes
    # False where a loop of the caller's keeps the detector synced (the server's, woken by the
    # store's notifications): the request path then never waits on the store.
    sync_in_detect: bool = True
    # Fail closed on a stale policy: detect() raises PolicyStaleError when the store last
    # confirmed this detector's policy longer ago than this (None: never; a replica sets it).
    max_policy_age_s: float | None = None
    max_chunk_chars: int = 500          # embedding window over long messages
    chunk_overlap_chars: int = 100      # windows overlap, so a question cut by a boundary is whole in one
    # Per conversation, newest first: 256 windows cover about 100,000 characters, past any context
    # served here, so text deep inside a long prompt is still read (the cost grows with the prompt,
    # as the prefill's does).
    max_chunks: int = 256
    vector_cache: str | None = None     # SQLite file of target-text embeddings (see VectorCache)
    # The signals that detect, by name in classifiers.signals.SIGNALS, in merge order.
    signals: tuple[str, ...] = DEFAULT_SIGNALS
    # GUARD's hidden-state MLP (an object with predict_proba, e.g. a trained
    # HiddenStateClassifier); None = off, the default ...
    hidden_state: object | None = None
    # ... or the path of one saved with HiddenStateClassifier.save, loaded by the Detector.
    hidden_state_model: str | None = None
    extra: dict = field(default_factory=dict)


def message_texts(messages) -> list[str]:
    """Texts of a prompt (str) or of OpenAI-style messages (system prompt included;
    content as a string or a list of parts)."""
    if isinstance(messages, str):
        return [messages]
    if not isinstance(messages, (list, tuple)):
        raise DetectionError("expected a prompt string or a list of messages")
    out = []
    for m in messages:
        if isinstance(m, str):
            out.append(m)
            continue
        if not isinstance(m, dict):
            raise DetectionError("each message must be an object with 'content'")
        c = m.get("content")
        if c is None:
            continue
        if isinstance(c, str):
            out.append(c)
        elif isinstance(c, list):
            for part in c:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    out.append(part["text"])
                elif isinstance(part, str):
                    out.append(part)
        else:
            raise DetectionError("message content must be a string or a list of parts")
    return out


class Detector:
    """GUARD-style detection over whole conversations for the targets of a store."""

    def __init__(self, store: PolicyStore, config: DetectorConfig | None = None, embedder=None):
        self.store = store
        self.config = config or DetectorConfig()
        # _lock guards the index and is held only briefly; _sync_lock serialises syncs (store
        # reads); _embed_lock serialises embedding passes, which take seconds to minutes for a
        # bulk import and hold neither of the others meanwhile.
        self._lock = threading.RLock()
        self._sync_lock = threading.Lock()
        self._embed_lock = threading.Lock()           # one embedding pass at a time
        self._pending: dict[str, ForgetTarget] = {}   # indexed by name, awaiting vectors
        self._targets: dict[str, ForgetTarget] = {}
        self._vocab: dict[str, frozenset[str]] = {}
        # How many targets' texts use each word: a name absent here is no target's, and the
        # embedder reads it as "someone" (``_views``).
        self._vocab_count: Counter[str] = Counter()
        self._fact_vecs: dict[str, dict[str, np.ndarray]] = {}
        # Each target's forbidden phrases in its own fact order, made on first use: a target
        # that triggers on its mode alone (``always``) is not about the conversation, so its
        # phrases are not ranked against it, and a request with thousands of them costs lookups.
        self._phrases: dict[str, tuple[str, ...]] = {}
        self._always_cache: dict[str | None, AlwaysOn | None] = {}  # _always_on
        self._always_entries: dict[str, tuple[str, str, Triggered]] = {}  # _always_entry
        self._seq = 0
        self._last_sync = 0.0
        self._confirmed = time.monotonic()  # when a store read last found nothing newer than _seq
        self.lexical = LexicalIndex()
        self.embedder = None
        self.vectors = None
        if self.config.use_embeddings:
            from guardserve.classifiers.embedding import VectorIndex, shared_embedder

            self.embedder = embedder or shared_embedder()
            self.vectors = VectorIndex(self.embedder.dim, approx_above=self.config.approx_above)
            self._vector_cache = None
            if self.config.vector_cache:
                from guardserve.classifiers.embedding import VectorCache

                self._vector_cache = VectorCache(self.config.vector_cache)
        self._threshold = self.config.threshold
        self._named_margin: float | None = None
        unknown = [n for n in self.config.signals if n not in SIGNALS]
        if unknown:
            raise ValueError(f"unknown detector signal(s) {unknown}; known: {sorted(SIGNALS)}")
        if self.config.hidden_state_model is not None and "hidden_state" not in self.config.signals:
            raise ValueError("DetectorConfig.hidden_state_model is set but 'hidden_state' is not among its signals")
        # Built before the first indexing: a signal may keep an index of its own (add/remove).
        self.signals: list[Signal] = [SIGNALS[n](self) for n in dict.fromkeys(self.config.signals)]
        self._load()

    # -- keeping up with the store ------------------------------------------------------
    @property
    def threshold(self) -> float:
        return self._threshold if self._threshold is not None else DEFAULT_THRESHOLD

    @property
    def named_margin(self) -> float:
        """How much higher than :attr:`threshold` a window must score where a name was read as
        "someone" (:meth:`_views`): the bare question shapes that a question about anyone
        becomes score higher than the everyday questions the threshold is set on."""
        return self._named_margin if self._named_margin is not None else DEFAULT_NAMED_MARGIN

    def _load(self) -> None:
        with self._lock:
            seq = self.store.last_seq()           # first: changes after it are replayed
            targets = self.store.list()
            self._index_many(targets)
            self._seq = seq
            self._read_threshold()
            self._last_sync = time.monotonic()
        self.sync(force=True)

    @property
    def policy_seq(self) -> int:
        """The store's change sequence number this detector has applied: the policy version it enforces."""
        return self._seq

    @property
    def policy_age_s(self) -> float:
        """Seconds since the store last confirmed that no change past :attr:`policy_seq` exists.
        Only a successful read sets it: a sync that fails, or hangs, lets it grow."""
        return time.monotonic() - self._confirmed

    def stale(self) -> str | None:
        """Why the policy cannot be trusted now (``max_policy_age_s`` passed), or None."""
        limit = self.config.max_policy_age_s
        age = self.policy_age_s
        if limit is not None and age > limit:
            return (f"the policy was last confirmed against the store {age:.1f} s ago (limit {limit:g} s); "
                    "the store is unreachable or the sync is stuck")
        return None

    def _read_threshold(self) -> None:
        if self.config.threshold is None:
            stored = self.store.get_setting(THRESHOLD_SETTING)
            if stored and stored.get("rule") != CALIBRATION_RULE:
                log.warning("the stored embedding threshold was calibrated under an earlier reading of "
                            "windows; using %.2f until it is calibrated again (guardserve targets calibrate)", DEFAULT_THRESHOLD)
                stored = None
            self._threshold = float(stored["threshold"]) if stored else None
            self._named_margin = float(stored["named_margin"]) if stored else None

    def _index_many(self, targets: list[ForgetTarget]) -> None:
        self._index_names(targets)
        self._index_vectors(targets, self._embed(targets))

    def _index_names(self, targets: list[ForgetTarget]) -> None:
        """The fast half of indexing (milliseconds a target): what the lexical matcher
        and the retrieval step need."""
        self._always_cache.clear()
        for t in targets:
            self._targets[t.id] = t
            self.lexical.add(t)
            self._vocab[t.id] = vocab = self._target_vocab(t)
            self._vocab_count.update(vocab)
            for s in self.signals:
                s.add(t)
            if t.mode == "always":
                self._always_entry(t)  # here, not in the first request after the change

    def _embed(self, targets: list[ForgetTarget]):
        """The slow half: the targets' texts through the embedder. Needs no lock."""
        if self.vectors is None or not targets:
            return None
        from guardserve.classifiers.embedding import target_texts

        per = [target_texts(t) for t in targets]
        flat = [text for items in per for _, text in items]
        if self._vector_cache is not None:
            vecs = self._vector_cache.encode(self.embedder, flat, progress=len(flat) > 20_000)
        else:
            vecs = self.embedder.encode(flat, batch_size=256, cache=False, progress=len(flat) > 20_000)
        return per, vecs

    def _index_vectors(self, targets: list[ForgetTarget], embedded) -> None:
        if embedded is None:
            return
        per, vecs = embedded
        batch, k = [], 0
        for t, items in zip(targets, per):
            tv = vecs[k:k + len(items)]
            k += len(items)
            if self._targets.get(t.id) is not t:
                continue  # changed or deleted while it was being embedded
            batch.append((t.id, items, tv))
            # Kept for GUARD's retrieval step: facts ranked by cosine to the prompt.
            facts = {label[5:]: tv[j] for j, (label, _) in enumerate(items) if label.startswith("fact:")}
            if facts:
                self._fact_vecs[t.id] = facts
        self.vectors.add_many(batch)

    def _unindex(self, target_id: str) -> None:
        self._always_cache.clear()
        self._pending.pop(target_id, None)
        self._targets.pop(target_id, None)
        for s in self.signals:
            s.remove(target_id)
        vocab = self._vocab.pop(target_id, None)
        if vocab:
            self._vocab_count.subtract(vocab)
            for tok in vocab:
                if self._vocab_count[tok] <= 0:
                    del self._vocab_count[tok]
        self._fact_vecs.pop(target_id, None)
        self._phrases.pop(target_id, None)
        self._always_entries.pop(target_id, None)
        self.lexical.remove(target_id)
        if self.vectors is not None:
            self.vectors.remove(target_id)

    def sync(self, force: bool = False, embed_budget_s: float = 2.0) -> int:
        """Apply the policy changes made since the last sync; returns how many.

        Names and aliases of new or changed targets are matched at once; their
        embeddings follow, ``embed_budget_s`` seconds of them per call (:meth:`embed_pending`;
        a bulk import of 100,000 targets takes minutes to embed). ``force=False`` (the
        request path) never waits for a sync running in another thread."""
        if not self._sync_lock.acquire(blocking=force):
            return 0
        try:
            now = time.monotonic()
            if not force and now - self._last_sync < self.config.sync_interval_s:
                return 0
            self._last_sync = now
            n = self._apply_changes()
        finally:
            self._sync_lock.release()
        if embed_budget_s > 0 and self._pending:
            self.embed_pending(embed_budget_s)
        return n

    def embed_pending(self, budget_s: float = 2.0) -> int:
        """Embed targets that are matched by name only, for about ``budget_s`` seconds;
        returns how many were embedded. It holds neither the sync lock nor, while the
        embedder runs, the index lock: a server runs it in a thread of its own, so a slow
        embedding (a loaded CPU, a bulk import) never delays the store reads that keep the
        policy confirmed current (:attr:`policy_age_s`), nor detection."""
        done = 0
        deadline = time.monotonic() + budget_s
        with self._embed_lock:
            while self._pending and time.monotonic() < deadline:
                with self._lock:
                    # Small chunks: a target changed meanwhile waits for at most one chunk.
                    chunk = list(self._pending.values())[:64]
                embedded = self._embed(chunk)
                with self._lock:
                    self._index_vectors(chunk, embedded)
                    for t in chunk:
                        if self._pending.get(t.id) is t:
                            del self._pending[t.id]
                            done += 1
        return done

    @property
    def pending(self) -> int:
        """Targets matched by name that still wait for their embeddings."""
        return len(self._pending)

    def _apply_changes(self) -> int:
        n = 0
        while True:
            asked = time.monotonic()
            changes = self.store.changes_since(self._seq, limit=5000)
            if not changes:
                # Confirmed as of when the read began, not when this thread got to run again: on
                # a loaded host a thread can wait seconds after the answer, and the store may be
                # gone by then (a replica flooded during a Postgres outage served past the bound).
                self._confirmed = max(self._confirmed, asked)
                return n
            latest: dict[str, ForgetTarget | None] = {}
            threshold_changed = False
            for c in changes:
                if c.action == "setting":
                    threshold_changed = True
                elif c.action in ("add", "update"):
                    latest[c.target_id] = ForgetTarget.from_dict(c.target)
                elif c.action == "delete":
                    latest[c.target_id] = None
            items = list(latest.items())
            for i in range(0, max(1, len(items)), 1000):  # short holds of the index lock
                with self._lock:
                    for tid, t in items[i:i + 1000]:
                        cur = self._targets.get(tid)
                        if t is None:
                            if cur is not None:
                                self._unindex(tid)
                        elif cur is None or cur.version < t.version:
                            self._unindex(tid)
                            self._index_names([t])
                            # An always-on target triggers whatever the embedding says: its texts
                            # are not embedded (thousands of them would compete with requests for
                            # minutes after a bulk import). Named, it is still found lexically.
                            if self.vectors is not None and t.mode != "always":
                                self._pending[tid] = t
            with self._lock:
                if threshold_changed:
                    self._read_threshold()
                self._seq = changes[-1].seq
            n += len(changes)

    def targets(self) -> list[ForgetTarget]:
        with self._lock:
            return list(self._targets.values())

    def target(self, target_id: str) -> ForgetTarget | None:
        """The indexed target ``target_id`` (None if there is none)."""
        return self._targets.get(target_id)

    # -- detection ----------------------------------------------------------------------
    def detect(self, messages, tenant: str | None = None, embeddings: bool = True,
               lexical_only: Sequence[str] = ()) -> list[Triggered]:
        """Targets the conversation asks about, best first.

        ``tenant``: only that tenant's targets and the global ones; ``None`` means every
        target (operators' dry runs). ``embeddings=False`` reads names, aliases, fact values
        and ``always`` targets only (microseconds: no embedder call), a first look that the
        full detection later confirms. ``lexical_only``: more texts for the lexical matcher alone
        (text whose meaning is known, such as the guard's own instruction inside a prompt).
        Raises DetectionError on any failure."""
        return self.examine(messages, tenant, embeddings, lexical_only).triggered

    def examine(self, messages, tenant: str | None = None, embeddings: bool = True,
                lexical_only: Sequence[str] = ()) -> Detection:
        """:meth:`detect`, with the tenant's always-on set as one object (:class:`AlwaysOn`),
        from the same policy version: what the guard needs to carry thousands of always-on
        targets to the engine as a few precompiled parts."""
        try:
            return self._detect(messages, tenant, embeddings, list(lexical_only))
        except DetectionError:
            raise
        except Exception as e:
            raise DetectionError(f"detection failed ({type(e).__name__}: {e}); refusing rather than serving unguarded") from e

    def _visible(self, t: ForgetTarget, tenant: str | None) -> bool:
        return tenant is None or t.tenant is None or t.tenant == tenant

    def _chunks(self, texts: list[str]) -> list[str]:
        size = self.config.max_chunk_chars
        stride = max(1, size - self.config.chunk_overlap_chars)
        chunks = []
        for text in reversed(texts):     # newest first: the budget favours recent turns
            text = text.strip()
            starts = range(0, max(1, len(text) - self.config.chunk_overlap_chars), stride)
            chunks.extend(text[k:k + size] for k in reversed(starts))  # a text's end is its newest part
        if len(chunks) > self.config.max_chunks:
            log.warning("conversation of %d embedding windows: the oldest %d are read by the lexical matcher only",
                        len(chunks), len(chunks) - self.config.max_chunks)
        return [c for c in chunks[: self.config.max_chunks] if c]

    def _detect(self, messages, tenant: str | None, embeddings: bool = True,
                lexical_only: list[str] | None = None) -> Detection:
        texts = message_texts(messages)
        if self.config.sync_in_detect:
            # A few new targets are embedded here; a bulk import is left to the server's
            # sync loop (meanwhile its targets are matched by name).
            self.sync(embed_budget_s=0.5 if embeddings and self.pending <= 64 else 0.0)
        why = self.stale()
        if why is not None:
            raise PolicyStaleError(why)
        query = Query(self, texts, lexical_only or [], tenant,
                      embeddings=bool(embeddings and self.vectors is not None and self.vectors.ntotal))
        # The embedder, the slow part, runs before the index lock is taken: concurrent
        # requests embed side by side (their calls batched together, Embedder._batched)
        # instead of one at a time, and a sync never waits for a request's embedding.
        query.vectors()
        with self._lock:
            scores: dict[str, float] = {}
            reasons: dict[str, list[str]] = {}
            always_at: dict[str, int] = {}  # where the always reason goes among a target's reasons
            for signal in self.signals:
                if isinstance(signal, AlwaysSignal):
                    # Its hits are the same on every request of a tenant: taken whole from
                    # _always_on below, not one by one.
                    always_at = {tid: len(r) for tid, r in reasons.items()}
                    continue
                if signal.needs_embeddings and not query.embeddings:
                    continue
                for h in signal.hits(query):
                    t = self._targets.get(h.target_id)
                    if t is None or not self._visible(t, tenant):
                        continue
                    scores[h.target_id] = max(scores.get(h.target_id, 0.0), h.score)
                    r = reasons.setdefault(h.target_id, [])
                    if h.reason not in r:
                        r.append(h.reason)
            always_on = self._always_on(tenant)
        if not scores and always_on is None:
            return Detection([])
        always = always_on.triggered if always_on is not None else ()
        always_ids = always_on.ids if always_on is not None else frozenset()
        # GUARD's retrieval ranks fact values by the newest window's vector.
        qvec = query.vector() if scores else None
        with self._lock:
            about = []
            for tid, score in scores.items():
                t = self._targets.get(tid)
                if t is None:
                    continue  # deleted since the hits were read: no longer forgotten
                r = reasons[tid]
                if tid in always_ids:
                    score = max(score, 1.0)
                    r.insert(always_at.get(tid, 0), ALWAYS_REASON)
                about.append(Triggered(tid, t.name, t.version, round(score, 4), tuple(r),
                                       self._forbidden(t, qvec), t.mode))
        out = [x for x in always if x.target_id not in scores] if scores else list(always)
        only = len(out)
        for x in about:
            bisect.insort(out, x, key=_triggered_order)
        return Detection(out, always_on, only)

    def _always_on(self, tenant: str | None) -> AlwaysOn | None:
        """What the ``always`` signal triggers for ``tenant`` (the same on every request until
        the policy changes); made once per tenant and policy change, so a request with thousands
        of always-on targets copies a list instead of building thousands of entries. Called
        with the index lock held."""
        signal = next((s for s in self.signals if isinstance(s, AlwaysSignal)), None)
        if signal is None or not signal.ids:
            return None
        if tenant in self._always_cache:
            return self._always_cache[tenant]
        hits = [t for t in (self._targets.get(tid) for tid in signal.ids) if t is not None and self._visible(t, tenant)]
        made = None
        if hits:
            entries = [self._always_entry(t) for t in hits]
            groups = self._by_owner(hits, [e[1] for e in entries])
            entries.sort(key=itemgetter(0))
            made = AlwaysOn(tuple(e[2] for e in entries), frozenset(t.id for t in hits), groups)
        self._always_cache[tenant] = made
        return made

    def _always_entry(self, t: ForgetTarget) -> tuple[str, str, Triggered]:
        """(order key, registration key, entry) of an always-on target's hit, made once per
        version (at sync, :meth:`_index_names`): rebuilding a tenant's set after a change then
        costs string sorts, not thousands of entries. Its score is 1.0 like every always-on
        hit's, so the order key is :func:`_triggered_order`'s name key (then the id)."""
        hit = self._always_entries.get(t.id)
        if hit is None or hit[2].version != t.version:
            x = Triggered(t.id, t.name, t.version, 1.0, (ALWAYS_REASON,), self._forbidden(t, None), t.mode)
            hit = self._always_entries[t.id] = (f"{name_key(t.name)}\x00{t.id}", f"{t.created_at:020.6f}\x00{t.id}", x)
        return hit

    @staticmethod
    def _by_owner(hits: list[ForgetTarget], keys: list[str]) -> tuple[tuple[ForgetTarget, ...], ...]:
        """``hits`` grouped by the tenant that owns them (global targets first), each group in
        registration order (``keys``: their registration keys, see :meth:`_always_entry`)."""
        by_owner: dict[str | None, list[tuple[str, ForgetTarget]]] = {}
        for key, t in zip(keys, hits):
            by_owner.setdefault(t.tenant, []).append((key, t))
        return tuple(tuple(t for _, t in sorted(g, key=itemgetter(0)))
                     for _, g in sorted(by_owner.items(), key=lambda kv: (kv[0] is not None, kv[0] or "")))

    def always_groups(self) -> list[tuple[ForgetTarget, ...]]:
        """Every owner's always-on targets, in registration order (the groups of every
        tenant's :class:`AlwaysOn`): what the server precompiles as set parts."""
        signal = next((s for s in self.signals if isinstance(s, AlwaysSignal)), None)
        with self._lock:
            hits = [t for t in (self._targets.get(tid) for tid in (signal.ids if signal else ())) if t is not None]
            return list(self._by_owner(hits, [self._always_entry(t)[1] for t in hits]))

    def _views(self, window: str) -> list[tuple[str, bool]]:
        """What the embedder reads of one window, as (text, whether a name was read as
        "someone") pairs: the window with every name no target's texts mention (a capitalised
        word no dictionary has, see :meth:`_rare_tokens`) read as "someone", and, where a name
        some target's texts do mention remains, also the window with every name read so.

        A name no target mentions is evidence for no target, and it must not be evidence
        against one either: a client who adds one to a question that describes a target
        ("Xavrel asks: who has the occupation sculptor?") would otherwise switch the
        embedding signal off. Read as "someone", a question about an unregistered person
        ("Who is the mother of Brask Ulleroy?") becomes its bare shape, which must clear the
        threshold by :attr:`named_margin`, calibrated on such shapes. The second view does
        the same for a name that only other targets mention, which the grounding rule of
        :meth:`_embedding_hits` would otherwise turn against this one; and a third, the
        window's sentences that name no one, for a name added in a sentence of its own
        ("... Thanks, Mirelda."), which dilutes a short question's vector."""
        unknown = named = False

        def anonymise(every_name: bool) -> str:
            def one(m: re.Match) -> str:
                nonlocal unknown, named
                word = m.group(0)
                rare = self._rare_tokens(word)
                if not rare:
                    return word
                if any(tok in self._vocab_count for tok in rare):
                    named = True
                    if not every_name:
                        return word
                else:
                    unknown = True
                return "someone's" if _POSSESSIVE.search(word) else "someone"
            return _SOMEONE_RUN.sub("", _CAPITALISED.sub(one, window))

        first = anonymise(every_name=False)
        views = [(first, True) if unknown else (window, False)]
        if named:
            views.append((anonymise(every_name=True), True))
        if unknown or named:
            # A name in a sentence of its own ("... Thanks, Mirelda.") dilutes a short question
            # as much as it names anyone: the sentences that name no one count too.
            sentences = _SENTENCE_END.split(window)
            rest = [x for x in sentences if not self._rare_tokens(x)]
            if rest and len(rest) < len(sentences):
                views.append((" ".join(rest), True))
        return views

    def _embedding_hits(self, chunks: list[str], qv: np.ndarray, anonymised: Sequence[bool] = ()) -> dict:
        """The retrieval shared by the embedding and hidden-state signals (``Query.retrieval``)
        and calibration: best vector hit per target over the chunks (as :meth:`_views` gives
        them; where ``anonymised[i]``, chunk i's scores count less :attr:`named_margin`),
        grounded: a chunk that names something this target's texts never mention but another
        target's do is about that other target, however close its wording is to this one's
        ("Who is the mother of <another target>?"); the chunk's view with every name read as
        "someone" still counts for this target. A lower-case nonce word names nothing."""
        best: dict[str, VectorHit] = {}
        margin = self.named_margin
        for i, (chunk, row) in enumerate(zip(chunks, self.vectors.search(qv, self.config.top_k))):
            rare = self._rare_tokens(chunk)
            less = margin if i < len(anonymised) and anonymised[i] else 0.0
            for vh in row:
                if rare and not (rare & self._vocab.get(vh.target_id, frozenset())):
                    continue
                if less:
                    vh = replace(vh, score=vh.score - less)
                if vh.target_id not in best or vh.score > best[vh.target_id].score:
                    best[vh.target_id] = vh
        return best

    def _rare_tokens(self, text: str) -> set[str]:
        """Words of ``text`` that name something: capitalised, not in the dictionary."""
        common = common_words()
        named = {t for word in _CAPITALISED.findall(text) for t in tokens(word)}
        return {t for t in named if len(t) >= 4 and t.isalpha() and t not in common}

    def _target_vocab(self, t: ForgetTarget) -> frozenset[str]:
        parts = [*t.all_names, t.description, *t.facts.values(), *t.texts]
        return frozenset(tok for p in parts for tok in tokens(p))

    def _forbidden(self, t: ForgetTarget, qvec) -> tuple[str, ...]:
        """GUARD's retrieval step for ``t``: its facts ranked by ``qvec`` where given."""
        fact_vecs = self._fact_vecs.get(t.id)
        if qvec is None or not fact_vecs:
            phrases = self._phrases.get(t.id)
            if phrases is None or self._targets.get(t.id) is not t:
                phrases = tuple(forbidden_phrases(t))
                if self._targets.get(t.id) is t:
                    self._phrases[t.id] = phrases
            return phrases
        return tuple(forbidden_phrases(t, rank_facts(t, qvec, fact_vecs)))

    def forbidden(self, target_id: str, messages=None) -> list[str]:
        """GUARD's retrieval step for one target: names, aliases, fact values (most
        relevant to ``messages`` first), never stop-words."""
        with self._lock:
            t = self._targets.get(target_id) or self.store.get(target_id)
        qvec = None
        if messages is not None and self.embedder is not None:
            chunks = self._chunks(message_texts(messages))
            qvec = self.embedder.encode([self._views(chunks[0])[0][0]], query=True)[0] if chunks else None
        return list(self._forbidden(t, qvec))

    # -- calibration --------------------------------------------------------------------
    def embedding_scores(self, texts: list[str]) -> list[tuple[str | None, float]]:
        """(best target id, score) of each text, ignoring the threshold: the cosine, less
        :attr:`named_margin` where the best hit came from a view with a name read as "someone"."""
        margin = self.named_margin
        out = []
        for plain, named in self._view_scores(texts):
            if named is not None and (plain is None or named[1] - margin > plain[1]):
                out.append((named[0], named[1] - margin))
            else:
                out.append(plain or (None, 0.0))
        return out

    def _view_scores(self, texts: list[str]) -> list[tuple[tuple[str, float] | None, tuple[str, float] | None]]:
        """Per text, the best grounded (target id, cosine) over its views as written and over
        its views with a name read as "someone" (:meth:`_views`), each None where it has none."""
        if self.vectors is None or not self.vectors.ntotal:
            return [(None, None) for _ in texts]
        views = [self._views(text) for text in texts]
        vecs = self.embedder.encode([v for vs in views for v, _ in vs], cache=False, query=True)
        out, k = [], 0
        with self._lock:
            for vs in views:
                best = []
                for anonymised in (False, True):
                    rows = [k + i for i, (_, a) in enumerate(vs) if a == anonymised]
                    hits = self._embedding_hits([vs[r - k][0] for r in rows], vecs[rows]) if rows else {}
                    top = max(hits.values(), key=lambda h: h.score, default=None)
                    best.append((top.target_id, top.score) if top else None)
                out.append((best[0], best[1]))
                k += len(vs)
        return out

    def calibrate(self, negatives: list[str] | None = None, positives: list[tuple[str, str]] | None = None,
                  max_fp: float = 0.002, save: bool = True, actor: str = "calibrate") -> dict:
        """Choose the embedding threshold and :attr:`named_margin` from data and store them
        with the policy.

        Without data of its own it uses ``calibration.negatives()`` (everyday questions
        and the targets' question shapes about invented people) and
        ``calibration.positives()`` (questions describing targets without naming them)."""
        from guardserve.classifiers import calibration

        if self.vectors is None:
            raise DetectionError("calibration needs the embedding retriever (use_embeddings=True)")
        self.sync(force=True)
        negatives = negatives if negatives is not None else calibration.negatives()
        positives = positives if positives is not None else calibration.positives(self.targets())
        # Two bars from one set of negatives: the threshold over windows as written, and the
        # one the same negatives' views with names read as "someone" must not reach (most
        # negatives are question shapes about invented people, which read as bare shapes).
        scores = self._view_scores(negatives)
        plain = np.array([p[1] if p else 0.0 for p, _ in scores])
        named = np.array([n[1] for _, n in scores if n is not None])
        # Rounded as stored, so this detector serves the values every replica reads back.
        th = round(calibration.choose_threshold(plain, max_fp=max_fp), 4)
        margin = round(max(0.0, calibration.choose_threshold(named, max_fp=max_fp) - th), 4) if len(named) else 0.0
        if self.config.threshold is None:
            self._threshold = th
        self._named_margin = margin
        neg = np.array([s for _, s in self.embedding_scores(negatives)])
        pos = self.embedding_scores([q for _, q in positives]) if positives else []
        recall = float(np.mean([tid == want and s >= th for (want, _), (tid, s) in zip(positives, pos)])) if pos else None
        result = {"threshold": round(th, 4), "named_margin": round(margin, 4), "rule": CALIBRATION_RULE,
                  "max_fp": max_fp, "negatives": len(negatives), "fp_rate": float(np.mean(neg >= th)) if len(neg) else 0.0,
                  "positives": len(positives), "embedding_recall": recall, "targets": len(self._targets),
                  "at": time.time()}
        if save:
            self.store.set_setting(THRESHOLD_SETTING, result, actor=actor)
        return result
