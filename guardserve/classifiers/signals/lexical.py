"""The lexical signal: names, aliases, derived surnames and distinctive fact values of
the targets, found in the text by one automaton (``classifiers/lexical.py``: exact, glued
and fuzzy matches), with the pattern's score (1.0 for names, lower for fact values).

It reads the conversation and the ``lexical_only`` texts, and needs no embeddings (it is
the whole of ``detect(..., embeddings=False)`` with ``always``)."""

from __future__ import annotations

from collections.abc import Iterator

from guardserve.classifiers.signals import Hit, Query, Signal


class LexicalSignal(Signal):
    name = "lexical"
    needs_embeddings = False

    def hits(self, query: Query) -> Iterator[Hit]:
        texts = query.texts
        for i, text in enumerate(texts + query.lexical_only):
            for h in self.detector.lexical.match(text):
                yield Hit(h.pattern.target_id, h.pattern.score, h.reason + (f" (message {i})" if len(texts) > 1 else ""))
