"""Detector signals: each says, on its own evidence, which targets a conversation asks about.

A signal is one class in one file of this package, and one line in ``SIGNALS`` below.
``Detector`` builds the signals named by ``DetectorConfig.signals`` (in that order), asks
each for its ``Hit``\\ s on every detection and merges them: per target the highest score,
the reasons of every signal that fired (deduplicated, in signal order). The detector
keeps the shared indexes (lexical automaton, target vectors) in step with the policy
store; a signal reads them and may keep an index of its own through ``add``/``remove``.

| name | file | fires on |
|---|---|---|
| ``lexical`` | ``lexical.py`` | names, aliases, fact values in the text (one automaton) |
| ``embedding`` | ``embedding.py`` | a window close to one of a target's texts (cosine >= threshold), grounded |
| ``hidden_state`` | ``hidden_state.py`` | GUARD's hidden-state MLP says "forget"; the closest target by cosine is named |
| ``always`` | ``always.py`` | targets registered with mode ``always``, on every request |
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import numpy as np

    from guardserve.classifiers.detector import Detector
    from guardserve.classifiers.embedding import VectorHit
    from guardserve.policy.model import ForgetTarget


@dataclass(frozen=True)
class Hit:
    """One signal's evidence that the conversation asks about ``target_id``."""

    target_id: str
    score: float      # in [0, 1]; the detector keeps the highest per target
    reason: str       # shown to operators (``Triggered.reasons``); equal reasons are merged


class Query:
    """One detection's input, as the signals see it.

    ``texts``: the conversation's texts, oldest first (system prompt included).
    ``lexical_only``: more texts for the lexical signal alone (text whose meaning is known).
    ``tenant`` and ``visible(target_id)``: the caller's tenant and whether a target is
    visible to it (the detector drops hits on the others anyway).
    ``embeddings``: whether signals that need embeddings run on this query (the caller
    asked for them, and the detector has target vectors).

    The embedding work is lazy and shared: ``windows()`` (the texts cut into embedding
    windows, newest first, as the embedder reads them: ``Detector._views``), ``vectors()`` (the embedder's output for them: one call per
    detection, whichever signals ask) and ``retrieval()`` (the best grounded vector hit per
    target over the windows, below any threshold) are computed on first use and kept."""

    def __init__(self, detector: Detector, texts: list[str], lexical_only: list[str], tenant: str | None,
                 embeddings: bool):
        self.detector = detector
        self.texts = texts
        self.lexical_only = lexical_only
        self.tenant = tenant
        self.embeddings = embeddings
        self._windows: list[str] | None = None
        self._anonymised: list[bool] = []
        self._vectors: np.ndarray | None = None
        self._retrieval: dict[str, VectorHit] | None = None

    def visible(self, target_id: str) -> bool:
        t = self.detector.target(target_id)
        return t is not None and self.detector._visible(t, self.tenant)

    def windows(self) -> list[str]:
        """Embedding windows over ``texts``, each as the embedder reads it (names no target
        mentions read as "someone"; ``[]`` where embeddings are off)."""
        if self._windows is None:
            chunks = self.detector._chunks(self.texts) if self.embeddings else []
            views = [view for chunk in chunks for view in self.detector._views(chunk)]
            self._windows = [text for text, _ in views]
            self._anonymised = [anonymised for _, anonymised in views]
        return self._windows

    def vectors(self) -> np.ndarray | None:
        """The windows' embeddings, one row each (None without windows)."""
        if self._vectors is None and self.windows():
            embedder = self.detector.embedder
            assert embedder is not None  # windows exist only with embeddings on, so with an embedder
            self._vectors = embedder.encode(self.windows(), query=True)
        return self._vectors

    def vector(self) -> np.ndarray | None:
        """The newest window's embedding: GUARD's retrieval step ranks fact values by it."""
        v = self.vectors()
        return None if v is None else v[0]

    def retrieval(self) -> dict[str, VectorHit]:
        """Best grounded vector hit per target over the windows, whatever its score."""
        if self._retrieval is None:
            v = self.vectors()
            self._retrieval = self.detector._embedding_hits(self.windows(), v, self._anonymised) if v is not None else {}
        return self._retrieval


class Signal(ABC):
    """One source of detection evidence.

    Contract:

    * ``__init__(detector)`` runs once, when the ``Detector`` is built and before it
      indexes the store's targets; a signal that cannot work as configured raises there
      (``ValueError``), so a server refuses to start rather than serve with it missing.
    * ``add(target)`` / ``remove(target_id)`` (optional) keep an index of the signal's
      own in step with the policy: every target the detector indexes or drops, with the
      detector's index lock held; they must be quick (they run inside policy syncs).
    * ``hits(query)`` runs on every detection, with the detector's index lock held: it
      reads the detector's indexes (``lexical``, ``vectors``, ``threshold``, ``config``,
      ``target(id)``) and the ``Query``, changes nothing, and returns its hits. It gets the
      embedder's work from ``query`` only (never calling the embedder itself), so the
      embedder runs at most once per detection. Signals with ``needs_embeddings`` run only
      when ``query.embeddings`` is true (``detect(..., embeddings=False)`` is the
      microsecond first look). Hits on unknown or invisible targets are dropped by the
      detector; any exception fails the detection closed (``DetectionError``).
    """

    name: ClassVar[str]
    needs_embeddings: ClassVar[bool] = False

    def __init__(self, detector: Detector) -> None:
        self.detector = detector

    def add(self, target: ForgetTarget) -> None:
        """A target was indexed (new, or a new version replacing the old)."""

    def remove(self, target_id: str) -> None:
        """A target was dropped (deleted, or about to be replaced by its new version)."""

    @abstractmethod
    def hits(self, query: Query) -> Iterable[Hit]:
        """This signal's evidence about ``query`` (abstract: a subclass that does not define
        it cannot be instantiated)."""


# The registry, name -> Signal class: a new signal is a new file here, its import and one line below.
# (Imported last: the signal modules import Hit, Query and Signal from this package.)
from guardserve.classifiers.signals.always import AlwaysSignal  # noqa: E402
from guardserve.classifiers.signals.embedding import EmbeddingSignal  # noqa: E402
from guardserve.classifiers.signals.hidden_state import HiddenStateSignal  # noqa: E402
from guardserve.classifiers.signals.lexical import LexicalSignal  # noqa: E402

SIGNALS: dict[str, Callable[[Detector], Signal]] = {
    "lexical": LexicalSignal,
    "embedding": EmbeddingSignal,
    "hidden_state": HiddenStateSignal,
    "always": AlwaysSignal,
}

# Today's detector: every signal, in this order (the order of the reasons of a target).
DEFAULT_SIGNALS: tuple[str, ...] = ("lexical", "embedding", "hidden_state", "always")

__all__ = ["DEFAULT_SIGNALS", "SIGNALS", "Hit", "Query", "Signal"]
