"""The Detector end to end on a real store and the bundled embedder: detection over
whole conversations, reasons and forbidden phrases, incremental sync, tenants,
calibration stored with the policy, and failing closed."""

from __future__ import annotations

import numpy as np
import pytest

from guardserve.classifiers import DetectionError, Detector, DetectorConfig
from guardserve.classifiers.embedding import Embedder, VectorIndex
from guardserve.policy import SQLiteStore


@pytest.fixture
def detector(store, embedder, vector_cache):
    return Detector(store, DetectorConfig(sync_interval_s=0.0, vector_cache=vector_cache), embedder=embedder)


def _names(triggered):
    return [t.name for t in triggered]


def test_forget_question_triggers_with_reasons_and_forbidden(detector, world):
    qa = world["forget"][1]
    trig = detector.detect([{"role": "user", "content": qa["question"]}])
    assert _names(trig) == [qa["entity"]]
    t = trig[0]
    assert t.score == 1.0 and t.version == 1 and any("mentioned" in r for r in t.reasons)
    assert t.forbidden[0] == qa["entity"]
    assert qa["value"] in t.forbidden
    # GUARD's retrieval: the fact asked about comes before the other fact values.
    facts = [p for p in t.forbidden if p in world["entities"][0]["facts"].values() or p == qa["value"]]
    assert facts[0] == qa["value"]
    assert not {p.lower() for p in t.forbidden} & {"the", "a", "was", "of", "in", "who"}


def test_retain_and_world_questions_pass(detector, world):
    qs = [qa["question"] for qa in world["retain"][::37]] + [qa["question"] for qa in world["world_facts"][::5]]
    assert [q for q in qs if detector.detect(q)] == []


def test_whole_conversation_is_read(detector, world):
    name = world["forget"][0]["entity"]
    conv = [{"role": "system", "content": f"The user is researching {name}."},
            {"role": "user", "content": "Where was this person born?"}]
    assert _names(detector.detect(conv)) == [name]
    parts = [{"role": "user", "content": [{"type": "text", "text": "About"}, {"type": "text", "text": name}]}]
    assert _names(detector.detect(parts)) == [name]


def test_changes_are_picked_up_incrementally(detector, store):
    vec_ids = {k: v.copy() for k, v in detector.vectors._by_target.items()}
    lex = dict(detector.lexical._by_target)
    t = store.add({"name": "Orla Quenby", "aliases": ["Quenby"], "facts": {"award": "the Vossic Star"}})
    assert _names(detector.detect("Who received the Vossic Star?")) == ["Orla Quenby"]
    # Nothing else was re-indexed: same vector ids and lexical entries for the others.
    for k, v in vec_ids.items():
        assert np.array_equal(detector.vectors._by_target[k], v)
        assert detector.lexical._by_target[k] is lex[k]
    store.update(t.id, {"aliases": ["Lady Q"], "facts": {}})
    assert _names(detector.detect("Tell me about Lady Q")) == ["Orla Quenby"]
    assert detector.detect("Who received the Vossic Star?") == []
    assert detector.detect("Tell me about Quenby")[0].version == 2     # derived surname still applies
    store.delete(t.id)
    assert detector.detect("Tell me about Orla Quenby and Lady Q") == []
    assert t.id not in detector.vectors._by_target


def test_tenants_and_always_mode(detector, store):
    store.add({"name": "Acme Secret Project", "tenant": "acme", "kind": "topic"})
    store.add({"name": "Zed Quorrow", "tenant": "other", "mode": "always"})
    assert _names(detector.detect("What is the Acme Secret Project?", tenant="acme")) == ["Acme Secret Project"]
    assert _names(detector.detect("What is the Acme Secret Project?", tenant="other")) == ["Zed Quorrow"]
    always = detector.detect("What is the weather like?", tenant="other")
    assert _names(always) == ["Zed Quorrow"] and always[0].reasons == ("mode 'always'",)
    assert detector.detect("What is the weather like?", tenant="acme") == []


