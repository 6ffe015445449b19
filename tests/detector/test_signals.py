"""The detector's signals (``guardserve/classifiers/signals/``): every registered signal
fires on its own, with its reason; the ``Signal`` contract (a custom signal registered in
a test detector is merged: highest score per target, reasons once each, in order, hits on
unknown or invisible targets dropped, its own index kept through add/remove); the shared
``Query`` (one embedder call and one retrieval per detection); configuration errors."""

from __future__ import annotations

import numpy as np
import pytest

from guardserve.classifiers import DetectionError, Detector, DetectorConfig
from guardserve.classifiers.embedding import target_texts
from guardserve.classifiers.signals import DEFAULT_SIGNALS, SIGNALS, Hit, Query, Signal


def _detector(store, embedder=None, vector_cache=None, **config) -> Detector:
    config.setdefault("sync_interval_s", 0.0)
    if config.get("use_embeddings", True):
        config.setdefault("vector_cache", vector_cache)
    return Detector(store, DetectorConfig(**config), embedder=embedder)


def _by_name(triggered):
    return {t.name: t for t in triggered}


class FakeClassifier:
    """Stands in for GUARD's hidden-state MLP: a fixed P(forget), and the texts it saw."""

    def __init__(self, p: float):
        self.p, self.seen = p, []

    def predict_proba(self, texts):
        self.seen.append(list(texts))
        return np.full(len(texts), self.p)


# --------------------------------------------------------------------------- the registry


def test_registry_and_default_set():
    assert DetectorConfig().signals == DEFAULT_SIGNALS == ("lexical", "embedding", "hidden_state", "always")
    assert set(DEFAULT_SIGNALS) == set(SIGNALS)
    for name, cls in SIGNALS.items():
        assert issubclass(cls, Signal) and cls.name == name, name
    assert {n for n, c in SIGNALS.items() if c.needs_embeddings} == {"embedding", "hidden_state"}


# --------------------------------------------------------------------------- each signal fires alone


def test_lexical_signal(store, world):
    det = _detector(store, use_embeddings=False, signals=("lexical",))
    qa = world["forget"][1]
    [t] = det.detect([{"role": "user", "content": qa["question"]}])
    assert t.name == qa["entity"] and t.score == 1.0
    assert any(r.endswith("mentioned") for r in t.reasons), t.reasons
    # A conversation of several messages says which message; lexical_only texts are read too.
    name = world["forget"][0]["entity"]
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Who is {name}?"}]
    assert any(r.endswith("(message 1)") for r in _by_name(det.detect(conv))[name].reasons)
    assert det.detect("What is the weather like?") == []
    assert [t.name for t in det.detect("What is the weather like?", lexical_only=[f"About {name}."])] == [name]


def test_embedding_signal(store, world, embedder, vector_cache):
    det = _detector(store, embedder, vector_cache, signals=("embedding",))
    ent = next(e for e in world["entities"] if e["split"] == "forget")
    t = next(t for t in det.targets() if t.name == ent["name"])
    label, question = next((lb, q) for lb, q in target_texts(t) if lb.startswith("question:"))
    trig = _by_name(det.detect(question))
    assert ent["name"] in trig, question
    hit = trig[ent["name"]]
    assert hit.score >= det.threshold
    assert any(r.startswith(f"similar to its question {question[:80]!r} (cosine ") and r.endswith(f">= {det.threshold:.2f})")
               for r in hit.reasons), hit.reasons
    # embeddings=False: only the signals that need no embeddings run (none here).
    assert det.detect(question, embeddings=False) == []
    # lexical_only texts are the lexical signal's alone.
    assert ent["name"] not in _by_name(det.detect("What is the weather like?", lexical_only=[question]))


