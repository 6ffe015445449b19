"""Per-target filter parts (issue 17): compiled once per target version, stored on disk, merged
per request as a product automaton that bans exactly what one compile of the union bans; the
engine-side source loads them and compiles nothing; an idle batch is not touched."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from types import SimpleNamespace

import mistral_common
import numpy as np
import pytest
import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from guardserve.logits_processors.compile import as_tokenizer_view, compile_phrases
from guardserve.logits_processors.core import GuardBatch
from guardserve.logits_processors.parts import (
    FilterParts,
    MergedFilter,
    PartStore,
    folded_token_bytes,
    merge_parts,
    part_name,
)

DATA = os.path.join(os.path.dirname(mistral_common.__file__), "data")
TARGETS = [["Kuwait City", "Kuwait"], ["New Amsterdam", "Peter Stuyvesant", "1664"], ["Ada Lovelace", "Lovelace"],
           ["Gygreim Houtus", "Jostem Falls", "27 January 1930"]]
TEXT = ("In 1664 New Amsterdam became New York. Peter Stuyvesant left. Ada Lovelace and Kuwait City; "
        "Canada, Nevada, the KUWAIT city of new amsterdam, Gygreim Houtus was born in Jostem Falls on 27 January 1930.")


@pytest.fixture(scope="module")
def tok():
    return as_tokenizer_view(MistralTokenizer.from_file(os.path.join(DATA, "tokenizer.model.v1")))


@pytest.fixture(scope="module")
def parts(tok, tmp_path_factory):
    tb, digest = folded_token_bytes(tok)
    store = PartStore(tmp_path_factory.mktemp("parts"), digest)
    out = []
    for i, phrases in enumerate(TARGETS):
        store.write(part_name(f"t{i}", 1), compile_phrases(tok, phrases), {"target": f"t{i}"})
        out.append(store.load(part_name(f"t{i}", 1), tb))
    return out


def test_merged_parts_ban_exactly_what_the_union_bans(tok, parts):
    """Every prefix of texts (and random token strings) reaches a product state whose ban set
    equals that of the automaton compiled for all phrases at once."""
    tb, _ = folded_token_bytes(tok)
    union = compile_phrases(tok, [p for ps in TARGETS for p in ps])
    merged = merge_parts(parts, tok.vocab_size, tb)
    assert isinstance(merged, MergedFilter)
    rng = random.Random(0)
    ids = tok.encode(TEXT)
    streams = [ids, [rng.choice(ids) for _ in range(200)], [rng.randrange(tok.vocab_size) for _ in range(150)]]
    for stream in streams:
        su, sm = 0, 0
        for t in stream:
            assert union.banned(su) == merged.banned(sm)
            su, sm = union.step(su, t), merged.step(sm, t)
        assert union.banned(su) == merged.banned(sm)
    # Starting from a prompt's end (prefix injection) too.
    prompt = tok.encode("The city was once called New")
    assert union.banned(union.run(prompt)) == merged.banned(merged.run(prompt))
    assert tok.encode("Amsterdam")[-1] in merged.banned(merged.run(prompt))


def test_parts_round_trip_through_disk(tok, parts):
    for phrases, part in zip(TARGETS, parts):
        f = compile_phrases(tok, phrases)
        ids = tok.encode(TEXT)
        s1 = s2 = 0
        for t in ids:
            s1, s2 = f.step(s1, t), part.step(s2, t)
            assert s1 == s2 and f.banned(s1) == part.banned(s2)


def test_merged_filter_through_the_batch(tok, parts):
    """The kernel path: a product filter's row gets the same -inf set as the union's."""
    tb, _ = folded_token_bytes(tok)
    V = tok.vocab_size
    union = compile_phrases(tok, [p for ps in TARGETS for p in ps], vocab_size=V)
    merged = merge_parts(parts, V, tb)
    prompt = tok.encode("He was born in Jostem")
    outs: list[list[int]] = [[], []]
    b = GuardBatch("cpu")
    b.add(0, union, prompt, outs[0])
    b.add(1, merged, prompt, outs[1])
    for t in tok.encode(" and then Kuwait City and New Amsterdam"):
        logits = b.apply(torch.zeros(2, V))
        assert torch.equal(logits[0] == float("-inf"), logits[1] == float("-inf"))
        outs[0].append(t)
        outs[1].append(t)


def test_idle_batch_returns_before_touching_the_logits(monkeypatch):
    from guardserve import kernels

    monkeypatch.setattr(kernels, "guard_apply", lambda *a, **k: pytest.fail("the kernel ran on an idle batch"))
    b = GuardBatch("cpu")
    logits = torch.randn(4, 64)
    assert b.apply(logits) is logits
    assert b.apply(logits, rows={}) is logits


def _target(tid, version, name):
    from guardserve.policy.model import ForgetTarget

    return ForgetTarget.from_dict({"id": tid, "name": name, "version": version, "aliases": [], "facts": {},
                                   "kind": "topic", "tenant": None, "mode": "always"})


def test_filter_parts_compile_once_per_version_and_never_wait_for_another(tok, tmp_path, monkeypatch):
    """An edit compiles that target alone; a caller whose parts are built does not wait on a
    compile under way for another target (another tenant's change)."""
    from guardserve.logits_processors import parts as P

    fp = FilterParts(tok, root=tmp_path)
    a1, b1 = _target("a", 1, "Kuwait City"), _target("b", 1, "Ada Lovelace")
    fp.ensure([a1, b1], where="registration")
    assert fp.stats["registration"] == 2
    fp.ensure([a1, b1], where="request")
    assert fp.stats["request"] == 0  # built: nothing compiled again
    fp.ensure([_target("a", 2, "Kuwait Town"), b1], where="registration")
    assert fp.stats["registration"] == 3  # only the edited target
    assert fp.store.exists(part_name("a", 2)) and fp.store.exists(part_name("a", 1))  # in-flight requests

    # Another target's compile blocks (a slow one); a request whose parts are built goes on.
    gate, entered = threading.Event(), threading.Event()
    real = P.compile_phrases

    def slow(tv, phrases):
        entered.set()
        gate.wait(10)
        return real(tv, phrases)

    monkeypatch.setattr(P, "compile_phrases", slow)
    worker = threading.Thread(target=fp.ensure, args=([_target("c", 1, "Peter Stuyvesant")], "registration"))
    worker.start()
    assert entered.wait(10)
    t0 = time.monotonic()
    fp.ensure([_target("a", 2, "Kuwait Town"), b1], where="request")
    assert time.monotonic() - t0 < 1.0 and worker.is_alive()
    gate.set()
    worker.join(10)
    assert fp.stats["request"] == 0 and fp.store.exists(part_name("c", 1))
    fp.forget("a")
    assert not fp.store.exists(part_name("a", 2))


def test_a_compile_never_scans_the_parts_directory(tok, tmp_path, monkeypatch):
    """Old versions are dropped by exact name: a scan of the directory in each compile cost a
    pass over every part ever written (68,000 made a first request wait 25 s). Only the delete
    of a target whose versions this process never built looks at the directory."""
    from pathlib import Path

    from guardserve.logits_processors.parts import FilterParts, part_name

    fp = FilterParts(tok, root=tmp_path)
    fp.ensure([_target("a", 1, "Kuwait Town")], where="registration")
    fp.ensure([_target("a", 2, "Kuwait City")], where="registration")
    real_glob = Path.glob
    monkeypatch.setattr(Path, "glob", lambda *a, **k: pytest.fail("a compile scanned the parts directory"))
    fp.ensure([_target("a", 3, "New Amsterdam")], where="registration")
    assert not fp.store.exists(part_name("a", 1))  # two versions back: gone
    assert fp.store.exists(part_name("a", 2)) and fp.store.exists(part_name("a", 3))  # in-flight requests keep v2
    fp.forget("a")
    assert not fp.store.exists(part_name("a", 2)) and not fp.store.exists(part_name("a", 3))
    monkeypatch.setattr(Path, "glob", real_glob)
    other = FilterParts(tok, root=tmp_path)  # another replica, which never built "b"
    fp.ensure([_target("b", 4, "Peter Stuyvesant")], where="registration")
    other.forget("b")
    assert not fp.store.exists(part_name("b", 4))


def test_engine_source_loads_parts_and_compiles_nothing(tok, tmp_path):
    """What the engine does with ``guardserve_targets``: parts from the cache, one merge, no
    compile; a missing part is compiled once (direct in-process use) and counted; an unknown
    target without a part is refused, never served unfiltered."""
    from guardserve.logits_processors.engine import FilterSource
    from guardserve.logits_processors.request import parse_request, register_target_resolver

    fp = FilterParts(tok, root=tmp_path)
    targets = [_target(f"t{i}", 3, " ".join(ps[:1])) for i, ps in enumerate(TARGETS)]
    fp.ensure(targets, where="registration")
    cfg = SimpleNamespace(model_config=SimpleNamespace(get_vocab_size=lambda: tok.vocab_size))
    src = FilterSource(cfg, parts_root=tmp_path)
    src._tok = tok
    xargs = {"guardserve_targets": json.dumps([{"id": t.id, "version": 3} for t in targets])}
    f = src.filter_for(parse_request(xargs))
    assert src.stats == {"loaded": 4, "merged": 1}
    assert src.filter_for(parse_request(xargs)) is f  # cached: nothing loaded or merged again
    assert tok.encode("Amsterdam")[-1] in f.banned(f.run(tok.encode("once called New")))
    # A part missing from the cache (no server in front): compiled here, counted, logged.
    register_target_resolver(lambda ts: ["Jostem Falls"])
    try:
        g = src.filter_for(parse_request({"guardserve_targets": json.dumps([{"id": "zz", "version": 1}])}))
    finally:
        register_target_resolver(None)
    assert src.stats["compiled"] == 1 and fp.store.engine_compiles() == 1
    assert np.any(g.masks) or g.sparse_tokens.size
    # A target that cannot be resolved: refused (only end-of-sequence left).
    register_target_resolver(lambda ts: (_ for _ in ()).throw(KeyError(ts)))
    try:
        r = src.filter_for(parse_request({"guardserve_targets": json.dumps(["nope"])}))
    finally:
        register_target_resolver(None)
    assert r.meta.get("refusal") and src.stats["refused"] == 1


def test_set_parts_chunk_by_content_and_ban_what_their_targets_ban(tok, tmp_path, monkeypatch):
    """Always-on targets travel as set parts (issue 17): registering more targets or editing one
    rebuilds the sets that changed only; the engine bans through a set exactly what its targets'
    own parts ban; a set missing from the cache, or a name that is not a set's, is refused."""
    from dataclasses import replace

    from guardserve.logits_processors import parts as P
    from guardserve.logits_processors.engine import FilterSource
    from guardserve.logits_processors.request import parse_request

    monkeypatch.setattr(P, "SET_CHUNK", 8)
    targets = tuple(_target(f"s{i}", 1, f"Zorbel Quint {i}") for i in range(60))
    chunks = P.chunk_members(targets, 8)
    assert len(chunks) > 3 and [t for c in chunks for t in c] == list(targets)
    grown = P.chunk_members(targets + (_target("late", 1, "Late Comer"),), 8)
    assert grown[:len(chunks) - 1] == chunks[:-1]  # an append changes the last chunk only
    edited = list(targets)
    edited[20] = replace(edited[20], version=2)
    after = P.chunk_members(tuple(edited), 8)
    changed = [i for i, (a, b) in enumerate(zip(chunks, after)) if P.set_name(a) != P.set_name(b)]
    assert len(after) == len(chunks) and len(changed) == 1 and any(t.id == "s20" for t in chunks[changed[0]])

    fp = FilterParts(tok, root=tmp_path)
    assert fp.ensure_sets([targets], where="registration") == 0
    assert fp.stats["set:registration"] == len(fp.chunks(targets))
    assert fp.ensure_sets([targets], where="registration") == 0
    assert fp.stats["set:registration"] == len(fp.chunks(targets))  # nothing built twice
    names, loose = fp.set_plan([targets])
    assert len(names) == len(fp.chunks(targets)) and not loose
    # One target edited: one set rebuilt; until then its members travel one by one.
    names2, loose2 = fp.set_plan([tuple(edited)])
    assert len(set(names2) - set(names)) == 0 and 0 < len(loose2) < len(targets)
    fp.ensure_sets([tuple(edited)], where="registration")
    assert fp.stats["set:registration"] == len(fp.chunks(targets)) + 1

    cfg = SimpleNamespace(model_config=SimpleNamespace(get_vocab_size=lambda: tok.vocab_size))
    src = FilterSource(cfg, parts_root=tmp_path)
    src._tok = tok
    f = src.filter_for(parse_request({"guardserve_target_sets": json.dumps(names)}))
    assert src.stats["loaded"] == len(names) and not src.stats["refused"]
    whole = compile_phrases(tok, [t.name for t in targets])
    for text in ("Here is Zorbel Quint 17 and then", "Zorbel Quint 5", "nothing of that kind"):
        ids = tok.encode(text)
        assert f.banned(f.run(ids)) == whole.banned(whole.run(ids)), text
    for bad in (["set~" + "0" * 24], ["../t0@v1"]):
        r = src.filter_for(parse_request({"guardserve_target_sets": json.dumps(bad)}))
        assert r.meta.get("refusal")
    assert src.stats["refused"] == 2

    # A replaced set is deleted once no current group holds it and requests had time to finish.
    monkeypatch.setattr(P, "SET_RETIRE_S", 0.0)
    current = {n for n, _ in fp.chunks(tuple(edited))}
    old = set(names) - current
    assert len(old) == 1 and fp.store.exists(old.pop())
    fp._retire_sets(current)
    fp._retire_sets(current)
    assert all(fp.store.exists(n) for n in current)
    assert sum(1 for _ in fp.store.dir.glob("set~*.part")) == len(current)


def test_a_request_carries_always_on_targets_as_their_sets(tmp_path, monkeypatch):
    """The guard names a tenant's always-on targets by their set parts, not one by one; a target
    the conversation asks about still travels as its own part; a set not built yet (a change
    made elsewhere) travels as its targets' parts until the worker has built it."""
    from guardserve.classifiers import Detector, DetectorConfig
    from guardserve.contract import GuardPlan
    from guardserve.demo.tokenizers import sp32k_tokenizer
    from guardserve.guard import CHAT, GuardService
    from guardserve.guard.configs import CONFIGS
    from guardserve.logits_processors import parts as P
    from guardserve.policy import open_store

    monkeypatch.setattr(P, "SET_CHUNK", 8)
    store = open_store(str(tmp_path / "p.db"))
    try:
        store.add_many([{"name": f"Orvel Quandt{i}", "mode": "always"} for i in range(40)])
        about = store.add({"name": "Gygreim Houtus", "facts": {"birth_place": "Jostem Falls"}})
        fp = FilterParts(sp32k_tokenizer(), root=tmp_path / "parts")
        det = Detector(store, DetectorConfig(use_embeddings=False))
        svc = GuardService(store, det, guard=CONFIGS["guard"], filter_parts=fp)
        fp.ensure(det.targets(), where="registration")
        fp.ensure_sets(det.always_groups(), where="registration")

        def plan(question: str) -> GuardPlan:
            body, decision = svc.prepare(CHAT, {"model": "m", "messages": [{"role": "user", "content": question}]},
                                         "default")
            assert decision.guarded
            return GuardPlan.from_xargs(body["vllm_xargs"])

        p = plan("What is the capital of France?")
        assert p.targets == () and len(p.sets) == len(fp.chunks(det.always_groups()[0])) > 1
        p = plan("Where was Gygreim Houtus born?")
        assert p.targets == ((about.id, 1),) and len(p.sets) > 1
        _, decision = svc.prepare(CHAT, {"model": "m", "messages": [{"role": "user", "content": "Where was "
                                                                     "Gygreim Houtus born?"}]}, "default")
        assert {"Jostem Falls", "Orvel Quandt0"} <= set(decision.phrases)  # the set's and the named target's
        # An edit made elsewhere: its set is not built yet; its members travel one by one.
        first = det.always_groups()[0][0]
        store.update(first.id, {"aliases": ["Orvel Q."]})
        det.sync(force=True)
        p2 = plan("What is the capital of France?")
        assert len(p2.sets) == len(p.sets) - 1 and (first.id, 2) in p2.targets and len(p2.targets) <= 4 * 8
        fp.ensure_sets(det.always_groups(), where="background")
        assert plan("What is the capital of France?").targets == ()
    finally:
        store.close()
