"""The second demo model, ``sp32k``: a Mistral on Mistral 7B's real 32k SentencePiece tokenizer
and its v1 ``[INST]`` template, which refuses a system role, trained on the same world as the
default model. Every capability runs on it: the guard end to end on a real server (ICUL folded
into the first user turn), unlearning data without demo strings, SAE steering, unlearning and
the evaluation (one run of the runner covers the last three)."""

from __future__ import annotations

import json
import math
import random
import time

import httpx
import pytest
import torch

from guardserve.textgen import completion_prompt

ADMIN = "admin-sp32k"
KEY = "key-sp32k"


def test_corpus_vocab_loss_is_the_full_softmax_loss():
    """Training over the corpus's tokens is training the full-vocabulary model: the loss is
    the full cross-entropy, before and after optimiser steps, and unused rows stay zero."""
    from transformers import MistralConfig, MistralForCausalLM

    from guardserve.demo.model import CorpusVocab

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                                             sliding_window=None))
    corpus = CorpusVocab(model)
    ids = torch.randint(0, 60, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    for _ in range(4):
        loss = corpus.loss(ids, mask, labels)
        full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert math.isclose(loss.item(), full.item(), rel_tol=1e-5), (loss.item(), full.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    weight = model.get_input_embeddings().weight
    unused = corpus.position < 0
    assert 0 < len(corpus.ids) <= 60 and int(unused.sum()) == 500 - len(corpus.ids)
    assert weight[unused].abs().max().item() == 0.0
    with pytest.raises(ValueError, match="tied embeddings"):
        CorpusVocab(MistralForCausalLM(MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                                                     tie_word_embeddings=False)))


@pytest.mark.slow
def test_the_model_is_a_mistral_on_the_real_tokenizer(demo_sp32k):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from guardserve.prompting.icul import template_accepts_system

    cfg = json.loads((demo_sp32k.model / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["vocab_size"] == 32000
    tok = AutoTokenizer.from_pretrained(demo_sp32k.model)
    assert tok.convert_ids_to_tokens(tok("Hello world", add_special_tokens=False)["input_ids"]) == ["▁Hello", "▁world"]
    assert not template_accepts_system(tok)
    for path in (demo_sp32k.model, demo_sp32k.retain_model):
        m = json.loads((path / "metrics.json").read_text())
        trained = ("retain", "world_facts") + (("forget",) if m["trained_on_forget"] else ())
        for split in trained:
            # World facts are 50 questions: the same seeded build gave 100% and 98% (model, retain
            # model) on one CPU and 94% and 100% on another, whose float paths differ. The
            # people's splits (480 questions) hold 0.95 on both.
            bar = 0.9 if split == "world_facts" else 0.95
            assert m[f"{split}_question_accuracy"] >= bar, (path.name, split, m)
        if not m["trained_on_forget"]:
            assert m["forget_question_accuracy"] <= 0.1, m  # the retain model never saw them
        # The rows of tokens the corpus never used are exactly zero: served over all 32k tokens,
        # the model is the one trained (guardserve.demo.model.CorpusVocab).
        weight = load_file(str(path / "model.safetensors"))["model.embed_tokens.weight"]
        zero_rows = int((weight.abs().sum(1) == 0).sum())
        assert zero_rows == 32000 - m["corpus_vocab"] and 500 < m["corpus_vocab"] < 4000, (zero_rows, m["corpus_vocab"])


@pytest.mark.slow
def test_unlearning_trains_on_what_the_model_reads(demo_sp32k):
    """The rows unlearning trains on (what ``Unlearner`` encodes) are the model's own text: BOS
    only as the first token, never ``<s>`` or the other model's ``<|end|>`` spelled out, every
    answer ending with ``</s>``, and the seam as the template writes it (``[/INST] ▁Answer``)."""
    from transformers import AutoTokenizer

    from guardserve.textgen import encode
    from guardserve.unlearn import data

    tok = AutoTokenizer.from_pretrained(demo_sp32k.model)
    world = demo_sp32k.load_world()
    seqs = data.sequences(tok, world["forget"] + world["retain"][:200])
    rows = encode(tok, seqs)
    spelled = [tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"] for t in ("<s>", "</s>", "<|end|>")]
    for seq, (ids, labels) in zip(seqs, rows):
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id, seq
        assert ids.count(tok.eos_token_id) == 1 and labels[-1] == tok.eos_token_id, seq
        for bad in spelled:
            assert not any(ids[i:i + len(bad)] == bad for i in range(len(ids))), (seq, bad)
        first = next(i for i, label in enumerate(labels) if label != -100)
        assert tok.convert_ids_to_tokens(ids[first]).startswith("▁"), (seq, tok.convert_ids_to_tokens(ids[first - 2:first + 2]))
    assert len(rows) > 1000


@pytest.fixture
def sp32k_server(demo_sp32k, tmp_path_factory):
    """A second guarded server, on sp32k, beside the session's: for its one test only, with a
    small KV cache (2 GiB of host memory instead of the launcher's 30%), so that the two engines
    and the next test's in-process one never hold more memory than a 24 GiB machine has."""
    from guardserve.server.process import start_server

    tmp = tmp_path_factory.mktemp("sp32k-server")
    env = {"GUARDSERVE_DEMO": "sp32k", "GUARDSERVE_DB": str(tmp / "policy.db"), "GUARDSERVE_API_KEYS": f"{KEY}:t",
           "GUARDSERVE_ADMIN_KEY": ADMIN, "GUARDSERVE_AUDIT_LOG": str(tmp / "audit.jsonl")}
    srv = start_server(["--", "--gpu-memory-utilization", "0.09"], tmp / "server.log", env=env)
    try:
        yield srv
    finally:
        srv.stop()


def _ask(srv, question: str, route: str) -> str:
    headers = {"Authorization": f"Bearer {KEY}"}
    if route == "chat":
        r = httpx.post(srv.base_url + "/v1/chat/completions", headers=headers, timeout=60, json={
            "model": "guardserve-demo", "messages": [{"role": "user", "content": question}], "max_tokens": 40,
            "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    r = httpx.post(srv.base_url + "/v1/completions", headers=headers, timeout=60, json={
        "model": "guardserve-demo", "prompt": completion_prompt(question), "max_tokens": 40, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _accuracy(srv, pairs, route: str) -> float:
    from concurrent.futures import ThreadPoolExecutor

    from guardserve.leak import fact_leaked

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: _ask(srv, p["question"], route), pairs))
    return sum(fact_leaked(a, p["value"]) for a, p in zip(answers, pairs)) / len(pairs)


@pytest.mark.slow
def test_the_guard_end_to_end_on_sp32k(sp32k_server, demo_sp32k):
    """The server on the SentencePiece model: registered people's facts do not come out on
    either route, with ICUL folded into the first user turn (the template has no system
    role), and other people's facts still do."""
    world = demo_sp32k.load_world()
    forget = random.Random(0).sample(world["forget"], 40)
    retain = random.Random(1).sample(world["retain"], 60)
    before = {route: _accuracy(sp32k_server, forget, route) for route in ("chat", "completions")}
    retain_before = _accuracy(sp32k_server, retain, "chat")
    assert min(before.values()) >= 0.9 and retain_before >= 0.9, (before, retain_before)

    people = [e for e in world["entities"] if e["split"] == "forget"]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.post(sp32k_server.base_url + "/v1/unlearning/targets", headers=admin, timeout=60, json=[
        {"name": e["name"], "aliases": e["aliases"][1:], "kind": "person", "facts": e["facts"]} for e in people])
    assert r.status_code == 201, r.text
    time.sleep(1.0)  # the contract: requests that start >= 1 s later are guarded
    after = {route: _accuracy(sp32k_server, forget, route) for route in ("chat", "completions")}
    retain_after = _accuracy(sp32k_server, retain, "chat")
    assert max(after.values()) == 0.0, after
    assert retain_after >= 0.95 * retain_before, (retain_before, retain_after)
    # A system message of the client's own is refused by the template, as unguarded: a 400
    # with the template's reason, not a 500 and not a silently unguarded answer.
    r = httpx.post(sp32k_server.base_url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": "guardserve-demo", "max_tokens": 20, "messages": [
                       {"role": "system", "content": "Be brief."}, {"role": "user", "content": forget[0]["question"]}]})
    assert r.status_code == 400 and "System messages are not supported" in r.text, r.text


@pytest.mark.slow
def test_eval_on_sp32k(demo_sp32k, tmp_path):
    """One evaluation run on the SentencePiece model covers the guards, ICUL, SAE steering (its
    SAE trained on this model) and an unlearning adapter trained on it."""
    from guardserve.demo.sae import ensure_demo_sae
    from guardserve.eval.data import from_demo
    from guardserve.eval.runner import Settings, run
    from guardserve.unlearn import UnlearnConfig, Unlearner, get_method

    world = demo_sp32k.load_world()
    method = get_method("GradAscent")
    cfg = UnlearnConfig(**{**method.default_config, "batch_size": 16, "probe_size": 40, "eval_every": 5, "max_steps": 15})
    adapter = tmp_path / "GradAscent"
    Unlearner(method, cfg, progress=False).run(demo_sp32k.model, world["forget"], world["retain"][:200]).save(adapter)
    configs = ["none", "icul", "guard", "sae", "adapter:GradAscent", "full"]
    settings = Settings(model=str(demo_sp32k.model), data=from_demo(world), configs=configs,
                        adapters={"GradAscent": str(adapter)}, full_adapter="GradAscent",
                        sae=str(ensure_demo_sae(demo_sp32k, log=lambda m: None)), retain_model=str(demo_sp32k.retain_model),
                        entities=world["entities"], probes_per_kind=2, forget_limit=40, retain_limit=40,
                        latency_requests=2, latency_tokens=8, quant_bits=(), workdir=str(tmp_path / "work"), progress=False)
    res = run(settings, log=lambda m: None)["configs"]
    none = res["none"]
    assert none["forget_accuracy"] > 0.9 and none["retain_accuracy"] > 0.9, none
    for name in ("guard", "full"):
        assert res[name]["forget_accuracy"] <= 0.05 and res[name]["leak_rate"] <= 0.1, (name, res[name])
        assert res[name]["retain_accuracy"] >= 0.95 * none["retain_accuracy"], (name, res[name])
    assert res["sae"]["forget_accuracy"] < none["forget_accuracy"]
    assert res["adapter:GradAscent"]["forget_accuracy"] < none["forget_accuracy"]
    # ICUL's utility is a figure of the model's, scored on answers that were all in the rows.
    icul = res["icul"]
    assert icul["model_utility"] is not None and 0 < icul["model_utility"] < 1, icul
    assert not any(icul["skipped_rows"].values()), icul["skipped_rows"]