def test_hidden_state_signal(store, world, embedder, vector_cache):
    clf = FakeClassifier(0.9)
    det = _detector(store, embedder, vector_cache, signals=("hidden_state",), hidden_state=clf)
    qa = world["forget"][3]
    trig = det.detect([{"role": "system", "content": "Answer."}, {"role": "user", "content": qa["question"]}])
    assert [t.name for t in trig] == [qa["entity"]]        # the closest target by cosine
    assert trig[0].score == 0.9
    [reason] = trig[0].reasons
    assert reason.startswith("hidden-state classifier p=0.90, closest target by cosine ")
    assert clf.seen[-1] == ["Answer.\n" + qa["question"]]   # the whole conversation, once
    # Below 0.5: nothing; embeddings=False: the classifier is not even asked.
    clf.p = 0.4
    assert det.detect(qa["question"]) == []
    n = len(clf.seen)
    assert det.detect(qa["question"], embeddings=False) == [] and len(clf.seen) == n
    # Set after the detector was built (as classifiers/evaluation.py may): read per detection.
    det.config.hidden_state = FakeClassifier(0.8)
    assert det.detect(qa["question"])[0].score == 0.8


def test_always_signal(store):
    det = _detector(store, use_embeddings=False, signals=("always",))
    z = store.add({"name": "Zed Quorrow", "tenant": "other", "mode": "always"})
    [t] = det.detect("What is the weather like?", tenant="other")
    assert t.name == "Zed Quorrow" and t.score == 1.0 and t.reasons == ("mode 'always'",)
    assert [t.name for t in det.detect("What is the weather like?")] == ["Zed Quorrow"]   # every tenant
    assert det.detect("What is the weather like?", tenant="acme") == []
    assert det.detect("anything", tenant="other", embeddings=False)                      # needs no embeddings
    store.update(z.id, {"mode": "detected"})
    assert det.detect("What is the weather like?", tenant="other") == []
    store.update(z.id, {"mode": "always"})
    assert det.detect("What is the weather like?", tenant="other")
    store.delete(z.id)
    assert det.detect("What is the weather like?", tenant="other") == []


# --------------------------------------------------------------------------- the Signal contract


class Custom(Signal):
    """Hits from a table: (target name, score, reason) per entry; names it cannot resolve
    become unknown ids. Records add/remove."""

    name = "custom"
    table: list[tuple[str, float, str]] = []

    def __init__(self, detector):
        super().__init__(detector)
        self.added, self.removed = [], []

    def add(self, target):
        self.added.append(target.name)

    def remove(self, target_id):
        self.removed.append(target_id)

    def hits(self, query: Query):
        ids = {t.name: t.id for t in self.detector.targets()}
        for name, score, reason in self.table:
            yield Hit(ids.get(name, f"unknown:{name}"), score, reason)


def test_custom_signal_is_merged(store, world, monkeypatch):
    monkeypatch.setitem(SIGNALS, "custom", Custom)
    forget = [e["name"] for e in world["entities"] if e["split"] == "forget"]
    x, y = forget[0], forget[1]
    secret = store.add({"name": "Acme Secret Project", "tenant": "acme", "kind": "topic"})
    monkeypatch.setattr(Custom, "table", [
        (x, 0.3, "custom says x"), (x, 0.3, "custom says x"),       # lower than lexical's 1.0; said twice
        (y, 0.4, "custom says y, weakly"), (y, 0.7, "custom says y"),  # the higher score wins
        ("Acme Secret Project", 0.99, "custom says acme"),            # invisible to tenant 'other'
        ("Nobody At All", 1.0, "custom says nobody"),                 # no such target
    ])
    det = _detector(store, use_embeddings=False, signals=(*DEFAULT_SIGNALS, "custom"))
    custom = det.signals[-1]
    assert isinstance(custom, Custom) and [s.name for s in det.signals] == [*DEFAULT_SIGNALS, "custom"]
    assert set(custom.added) == {t.name for t in store.list()}      # indexed before the first detection

    trig = det.detect(f"Who is {x}?", tenant="other")
    assert [t.name for t in trig] == [x, y]                          # best first
    tx, ty = trig
    assert tx.score == 1.0 and tx.reasons[-1] == "custom says x" and tx.reasons.count("custom says x") == 1
    assert any(r.endswith("mentioned") for r in tx.reasons[:-1])     # lexical's reasons come first
    assert ty.score == 0.7 and ty.reasons == ("custom says y, weakly", "custom says y")
    assert "Acme Secret Project" in _by_name(det.detect("hello", tenant="acme"))

    store.delete(secret.id)
    det.detect("hello")
    assert secret.id in custom.removed
    assert "Acme Secret Project" not in _by_name(det.detect("hello", tenant="acme"))


