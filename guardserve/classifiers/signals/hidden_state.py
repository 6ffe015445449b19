"""The hidden-state signal: GUARD's classifier (``classifiers/hidden_state.py``, an MLP on
the serving model's hidden states) says *whether* the conversation is about the forget
set (p > 0.5); the embedding retriever's closest target (below its own threshold) says
*which*, and the hit carries p as its score.

The classifier is ``DetectorConfig.hidden_state`` (an object with ``predict_proba``, as
``classifiers/evaluation.py`` sets it) or else the one saved at
``DetectorConfig.hidden_state_model`` (``HiddenStateClassifier.save``), loaded when the
Detector is built. With neither, the signal is off (the default) and costs nothing."""

from __future__ import annotations

from collections.abc import Iterator

from guardserve.classifiers.signals import Hit, Query, Signal


class HiddenStateSignal(Signal):
    name = "hidden_state"
    needs_embeddings = True

    def __init__(self, detector) -> None:
        super().__init__(detector)
        config = detector.config
        self.loaded = None
        if config.hidden_state_model is not None:
            if config.hidden_state is not None:
                raise ValueError("DetectorConfig: set hidden_state (a classifier) or hidden_state_model (its path), "
                                 "not both")
            if not config.use_embeddings:
                raise ValueError("DetectorConfig.hidden_state_model needs use_embeddings=True "
                                 "(the embedding retriever names the target)")
            from guardserve.classifiers.hidden_state import HiddenStateClassifier

            self.loaded = HiddenStateClassifier.load(config.hidden_state_model)

    @property
    def classifier(self):
        # Read per detection: config.hidden_state may be set after the Detector was built.
        clf = self.detector.config.hidden_state
        return clf if clf is not None else self.loaded

    def hits(self, query: Query) -> Iterator[Hit]:
        clf = self.classifier
        if clf is None:
            return
        p = float(clf.predict_proba(["\n".join(query.texts)])[0])
        if p > 0.5:
            top = max(query.retrieval().values(), key=lambda h: h.score, default=None)
            if top is not None:
                yield Hit(top.target_id, p, f"hidden-state classifier p={p:.2f}, closest target by cosine {top.score:.2f}")
