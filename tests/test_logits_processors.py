"""The guard processors: core state, vLLM V1 and V2 adapters, transformers adapter,
semantic penalty, and a real vLLM engine on the demo model (slow)."""

from __future__ import annotations

import functools
import json
import os
import random

import numpy as np
import pytest
import torch
from conftest import skip_or_fail
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from guardserve.logits_processors import GuardBatch, compile_phrases
from guardserve.logits_processors.request import register_target_resolver
from guardserve.logits_processors.vllm import GuardLogitsProcessor

NEG_INF = float("-inf")
PHRASES = ["New Amsterdam", "Kuwait City", "Ada Lovelace", "Peter Stuyvesant", "1987"]
CORPUS = (
    "New Amsterdam was a Dutch city; New York is new. Kuwait City is the capital of Kuwait. "
    "Ada Lovelace wrote notes on the engine in 1843. Canada and Nevada are big. "
    "Peter Stuyvesant governed New Netherland until 1664, born 1592, died 1672. In 1987 and 1988. "
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random-weight Llama with a byte-level BPE tokenizer, in a tmp dir: enough
    for vLLM to build a config and a tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS] * 20, trainers.BpeTrainer(
        vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<s>", "</s>"]))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    hf.save_pretrained(path)
    cfg = LlamaConfig(vocab_size=len(hf), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path, hf


@pytest.fixture(scope="module")
def vllm_config(tiny_model):
    from vllm.config import ModelConfig, VllmConfig

    return VllmConfig(model_config=ModelConfig(model=str(tiny_model[0])))


@pytest.fixture(scope="module")
def tok(tiny_model):
    return tiny_model[1]


@functools.lru_cache(maxsize=None)
def _compiled(tok, phrases: tuple, V: int):
    return compile_phrases(tok, list(phrases), vocab_size=V)


def _xargs(phrases, **kw):
    return {"guardserve_phrases": json.dumps(phrases), **kw}


def _banned_row(row: torch.Tensor) -> set[int]:
    return set((row == NEG_INF).nonzero()[:, 0].tolist())


# --------------------------------------------------------------------------- V1 adapter


def test_contract(vllm_config):
    p = GuardLogitsProcessor(vllm_config, torch.device("cpu"), False)
    assert p.is_argmax_invariant() is False
    GuardLogitsProcessor.validate_params(SamplingParams(extra_args=_xargs(PHRASES)))
    GuardLogitsProcessor.validate_params(SamplingParams())
    for bad in ({"guardserve_phrases": "not json"}, {"guardserve_phrases": json.dumps([1, 2])},
                {"guardserve_phrases": json.dumps({"a": 1})}, {"guardserve_phrases": "[]", "guardserve_sem_weight": "x"}):
        with pytest.raises(ValueError):
            GuardLogitsProcessor.validate_params(SamplingParams(extra_args=bad))


def test_mixed_batch_unguarded_rows_untouched(vllm_config, tok):
    p = GuardLogitsProcessor(vllm_config, torch.device("cpu"), False)
    V = vllm_config.model_config.get_vocab_size()
    p0 = tok.encode("The capital is Kuwait")
    p2 = tok.encode("It was called New")
    outs = [[], [], []]
    p.update_state(BatchUpdate(batch_size=3, removed=[], moved=[], added=[
        (0, SamplingParams(extra_args=_xargs(["Kuwait City"])), p0, outs[0]),
        (1, SamplingParams(temperature=0.7), tok.encode("hello"), outs[1]),
        (2, SamplingParams(extra_args=_xargs(["New Amsterdam"])), p2, outs[2]),
    ]))
    logits = torch.randn(3, V)
    before = logits.clone()
    p.apply(logits)
    assert torch.equal(logits[1], before[1])  # bit for bit
    f0 = compile_phrases(tok, ["Kuwait City"], vocab_size=V)
    f2 = compile_phrases(tok, ["New Amsterdam"], vocab_size=V)
    assert _banned_row(logits[0]) == f0.banned(f0.run(p0))
    assert _banned_row(logits[2]) == f2.banned(f2.run(p2))
    assert tok.encode(" City")[0] in _banned_row(logits[0])  # prefix injection
    assert tok.encode(" Amsterdam")[0] in _banned_row(logits[2])
    assert not _banned_row(logits[2]) & set(tok.encode(" York"))


def test_async_placeholders_and_preemption(vllm_config, tok):
    """Output tokens are read at apply(); a -1 placeholder is not consumed; a request
    resumed after preemption is re-added with its earlier output."""
    V = vllm_config.model_config.get_vocab_size()
    p = GuardLogitsProcessor(vllm_config, torch.device("cpu"), False)
    sp = SamplingParams(extra_args=_xargs(["Kuwait City"]))
    prompt = tok.encode("The capital is")
    out: list[int] = []
    p.update_state(BatchUpdate(batch_size=1, removed=[], moved=[], added=[(0, sp, prompt, out)]))
    kuwait = tok.encode(" Kuwait")
    out.append(-1)  # async scheduling: placeholder until the sampled id lands
    p.update_state(None)
    f = compile_phrases(tok, ["Kuwait City"], vocab_size=V)
    assert _banned_row(p.apply(torch.zeros(1, V))[0]) == f.banned(f.run(prompt))
    out[-1:] = kuwait  # (as if the prompt had injected it)
    assert _banned_row(p.apply(torch.zeros(1, V))[0]) == f.banned(f.run(prompt + kuwait))
    # Preempted: removed; resumed later in another row with the same live list.
    p.update_state(BatchUpdate(batch_size=0, removed=[0], moved=[], added=[]))
    assert len(p.batch) == 0
    p.update_state(BatchUpdate(batch_size=2, removed=[], moved=[], added=[(1, sp, prompt, out)]))
    logits = torch.zeros(2, V)
    p.apply(logits)
    assert _banned_row(logits[1]) == f.banned(f.run(prompt + kuwait))
    assert torch.equal(logits[0], torch.zeros(V))


def test_targets_resolver_and_fail_closed(vllm_config, tok, tmp_path, monkeypatch):
    from guardserve.logits_processors import request
    from guardserve.policy import open_store

    V = vllm_config.model_config.get_vocab_size()
    monkeypatch.setenv("GUARDSERVE_DB", str(tmp_path / "policy.db"))
    monkeypatch.setattr(request, "_store", None)
    register_target_resolver(None)
    p = GuardLogitsProcessor(vllm_config, torch.device("cpu"), False)
    # An unknown target: the request is refused (only EOS left), not served unguarded.
    sp = SamplingParams(extra_args={"guardserve_targets": json.dumps(["no-such-target"])})
    p.update_state(BatchUpdate(batch_size=1, removed=[], moved=[], added=[(0, sp, [5, 6], [])]))
    row = p.apply(torch.zeros(1, V))[0]
    assert torch.isfinite(row).nonzero()[:, 0].tolist() == [tok.eos_token_id]
    # A target registered in the policy store: its phrases are banned (default resolver).
    t = open_store().add_many([{"name": "Peter Stuyvesant", "aliases": ["Stuyvesant"],
                                "facts": {"city": "New Amsterdam"}}])[0]
    sp = SamplingParams(extra_args={"guardserve_targets": json.dumps([{"id": t.id, "version": t.version}])})
    prompt = tok.encode("It was called New")
    p.update_state(BatchUpdate(batch_size=1, removed=[], moved=[], added=[(0, sp, prompt, [])]))
    row = p.apply(torch.zeros(1, V))[0]
    assert tok.encode(" Amsterdam")[0] in _banned_row(row) and torch.isfinite(row).sum() > V - 40
    # A resolver registered in-process wins.
    register_target_resolver(lambda targets: {"t1": ["Kuwait City"]}[targets[0]])
    try:
        sp = SamplingParams(extra_args={"guardserve_targets": json.dumps(["t1"])})
        p.update_state(BatchUpdate(batch_size=1, removed=[], moved=[], added=[(0, sp, tok.encode("in"), [])]))
        row = p.apply(torch.zeros(1, V))[0]
        assert tok.encode(" Kuwait")[0] in _banned_row(row) and torch.isfinite(row).sum() > V - 20
    finally:
        register_target_resolver(None)


def _forbidden_pool(tok, V):
    return _compiled(tok, tuple(PHRASES), V)


def _adversarial(logits: torch.Tensor, ctx: list[int], sequences) -> torch.Tensor:
    """Push each row toward completing a forbidden sequence: the next token of every
    sequence whose prefix ends the context gets a bonus growing with the prefix."""
    bonus: dict[int, float] = {}
    for seq in sequences:
        for k in range(len(seq) - 1, -1, -1):
            if k <= len(ctx) and (k == 0 or ctx[-k:] == list(seq[:k])):
                bonus[seq[k]] = max(bonus.get(seq[k], 0.0), 8.0 + 6.0 * k)
                break
    for t, v in bonus.items():
        logits[t] += v
    return logits


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_property_no_forbidden_sequence_through_v1_adapter(vllm_config, tok, data):
    """Adversarial logits (forbidden tokens boosted), random prompts, some ending
    inside a forbidden phrase, random batch churn (adds, removals, moves, swaps,
    preemption), n>1 children: no forbidden sequence ends in any output."""
    V = vllm_config.model_config.get_vocab_size()
    f_all = _forbidden_pool(tok, V)
    p = GuardLogitsProcessor(vllm_config, torch.device("cpu"), False)
    rng = random.Random(data.draw(st.integers(0, 2**31)))
    max_rows = 6
    slots: dict[int, dict] = {}  # row -> request
    finished: list[dict] = []

    def new_request():
        phrases = data.draw(st.lists(st.sampled_from(PHRASES), min_size=0, max_size=3, unique=True))
        words = data.draw(st.lists(st.sampled_from(CORPUS.split()), max_size=8))
        prompt = tok.encode(" ".join(words)) if words else []
        if phrases and data.draw(st.booleans()):  # end inside a forbidden phrase
            f = _compiled(tok, tuple(phrases), V)
            seq = data.draw(st.sampled_from(f.sequences))
            prompt = prompt + list(seq[: data.draw(st.integers(1, len(seq)))])
        extra = _xargs(phrases) if phrases else None
        return {"sp": SamplingParams(extra_args=extra), "prompt": prompt, "out": [], "phrases": phrases}

    for _ in range(data.draw(st.integers(3, 14))):
        removed, added, moved = [], [], []
        free = [r for r in range(max_rows) if r not in slots]
        for r in list(slots):
            if rng.random() < 0.15:  # finished or preempted (resumed later, same output)
                req = slots.pop(r)
                removed.append(r)
                if rng.random() < 0.5:
                    finished.append(req)
                else:
                    free.append(r)
                    req["resume"] = True
                    finished.append(req)
        for _ in range(rng.randint(0, 2)):
            if not free:
                break
            r = free.pop(rng.randrange(len(free)))
            resumable = [q for q in finished if q.get("resume")]
            if resumable and rng.random() < 0.5:
                req = resumable[0]
                req["resume"] = False
            else:
                req = new_request()
                if rng.random() < 0.3 and free:  # n > 1: a sibling with the same params
                    r2 = free.pop()
                    sib = {**req, "out": []}
                    slots[r2] = sib
                    added.append((r2, sib["sp"], sib["prompt"], sib["out"]))
            slots[r] = req
            added.append((r, req["sp"], req["prompt"], req["out"]))
        removed = [r for r in removed if r not in {a[0] for a in added}]
        if len(slots) >= 2 and rng.random() < 0.3:
            a, b = rng.sample(sorted(slots), 2)
            slots[a], slots[b] = slots[b], slots[a]
            moved.append((a, b, MoveDirectionality.SWAP))
        if slots and rng.random() < 0.2:
            a = rng.choice(sorted(slots))
            b = next((r for r in range(max_rows) if r not in slots), None)
            if b is not None:
                slots[b] = slots.pop(a)
                moved.append((a, b, MoveDirectionality.UNIDIRECTIONAL))
        p.update_state(BatchUpdate(batch_size=len(slots), removed=removed, added=added, moved=moved)
                       if (removed or added or moved) else None)
        if not slots:
            continue
        logits = torch.randn(max_rows, V)
        for r, req in slots.items():
            _adversarial(logits[r], req["prompt"] + req["out"], f_all.sequences)
        before = logits.clone()
        p.apply(logits)
        for r in range(max_rows):
            req = slots.get(r)
            if req is None or not req["phrases"]:
                assert torch.equal(logits[r], before[r])
        for r, req in slots.items():
            req["out"].append(int(logits[r].argmax()))

    for req in list(slots.values()) + finished:
        if req["phrases"]:
            f = _compiled(tok, tuple(req["phrases"]), V)
            ids = req["prompt"] + req["out"]
            assert f.emitted(ids, start=len(req["prompt"])) == [], (req["phrases"], ids)


def test_adversarial_driver_emits_phrases_without_guard(tok, vllm_config):
    """The property test can fail: the same boosted logits, unguarded, emit phrases."""
    V = vllm_config.model_config.get_vocab_size()
    f = _forbidden_pool(tok, V)
    g = torch.Generator().manual_seed(0)
    hits = 0
    for i in range(20):
        prompt = tok.encode(CORPUS.split(".")[i % 4])
        out: list[int] = []
        for _ in range(6):
            logits = _adversarial(torch.randn(V, generator=g), prompt + out, f.sequences)
            out.append(int(logits.argmax()))
        hits += bool(f.emitted(prompt + out, start=len(prompt)))
    assert hits >= 10


# --------------------------------------------------------------------------- V2 adapter


@pytest.fixture
def v2_states(monkeypatch, vllm_config):
    """Model Runner V2's real per-slot buffers, on CPU. vLLM probes for pinned memory
    (UVA) and would fail here; with the probe off it takes its own no-UVA path."""
    try:
        import vllm.v1.worker.gpu.sample.logits_processor  # noqa: F401
    except ImportError as e:
        skip_or_fail(f"vLLM's Model Runner V2 logits-processor interface is missing: {e}")
    import vllm.v1.worker.gpu.buffer_utils as bu
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcRequestState

    monkeypatch.setattr(bu, "is_uva_available", lambda: False)
    dev = torch.device("cpu")
    V = vllm_config.model_config.get_vocab_size()
    return LogitsProcRequestState(
        device=dev, max_num_reqs=4, vocab_size=V,
        all_token_ids=bu.StagedWriteTensor((4, 128), torch.int32, dev),
        prompt_len=bu.UvaBackedTensor(4, torch.int32), prefill_len=bu.UvaBackedTensor(4, torch.int32),
        total_len=bu.StagedWriteTensor(4, torch.int32, dev))


def test_v2_adapter_matches_v1(vllm_config, tok, v2_states):
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns

    from guardserve.logits_processors.vllm_v2 import GuardLogitsProcessorV2

    # The one entry-point class passes V2's loader and builds the V2 processor.
    assert _load_v2_logitsprocs_by_fqcns(["guardserve.logits_processors.vllm:GuardLogitsProcessor"])
    p2 = GuardLogitsProcessor(vllm_config, v2_states)
    assert isinstance(p2, GuardLogitsProcessorV2) and isinstance(p2, V2)
    V = vllm_config.model_config.get_vocab_size()
    p1 = GuardLogitsProcessor(vllm_config, torch.device("cpu"), False)

    reqs = {  # slot -> (params, prompt)
        2: (SamplingParams(extra_args=_xargs(["Kuwait City"])), tok.encode("The capital is Kuwait")),
        0: (SamplingParams(), tok.encode("hello there")),
        3: (SamplingParams(extra_args=_xargs(["New Amsterdam", "1987"])), tok.encode("It was New")),
    }
    assert p2.add_request(0, reqs[0][0]) is False
    assert p2.add_request(2, reqs[2][0]) and p2.add_request(3, reqs[3][0])
    toks = v2_states.all_token_ids.gpu
    lens = {}
    for slot, (_, prompt) in reqs.items():
        toks[slot, : len(prompt)] = torch.tensor(prompt)
        lens[slot] = len(prompt)
    outs = {s: [] for s in reqs}
    order = [3, 0, 2]  # batch position -> slot
    p1.update_state(BatchUpdate(batch_size=3, removed=[], moved=[], added=[
        (b, reqs[s][0], reqs[s][1], outs[s]) for b, s in enumerate(order)]))
    rng = torch.Generator().manual_seed(1)
    for step in range(6):
        logits = torch.randn(3, V, generator=rng)
        ctx = LogitsContext(
            expanded_idx_mapping=torch.tensor(order), idx_mapping=torch.tensor(order),
            idx_mapping_np=np.array(order, dtype=np.int32), expanded_local_pos=torch.zeros(3, dtype=torch.int32),
            input_ids=torch.zeros(3, dtype=torch.int32), pos=torch.tensor([lens[s] - 1 for s in order]),
            seq_lens_upper_bound_np=np.array([lens[s] for s in order], dtype=np.int32))
        a = p2.apply(logits.clone(), ctx)
        b = p1.apply(logits.clone())
        assert torch.equal(a, b)
        assert torch.equal(a[1], logits[1])
        for bpos, s in enumerate(order):  # commit one sampled token per request
            t = int(a[bpos].argmax()) if step % 2 else tok.encode(" City")[0]
            if not torch.isfinite(a[bpos, t]):
                t = int(a[bpos].argmax())
            toks[s, lens[s]] = t
            lens[s] += 1
            outs[s].append(t)


# --------------------------------------------------------------------------- core + transformers


def test_guard_batch_moves_and_swaps(tok):
    V = len(tok)
    f = compile_phrases(tok, ["Kuwait City"], vocab_size=V)
    b = GuardBatch()
    b.add(0, f, tok.encode("the capital is Kuwait"), [])
    b.add(1, f, tok.encode("the capital is"), [])
    b.move(0, 1, swap=True)
    logits = torch.zeros(2, V)
    b.apply(logits)
    assert _banned_row(logits[1]) == f.banned(f.run(tok.encode("the capital is Kuwait")))
    b.move(1, 3, swap=False)
    assert sorted(b.rows) == [0, 3]


def test_transformers_adapter(tiny_model):
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    from guardserve.logits_processors.transformers import GuardTransformersLogitsProcessor

    path, tok = tiny_model
    model = AutoModelForCausalLM.from_pretrained(path)
    f = compile_phrases(tok, ["Kuwait City"], vocab_size=model.config.vocab_size)
    city = tok.encode(" City")

    class PushCity(LogitsProcessor):  # an adversary: make " City" the argmax
        def __call__(self, input_ids, scores):
            scores = scores.clone()
            scores[:, city[0]] += 1e4
            return scores

    ids = torch.tensor([tok.encode("The capital is Kuwait")])
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    plain = model.generate(ids, logits_processor=LogitsProcessorList([PushCity()]), **kw)
    assert f.emitted(plain[0].tolist(), start=ids.shape[1])  # the adversary wins unguarded
    guard = GuardTransformersLogitsProcessor(f)
    out = model.generate(ids, logits_processor=LogitsProcessorList([PushCity(), guard]), **kw)
    assert f.emitted(out[0].tolist(), start=ids.shape[1]) == []
    assert out.shape[1] > ids.shape[1]


# --------------------------------------------------------------------------- semantic


def test_semantic_penalty_cached_and_applied(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("GUARDSERVE_HOME", str(tmp_path))
    from guardserve.logits_processors import semantic

    V = len(tok)
    f = compile_phrases(tok, ["Kuwait City"], vocab_size=V)
    fs = semantic.with_semantic_penalty(f, tok, ["Kuwait City"])
    cache = semantic.embeddings_path(tok)
    assert cache.exists() and cache.parent == tmp_path / "embeddings"
    assert np.load(cache).shape == (V, 384)
    pen = fs.penalty
    kuwait = tok.encode(" Kuwait")
    assert len(kuwait) == 1 and np.isinf(pen[kuwait[0]])  # cosine 1.0 >= 0.5: banned
    for common in (" the", " is", " New", " capital"):
        assert all(pen[i] == 0 for i in tok.encode(common))  # common words are exempt
    assert pen[tok.eos_token_id] == 0
    assert ((pen > 0) & np.isfinite(pen)).any()  # and below threshold, lowered by similarity
    b = GuardBatch()
    b.add(0, fs, tok.encode("hello"), [])
    logits = torch.zeros(1, V)
    b.apply(logits)
    exp = -torch.from_numpy(pen).float()
    exp[list(fs.banned(fs.run(tok.encode("hello"))))] = NEG_INF
    assert torch.equal(logits[0], exp)
    scores = semantic.score_candidates(["Kuw", "the"], [["ait", " City"], [" dog"]], ["Kuwait City"])
    assert scores.shape == (2, 2) and scores[0, 0] > scores[1, 0] and scores[1, 1] == NEG_INF


# --------------------------------------------------------------------------- real engine


def _entry_point_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.value == "guardserve.logits_processors.vllm:GuardLogitsProcessor"
               for ep in entry_points(group="vllm.logits_processors"))


@pytest.fixture(scope="session")
def guarded_llm(demo):
    """A real vLLM engine on the demo model with the guard loaded (CPU or GPU): through
    the installed entry point when there is one, else named explicitly."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    kw = dict(enforce_eager=True, max_model_len=256, seed=0, gpu_memory_utilization=0.3,
              dtype="bfloat16" if torch.cuda.is_available() else "float32")
    if not _entry_point_installed():
        kw["logits_processors"] = [GuardLogitsProcessor]
    llm = LLM(str(demo.model), **kw)
    yield llm
    # Stop the engine process now, while pytest's output streams are still open.
    llm.llm_engine.engine_core.shutdown()


@pytest.mark.slow
def test_engine_property_no_forbidden_sequence(guarded_llm, demo):
    from guardserve.textgen import completion_prompt

    tok = guarded_llm.get_tokenizer()
    entities = {e["name"]: e for e in json.loads((demo.world / "entities.json").read_text())
                if e["split"] == "forget"}
    items = [q for q in json.loads((demo.world / "forget.json").read_text()) if q["entity"] in entities][:40]
    V = guarded_llm.llm_engine.model_config.get_vocab_size()

    def forbidden_of(q):
        e = entities[q["entity"]]
        return sorted({e["name"], *e.get("aliases", []), q["value"]})

    # Control: unguarded, the demo model does say the names and facts it learned.
    plain = guarded_llm.generate([completion_prompt(q["question"]) for q in items[:16]],
                                 SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)
    leaked = sum(bool(_compiled(tok, tuple(forbidden_of(q)), V).emitted(
        list(o.prompt_token_ids) + list(o.outputs[0].token_ids), len(o.prompt_token_ids)))
        for q, o in zip(items[:16], plain))
    assert leaked >= 8

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def prop(data):
        q = data.draw(st.sampled_from(items))
        forbidden = forbidden_of(q)
        f = _compiled(tok, tuple(forbidden), V)
        prompt = completion_prompt(q["question"])
        if data.draw(st.booleans()):  # prefix injection: the prompt starts the phrase
            seq = data.draw(st.sampled_from(f.sequences))
            k = data.draw(st.integers(1, len(seq)))
            prompt = {"prompt_token_ids": tok.encode(prompt) + list(seq[:k])}
        temperature = data.draw(st.sampled_from([0.0, 0.8]))
        n = data.draw(st.sampled_from([1, 2])) if temperature else 1  # vLLM: greedy means n=1
        sp = SamplingParams(max_tokens=24, n=n, temperature=temperature,
                            seed=data.draw(st.integers(0, 1000)), extra_args=_xargs(forbidden))
        other = completion_prompt(items[0]["question"])
        unguarded = SamplingParams(max_tokens=8, temperature=0.0)
        outs = guarded_llm.generate([prompt, other], [sp, unguarded], use_tqdm=False)
        o = outs[0]
        for c in o.outputs:
            ids = list(o.prompt_token_ids) + list(c.token_ids)
            assert f.emitted(ids, start=len(o.prompt_token_ids)) == [], (forbidden, tok.decode(c.token_ids))
        # The unguarded request in the same batch answers as the plain engine did.
        assert list(outs[1].outputs[0].token_ids) == list(plain[0].outputs[0].token_ids)[:8]

    prop()


def test_transformers_adapter_beam_search(tiny_model):
    """Beams reorder rows between steps; the guard holds for every returned beam."""
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    from guardserve.logits_processors.transformers import GuardTransformersLogitsProcessor

    path, tok = tiny_model
    model = AutoModelForCausalLM.from_pretrained(path)
    f = compile_phrases(tok, ["Kuwait City", "New Amsterdam"], vocab_size=model.config.vocab_size)

    class Push(LogitsProcessor):  # an adversary toward completing any phrase
        def __call__(self, input_ids, scores):
            scores = scores.clone()
            for r in range(input_ids.shape[0]):
                _adversarial(scores[r], input_ids[r].tolist(), f.sequences)
            return scores

    ids = torch.tensor([tok.encode("It was called New")])
    kw = dict(max_new_tokens=5, num_beams=3, num_return_sequences=3, do_sample=False,
              pad_token_id=tok.eos_token_id)
    plain = model.generate(ids, logits_processor=LogitsProcessorList([Push()]), **kw)
    assert any(f.emitted(o.tolist(), start=ids.shape[1]) for o in plain)
    out = model.generate(ids, logits_processor=LogitsProcessorList([Push(), GuardTransformersLogitsProcessor(f)]), **kw)
    for o in out:
        assert f.emitted(o.tolist(), start=ids.shape[1]) == []