def test_signal_needing_embeddings_is_skipped_without_them(store, monkeypatch):
    class NeedsVectors(Custom):
        name = "needs_vectors"
        needs_embeddings = True

    monkeypatch.setitem(SIGNALS, "needs_vectors", NeedsVectors)
    monkeypatch.setattr(NeedsVectors, "table", [("Nobody", 1.0, "never")])
    det = _detector(store, use_embeddings=False, signals=("needs_vectors",))
    seen = []
    monkeypatch.setattr(NeedsVectors, "hits", lambda self, q: seen.append(q) or [])
    assert det.detect("hello") == [] and seen == []


def test_a_failing_signal_fails_closed(store, monkeypatch):
    class Broken(Custom):
        name = "broken"

        def hits(self, query):
            raise KeyError("index gone")

    monkeypatch.setitem(SIGNALS, "broken", Broken)
    det = _detector(store, use_embeddings=False, signals=("lexical", "broken"))
    with pytest.raises(DetectionError, match="refusing"):
        det.detect("hello")


def test_query_embeds_and_retrieves_once_per_detection(store, world, embedder, vector_cache, monkeypatch):
    """Every signal that reads vectors (embedding, hidden-state, a custom one) shares one
    embedder call and one retrieval pass."""
    class Reader(Custom):
        name = "reader"
        needs_embeddings = True

        def hits(self, query):
            assert query.vectors() is not None and len(query.vectors()) == len(query.windows())
            top = max(query.retrieval().values(), key=lambda h: h.score)
            yield Hit(top.target_id, 0.5, "reader")

    monkeypatch.setitem(SIGNALS, "reader", Reader)
    det = _detector(store, embedder, vector_cache, signals=(*DEFAULT_SIGNALS, "reader"), hidden_state=FakeClassifier(0.9))
    calls = {"encode": 0, "retrieval": 0}
    encode, retrieve = embedder.encode, det._embedding_hits

    def counting_encode(*a, **k):
        calls["encode"] += 1
        return encode(*a, **k)

    def counting_retrieval(*a, **k):
        calls["retrieval"] += 1
        return retrieve(*a, **k)

    monkeypatch.setattr(embedder, "encode", counting_encode)
    monkeypatch.setattr(det, "_embedding_hits", counting_retrieval)
    qa = world["forget"][2]
    trig = _by_name(det.detect(qa["question"]))
    assert calls == {"encode": 1, "retrieval": 1}
    reasons = trig[qa["entity"]].reasons
    assert any(r.startswith("hidden-state classifier") for r in reasons) and "reader" in reasons


# --------------------------------------------------------------------------- configuration


def test_configuration_errors(store, tmp_path, embedder, vector_cache):
    with pytest.raises(ValueError, match="unknown detector signal"):
        _detector(store, use_embeddings=False, signals=("lexical", "telepathy"))
    with pytest.raises(ValueError, match="not among its signals"):
        _detector(store, use_embeddings=False, signals=("lexical",), hidden_state_model=str(tmp_path / "m.pt"))
    with pytest.raises(ValueError, match="needs use_embeddings"):
        _detector(store, use_embeddings=False, hidden_state_model=str(tmp_path / "m.pt"))
    with pytest.raises(ValueError, match="not both"):
        _detector(store, use_embeddings=False, hidden_state=FakeClassifier(0.9), hidden_state_model=str(tmp_path / "m.pt"))
    with pytest.raises(FileNotFoundError):
        _detector(store, embedder, vector_cache, hidden_state_model=str(tmp_path / "m.pt"))