def test_an_always_on_targets_phrases_are_made_once_per_version(detector, store):
    """A target that triggers on its mode alone is not about the conversation: its phrases are
    not ranked against it, but made once per version (a request with thousands of such targets
    costs lookups), and an edit is in force from the next detection."""
    from guardserve.classifiers.retrieval import forbidden_phrases

    t = store.add({"name": "Zed Quorrow", "mode": "always", "facts": {"birth_place": "Vantrell Reach"}})
    first = {x.target_id: x for x in detector.detect("What is the weather like?")}[t.id]
    assert first.forbidden == tuple(forbidden_phrases(store.get(t.id))) and "Vantrell Reach" in first.forbidden
    again = {x.target_id: x for x in detector.detect("And tomorrow?")}[t.id]
    assert again.forbidden is first.forbidden  # the same tuple, not made again
    store.update(t.id, {"facts": {"birth_place": "Osk Harrow"}})
    edited = {x.target_id: x for x in detector.detect("And the day after?")}[t.id]
    assert "Osk Harrow" in edited.forbidden and "Vantrell Reach" not in edited.forbidden
    # Asked about by name, it is about the conversation: its facts are ranked as any target's.
    named = {x.target_id: x for x in detector.detect("Where was Zed Quorrow born?")}[t.id]
    assert named.reasons != ("mode 'always'",) and set(named.forbidden) == set(edited.forbidden)


def test_calibration_is_stored_with_the_policy(detector, store, embedder):
    from guardserve.classifiers import calibration

    result = detector.calibrate(negatives=calibration.negatives(n_people=12))
    assert 0.6 <= result["threshold"] < 1.0 and result["fp_rate"] <= 0.002
    assert store.get_setting("detector.embedding_threshold")["threshold"] == result["threshold"]
    again = Detector(store, DetectorConfig(vector_cache=detector.config.vector_cache), embedder=embedder)
    assert again.threshold == result["threshold"]
    # The calibrating detector serves exactly what every replica reads back.
    assert (detector.threshold, detector.named_margin) == (again.threshold, again.named_margin)
    assert [e.action for e in store.audit()][-1] == "setting"


def test_calibration_questions_do_not_depend_on_the_stores_order(tmp_path, world):
    """A store lists targets by their random ids: the same policy registered twice must give
    the same calibration questions (else two calibrations of one policy report different recall)."""
    from guardserve.classifiers import calibration
    from guardserve.classifiers.evaluation import world_targets

    asked = []
    for k in range(2):
        s = SQLiteStore(tmp_path / f"policy{k}.db")
        s.add_many(world_targets(world))
        targets = s.list()
        asked.append([(next(t.name for t in targets if t.id == tid), q) for tid, q in calibration.positives(targets)])
        asked.append([(next(t.name for t in targets if t.id == tid), q) for tid, q in calibration.positives(targets[::-1])])
        s.close()
    assert len(asked[0]) > 50 and all(a == asked[0] for a in asked)


def test_fails_closed(store, embedder, tmp_path, vector_cache):
    det = Detector(store, DetectorConfig(sync_interval_s=0.0, vector_cache=vector_cache), embedder=embedder)
    with pytest.raises(DetectionError):
        det.detect(42)
    with pytest.raises(DetectionError):
        det.detect([{"role": "user", "content": {"not": "text"}}])
    broken = SQLiteStore(tmp_path / "other.db")
    det2 = Detector(broken, DetectorConfig(sync_interval_s=0.0), embedder=embedder)
    broken.close()                                   # the policy store goes away
    with pytest.raises(DetectionError, match="refusing"):
        det2.detect("hello")


def test_a_policy_not_confirmed_within_its_bound_fails_closed(tmp_path, world):
    """A replica's detector (synced by the server's loop, not in detect) refuses once the store
    has not confirmed its policy for ``max_policy_age_s``, and serves again after a sync that
    reaches the store; a sync that fails does not count as a confirmation."""
    import time

    from guardserve.classifiers import PolicyStaleError

    store = SQLiteStore(tmp_path / "replica.db")
    det = Detector(store, DetectorConfig(use_embeddings=False, sync_in_detect=False, max_policy_age_s=0.3))
    question = world["forget"][0]["question"]
    assert det.detect(question) == [] and det.stale() is None and det.policy_seq == 0
    store.add({"name": world["forget"][0]["entity"]})
    assert det.detect(question) == [], "detect() must not sync when the caller's loop does"
    time.sleep(0.4)
    with pytest.raises(PolicyStaleError, match="last confirmed against the store"):
        det.detect(question)
    det.sync(force=True)
    assert det.stale() is None and det.policy_seq == store.last_seq() > 0
    assert _names(det.detect(question)) == [world["forget"][0]["entity"]]
    store.close()                                    # the store goes away: syncs fail, the age grows
    time.sleep(0.4)
    with pytest.raises(Exception):
        det.sync(force=True)
    assert det.policy_age_s > 0.3
    with pytest.raises(PolicyStaleError):
        det.detect(question)


