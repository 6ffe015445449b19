"""The embedding signal: the conversation's windows against every target text's vector
(bundled all-MiniLM-L6-v2 + faiss), grounded (a window naming someone the target's texts
never mention is about that someone: see ``Detector._embedding_hits``), a hit where the
best cosine reaches the detector's threshold (calibrated, stored with the policy)."""

from __future__ import annotations

from collections.abc import Iterator

from guardserve.classifiers.signals import Hit, Query, Signal


class EmbeddingSignal(Signal):
    name = "embedding"
    needs_embeddings = True

    def hits(self, query: Query) -> Iterator[Hit]:
        if not query.windows():
            return
        th = self.detector.threshold
        for vh in query.retrieval().values():
            if vh.score >= th:
                yield Hit(vh.target_id, vh.score, f"similar to its {vh.label.split(':')[0]} "
                          f"{vh.text[:80]!r} (cosine {vh.score:.2f} >= {th:.2f})")
