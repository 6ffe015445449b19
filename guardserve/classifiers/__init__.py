"""GUARD detection: does this conversation ask about a forget target?

``Detector(store).detect(messages) -> list[Triggered]`` merges the hits of its signals
(``classifiers/signals/``, one file each: the lexical matcher over aliases and distinctive
facts, the embedding retriever on the bundled all-MiniLM-L6-v2 + faiss, GUARD's optional
hidden-state MLP, and ``always`` targets) and adds GUARD's retrieval step
(``Triggered.forbidden``: the phrases the logit filter compiles with ``compile_phrases``).
Importing this package is cheap; the embedder loads when a Detector with embeddings is built.
"""

from guardserve.classifiers.detector import (
    AlwaysOn,
    Detection,
    DetectionError,
    Detector,
    DetectorConfig,
    PolicyStaleError,
    Triggered,
    message_texts,
)
from guardserve.classifiers.retrieval import forbidden_phrases

__all__ = ["AlwaysOn", "Detection", "DetectionError", "Detector", "DetectorConfig", "PolicyStaleError", "Triggered",
           "forbidden_phrases", "message_texts"]