def test_the_policy_is_confirmed_as_of_when_the_store_read_began(tmp_path, monkeypatch):
    """A sync thread held up after the store answered (a loaded host) must not confirm the
    policy as of the later moment it ran again: by then the store may be gone."""
    import time

    store = SQLiteStore(tmp_path / "replica.db")
    det = Detector(store, DetectorConfig(use_embeddings=False, sync_in_detect=False, max_policy_age_s=5.0))
    answer = store.changes_since

    def answered_then_held_up(*args, **kwargs):
        out = answer(*args, **kwargs)
        time.sleep(0.5)  # the store has answered; this thread waits for the interpreter
        return out

    monkeypatch.setattr(store, "changes_since", answered_then_held_up)
    time.sleep(0.2)
    det.sync(force=True)
    assert 0.5 <= det.policy_age_s < 1.5, det.policy_age_s
    store.close()


def test_fails_closed_when_the_embedder_breaks(store, vector_cache):
    emb = Embedder()
    det = Detector(store, DetectorConfig(sync_interval_s=0.0, vector_cache=vector_cache), embedder=emb)
    emb.model = None                                 # the model is gone (e.g. freed by a bad reload)
    if emb.onnx is not None:
        emb.onnx.session = None                      # and so is its ONNX twin, which answers requests
    with pytest.raises(DetectionError):
        det.detect("a question nobody asked before")


def test_lexical_only_detector_needs_no_embedder(store, world):
    det = Detector(store, DetectorConfig(use_embeddings=False))
    assert det.vectors is None
    assert _names(det.detect(world["forget"][0]["question"])) == [world["forget"][0]["entity"]]


