"""The ``always`` signal: targets registered with mode ``always`` trigger on every request
of a tenant that sees them (score 1.0), whatever the conversation says."""

from __future__ import annotations

from collections.abc import Iterator

from guardserve.classifiers.signals import Hit, Query, Signal
from guardserve.policy.model import ForgetTarget

REASON = "mode 'always'"  # the only reason of a target that triggered on its mode alone


class AlwaysSignal(Signal):
    name = "always"
    needs_embeddings = False

    def __init__(self, detector) -> None:
        super().__init__(detector)
        self.ids: set[str] = set()    # a set: no pass over every target per request

    def add(self, target: ForgetTarget) -> None:
        if target.mode == "always":
            self.ids.add(target.id)

    def remove(self, target_id: str) -> None:
        self.ids.discard(target_id)

    def hits(self, query: Query) -> Iterator[Hit]:
        for tid in self.ids:
            if query.visible(tid):
                yield Hit(tid, 1.0, REASON)