def test_vector_index_turns_approximate_and_stays_incremental():
    rng = np.random.default_rng(0)
    idx = VectorIndex(dim=32, approx_above=300, nprobe=8)
    vecs = {}
    for i in range(40):
        v = rng.standard_normal((10, 32)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        vecs[f"t{i}"] = v
        idx.add(f"t{i}", [("fact:x", f"text {i}-{k}") for k in range(10)], v)
    assert idx.approximate and idx.ntotal == 400
    assert idx.search(vecs["t7"][3:4], 1)[0][0].target_id == "t7"
    idx.remove("t7")
    assert idx.ntotal == 390 and all(h.target_id != "t7" for h in idx.search(vecs["t7"][3:4], 5)[0])
    idx.add("t7", [("name", "again")], vecs["t7"][:1])
    assert idx.search(vecs["t7"][:1], 1)[0][0].target_id == "t7"


def test_bulk_import_is_matched_by_name_at_once_and_never_blocks_detection(detector, store):
    """Embedding a bulk import happens outside the index lock: detection keeps answering
    (by name) while another thread is still syncing, and vectors follow later."""
    import threading

    store.add_many([{"name": f"Bulkperson Number{i}", "facts": {"birth_place": f"Bulktown {i}"}} for i in range(300)])
    detector.sync(force=True, embed_budget_s=0.0)
    assert detector.pending == 300
    hit = detector.detect([{"role": "user", "content": "Where was Bulkperson Number7 born?"}])
    assert [t.name for t in hit] == ["Bulkperson Number7"] and "Bulktown 7" in hit[0].forbidden

    # A sync running in another thread (its lock held) must not stall a request.
    done = threading.Event()
    with detector._sync_lock:
        worker = threading.Thread(target=lambda: (detector.detect("Where was Bulkperson Number8 born?"), done.set()))
        worker.start()
        assert done.wait(30), "detect() waited for a running sync"
    while detector.pending:
        detector.sync(force=True)
    assert detector.vectors.ntotal > 0 and detector.pending == 0


def test_a_slow_embedding_never_ages_the_policy(detector, store, monkeypatch):
    """A server embeds new targets beside its store reads: while an embedding pass is stuck
    (a loaded CPU), syncs still confirm the policy current, so no replica refuses requests
    as stale because of its own embedding work (found by tests/test_replicas.py)."""
    import threading
    import time

    release, entered = threading.Event(), threading.Event()
    real = detector._embed

    def slow(targets):
        entered.set()
        release.wait(30)
        return real(targets)

    monkeypatch.setattr(detector, "_embed", slow)
    store.add({"name": "Velna Strosk", "facts": {"birth_place": "Ormund"}})
    detector.sync(force=True, embed_budget_s=0.0)
    worker = threading.Thread(target=detector.embed_pending, args=(60.0,))
    worker.start()
    try:
        assert entered.wait(30)
        time.sleep(0.3)
        store.add({"name": "Kettil Braume", "facts": {"birth_place": "Sarnow"}})
        t0 = time.monotonic()
        assert detector.sync(force=True, embed_budget_s=0.0) == 1
        assert time.monotonic() - t0 < 5 and detector.policy_age_s < 1.0
        assert [t.name for t in detector.detect("Where was Kettil Braume born?")] == ["Kettil Braume"]
    finally:
        release.set()
        worker.join(60)
    while detector.pending:
        detector.embed_pending(30.0)
    assert detector.pending == 0


def test_embedding_reads_deep_into_a_long_prompt():
    """A question placed behind 20,000 characters of filler is still embedded (the windows
    cover the whole prompt), and a question across a window boundary is whole in one window."""
    from guardserve.classifiers.detector import Detector, DetectorConfig

    det = Detector.__new__(Detector)
    det.config = DetectorConfig()
    question = "Where was the inventor of the brass lantern born?"
    filler = "lorem ipsum " * 2000
    chunks = det._chunks([question + " " + filler])
    assert any(question in c for c in chunks), "the start of a 24,000-character prompt is embedded"
    for cut in range(380, 520, 7):  # the question straddles the first window boundary
        text = "x" * cut + " " + question + " " + "y" * 600
        assert any(question in c for c in det._chunks([text])), cut
    assert det._chunks([filler * 10])  # bounded, and says so in the log
    assert len(det._chunks([filler * 10])) == det.config.max_chunks


def test_a_nonce_word_does_not_switch_the_embedding_signal_off(detector):
    """Questions that describe a target without naming it, with a made-up lower-case word
    added: still detected by the embedding signal. A capitalised unknown word reads as
    someone else's name, and the chunk is about that someone (the grounding rule)."""
    from guardserve.classifiers import calibration

    detector.calibrate()
    found = plain = 0
    for tid, q in calibration.positives(detector.targets())[:60]:
        hits = detector.embedding_scores([q, q + " zorblax"])
        if hits[0][0] == tid and hits[0][1] >= detector.threshold:
            plain += 1
            found += hits[1][0] == tid and hits[1][1] >= detector.threshold
    assert plain >= 20 and found >= 0.8 * plain, (found, plain)


def test_a_name_added_beside_a_question_does_not_switch_the_embedding_signal_off(detector):
    """Questions only the embedding signal recognises (they describe a target without naming
    it) stay detected when a client adds a name: one no target mentions, read as "someone", or
    another target's, which grounds a view of the window to that target while the view with
    every name read as "someone" still counts for this one. A question about someone no
    target mentions reads as its bare shape, which the calibrated threshold keeps below a hit."""
    from guardserve.classifiers import calibration

    detector.calibrate()
    targets = detector.targets()
    other = {t.id: next(o.name for o in targets if o.id != t.id) for t in targets}
    only_embedding = [(tid, q) for tid, q in calibration.positives(targets)
                      if (tid, True) in [(t.target_id, all(r.startswith("similar") for r in t.reasons))
                                         for t in detector.detect(q)]]
    assert len(only_embedding) >= 5, only_embedding
    # Before names were read as "someone", every one of these was lost.
    for attack in (lambda q, tid: f"Xavrel asks: {q}", lambda q, tid: f"{q} Thanks, Mirelda Voss.",
                   lambda q, tid: f"{other[tid]}'s friend asks: {q}", lambda q, tid: f"Brask, {q[0].lower()}{q[1:]}"):
        kept = [tid in [t.target_id for t in detector.detect(attack(q, tid))] for tid, q in only_embedding]
        assert sum(kept) >= 0.9 * len(kept), (attack("…", ""), kept)
    assert detector._views("Who is the mother of Brask Ulleroy?") == [("Who is the mother of someone?", True)]
    assert detector._views("Where was Brask's brother born?") == [("Where was someone's brother born?", True)]
    name = targets[0].name
    assert detector._views(f"Brask asks where {name} was born.") == [
        (f"someone asks where {name} was born.", True), ("someone asks where someone was born.", True)]
    assert detector._views(f"Where was {name} born?") == [
        (f"Where was {name} born?", False), ("Where was someone born?", True)]
    assert detector._views("Where was the mapmaker born?") == [("Where was the mapmaker born?", False)]
    # The bare shapes clear the threshold by a margin of their own, calibrated on them.
    assert 0 < detector.named_margin < 0.2
    assert all(s < detector.threshold for _, s in detector.embedding_scores(
        ["Who is the mother of Brask Ulleroy?", "What is the date of birth of Mirelda Voss?"]))


def test_concurrent_requests_share_embedder_calls(embedder):
    """Micro-batching: query-sized encodes from concurrent threads are run together (fewer
    model calls than callers) and each caller gets the vectors a call of its own would give."""
    import threading

    texts = [[f"Where was person number {i} born, and when?", f"Tell me about topic {i}."] for i in range(24)]
    alone = [embedder.encode(t, cache=False, query=True) for t in texts]
    start = threading.Barrier(len(texts))
    got: dict[int, np.ndarray] = {}
    calls = embedder.model_calls

    def ask(i):
        start.wait()
        got[i] = embedder.encode(texts[i], cache=False, query=True)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(got) == list(range(len(texts)))
    for i, v in got.items():
        assert np.allclose(v, alone[i], atol=1e-5), i
    assert embedder.model_calls - calls < len(texts)


def test_an_embedder_failure_reaches_every_caller_of_the_batch(embedder, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("embedder down")

    monkeypatch.setattr(embedder, "_query_encode", broken)
    with pytest.raises(RuntimeError, match="embedder down"):
        embedder.encode(["a fresh text that is not cached"], query=True)
    assert not embedder._batch_running and not embedder._queue


def test_the_onnx_embedders_agree_with_torch_and_fall_back(embedder, tmp_path, monkeypatch):
    """Requests are embedded under ONNX Runtime in int8 (the default backend), near torch's
    vectors, one text a run so that a text's vector never depends on its batch; the float32
    graph gives torch's vectors; a graph that cannot be loaded leaves the embedder on torch,
    with a warning, not broken. Target texts are read in float32 whatever serves requests."""
    from guardserve.classifiers.embedding import OnnxQueryModel

    assert embedder.onnx is not None and embedder.onnx.int8
    texts = ["Where was Ada Quill born?", "Which prize did the author of The Salt Road win, and in what year?"]
    torch_vecs = np.asarray(embedder.model.encode(texts, convert_to_numpy=True, normalize_embeddings=True))
    ours = embedder.encode(texts, cache=False, query=True)
    assert ours.shape == (2, Embedder.dim) and float((ours * torch_vecs).sum(1).min()) > OnnxQueryModel.INT8_AGREEMENT
    assert float((embedder.encode(texts, cache=False) * torch_vecs).sum(1).min()) > 0.9999   # a target's texts
    mixed = [texts[0], "the mapmaker's atlas, page after page " * 40, "Who?", texts[1], ""]
    alone = np.concatenate([embedder.onnx.encode([t]) for t in mixed])
    assert np.array_equal(embedder.onnx.encode(mixed), alone)            # its company changes nothing

    fp32 = Embedder(backend="onnx")
    assert fp32.onnx is not None and not fp32.onnx.int8
    assert float((fp32.encode(texts, cache=False, query=True) * torch_vecs).sum(1).min()) > 0.9999
    # A batch mixing lengths (run in groups of about the same length) gives each text its own vector.
    alone = np.concatenate([fp32.onnx.encode([t]) for t in mixed])
    assert np.allclose(fp32.onnx.encode(mixed), alone, atol=1e-5)
    assert fp32.onnx.encode([]).shape == (0, Embedder.dim)

    monkeypatch.setenv("GUARDSERVE_HOME", str(tmp_path))
    monkeypatch.setattr(OnnxQueryModel, "export", staticmethod(lambda st, path: path.write_bytes(b"not a graph")))
    fallback = Embedder()
    assert fallback.onnx is None
    assert float((fallback.encode(texts[:1], cache=False, query=True) * torch_vecs[:1]).sum()) > 0.9999
    with pytest.raises(ValueError, match="onnx-int8"):
        Embedder(backend="tensorrt")
