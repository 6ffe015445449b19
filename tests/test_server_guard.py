"""The guarded server, end to end: the real vLLM engine on the demo model, the plugin,
the admin API and the OpenAI client. Forget questions must leak no fact value."""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import ADMIN_KEY, make_client, registered_people

from guardserve.leak import fact_leaked
from guardserve.textgen import completion_prompt

pytestmark = pytest.mark.slow
MODEL = "guardserve-demo"


def target_spec(entity: dict, tenant: str | None = None) -> dict:
    spec = {"name": entity["name"], "aliases": entity["aliases"][1:], "kind": "person", "facts": entity["facts"]}
    if tenant:
        spec["tenant"] = tenant
    return spec


def ask(client, question: str, route: str = "chat", stream: bool = False, **kw) -> str:
    if route == "chat":
        args = dict(model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=40, temperature=0, **kw)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **args) if c.choices)
        return client.chat.completions.create(**args).choices[0].message.content
    args = dict(model=MODEL, prompt=completion_prompt(question), max_tokens=40, temperature=0, **kw)
    if stream:
        return "".join(c.choices[0].text for c in client.completions.create(stream=True, **args) if c.choices)
    return client.completions.create(**args).choices[0].text


def ask_many(client, questions, **kw) -> list[str]:
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda q: ask(client, q, **kw), questions))


def leaks(answers, pairs) -> list[tuple[str, str]]:
    """Answers that state their pair's fact, by the one leak test (whole words: "born in Tesiar"
    does not state "Tesia")."""
    return [(p["value"], a) for a, p in zip(answers, pairs) if fact_leaked(a, p["value"])]


def accuracy(answers, pairs) -> float:
    return sum(fact_leaked(a, p["value"]) for a, p in zip(answers, pairs)) / len(pairs)


@pytest.fixture(scope="module")
def forget_entities(world):
    return [e for e in world["entities"] if e["split"] == "forget"]


@pytest.fixture(scope="module")
def spare_entities(world):
    """Retain people the per-test targets are made of: the module-wide registration of
    the forget split does not cover them."""
    return [e for e in world["entities"] if e["split"] == "retain"][-5:]


def pairs_of(world, ent):
    return [p for p in world["retain"] + world["forget"] if p["entity"] == ent["name"]]


@pytest.fixture(scope="module")
def retain_sample(world, spare_entities):
    spare = {e["name"] for e in spare_entities}
    return random.Random(1).sample([p for p in world["retain"] if p["entity"] not in spare], 200)


@pytest.fixture(scope="module")
def baseline(openai_client, world, retain_sample, admin):
    """Accuracy before any target is registered: the baseline of this run."""
    assert admin.get("/targets").json()["count"] == 0
    forget = world["forget"][:48]
    return {
        "retain": accuracy(ask_many(openai_client, [p["question"] for p in retain_sample]), retain_sample),
        "forget": accuracy(ask_many(openai_client, [p["question"] for p in forget]), forget),
    }


@pytest.fixture(scope="module")
def registered(admin, forget_entities, baseline):
    """Every forget person of the demo world, registered globally in one bulk call."""
    with registered_people(admin, forget_entities) as ids:
        yield ids


def test_the_server_embeds_requests_under_onnx_runtime(server):
    """The request path's embedder is the int8 ONNX one (a failed export would leave it on
    torch, about 10x slower per request, with a warning that nobody reads)."""
    log = server.log.read_text(errors="replace")
    assert "embedder on ONNX Runtime (int8)" in log, server.log_tail(60)


# --------------------------------------------------------------------------- auth


def test_inference_auth(server):
    r = httpx.post(server.base_url + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    r = httpx.get(server.base_url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    r = httpx.get(server.base_url + "/v1/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 403 and "admin key" in r.json()["error"]["message"]
    assert httpx.get(server.base_url + "/v1/models", headers={"Authorization": "Bearer key-b"}).status_code == 200


def test_admin_auth(server):
    url = server.base_url + "/v1/unlearning/targets"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = httpx.get(url, headers={"Authorization": "Bearer key-a"})
    assert r.status_code == 403 and "inference API key" in r.json()["error"]["message"]


def test_bypass_routes_are_closed(server):
    for path in ("/v1/responses", "/v1/messages", "/v1/chat/completions/batch", "/invocations"):
        r = httpx.post(server.base_url + path, json={}, headers={"Authorization": "Bearer key-a"})
        assert r.status_code == 404, path


# --------------------------------------------------------------------------- forgetting


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_forget_questions_leak_nothing(openai_client, world, registered, route):
    pairs = world["forget"]
    for field in ("question", "paraphrased_question"):
        answers = ask_many(openai_client, [p[field] for p in pairs], route=route)
        assert not leaks(answers, pairs), f"{route} {field}: {leaks(answers, pairs)[:3]}"


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_streamed_forget_questions_leak_nothing(openai_client, world, registered, route):
    pairs = random.Random(2).sample(world["forget"], 48)
    answers = ask_many(openai_client, [p["paraphrased_question"] for p in pairs[:24]] + [p["question"] for p in pairs[24:]],
                       route=route, stream=True)
    assert not leaks(answers, pairs), leaks(answers, pairs)[:3]


def test_unguarded_model_does_know_the_facts(baseline):
    """The leak tests mean something only because the model would otherwise answer."""
    assert baseline["forget"] >= 0.9 and baseline["retain"] >= 0.9, baseline


def test_retain_accuracy_kept(openai_client, retain_sample, registered, baseline):
    guarded = accuracy(ask_many(openai_client, [p["question"] for p in retain_sample]), retain_sample)
    assert guarded >= 0.95 * baseline["retain"], (guarded, baseline)


def test_logprobs_show_no_banned_token(openai_client, world, registered, admin, demo):
    """Logprobs are the processed ones: a token the filter banned has -inf, which vLLM would
    report as -9999.0, and it never ranks among the top ones. Checked position by position:
    the filter's automaton is walked along the answer's own token ids, and none of the tokens
    it bans at a position is listed there (with raw logprobs the model's favourite, the
    forbidden continuation, would be)."""
    import math

    from transformers import AutoTokenizer

    from guardserve.logits_processors import compile_phrases

    pair = world["forget"][1]
    messages = [{"role": "user", "content": pair["question"]}]
    triggered = admin.post("/classify", json={"messages": messages}).json()["triggered"]
    forbidden = [p for t in triggered for p in t["forbidden"]]
    assert any(pair["value"].lower() in p.lower() or p.lower() in pair["value"].lower() for p in forbidden), forbidden
    tokenizer = AutoTokenizer.from_pretrained(demo.model)
    args = dict(model=MODEL, messages=messages, max_tokens=30, temperature=0, logprobs=True, top_logprobs=5)

    out = openai_client.chat.completions.create(**args)
    text = out.choices[0].message.content
    assert pair["value"].lower() not in text.lower()
    content = out.choices[0].logprobs.content
    # the token strings are decoded text, as tokenizer.decode gives them; the stop token is
    # listed too, and not part of the message
    listed = "".join(t.token for t in content)
    assert listed.removesuffix(tokenizer.eos_token).strip() == text.strip(), (listed, text)
    for tok in content:
        assert math.isfinite(tok.logprob) and tok.logprob > -9000, (tok.token, tok.logprob)
        for alt in tok.top_logprobs:
            # -9999.0 is vLLM's stand-in for -inf: a banned token listed among the top ones
            assert math.isfinite(alt.logprob) and alt.logprob > -9000, \
                f"a banned token showed up in top_logprobs: {alt.token!r} {alt.logprob}"

    # Position by position, where the filter bans something: the prompt leads into the fact
    # ("... was born on"), so the model starts it and the filter bans its continuation, which
    # is the model's favourite. The automaton is walked along the answer's own token ids from
    # the end of the prompt, as the engine's filter is.
    lead_in = pair["answer"].split(pair["value"])[0].rstrip()
    by_id = openai_client.completions.create(
        model=MODEL, prompt=completion_prompt(pair["question"]) + lead_in, max_tokens=12, temperature=0, logprobs=5,
        extra_body={"return_tokens_as_token_ids": True})
    lp = by_id.choices[0].logprobs
    assert pair["value"].lower() not in (lead_in + by_id.choices[0].text).lower()
    automaton = compile_phrases(tokenizer, forbidden)
    state, checked = 0, 0
    for position, (token, top) in enumerate(zip(lp.tokens, lp.top_logprobs)):
        chosen = int(token.removeprefix("token_id:"))
        banned = automaton.banned(state)
        checked += bool(banned)
        listed_banned = [tokenizer.decode([int(t.removeprefix("token_id:"))]) for t in top
                         if int(t.removeprefix("token_id:")) in banned]
        assert not listed_banned, f"position {position}: banned {listed_banned} ranked in top_logprobs: raw logprobs"
        assert chosen not in banned, f"position {position}: the answer took a banned token"
        assert all(math.isfinite(v) and v > -9000 for v in top.values())
        state = automaton.step(state, chosen)
    assert checked, f"the filter banned nothing along {by_id.choices[0].text!r}: this check checked nothing"


def test_guard_is_invisible(server, world, admin, spare_entities):
    """Same status, headers and usage whether or not a target fired."""
    ent = spare_entities[0]
    question = pairs_of(world, ent)[1]["question"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 30, "temperature": 0}
    headers = {"Authorization": "Bearer key-a"}
    plain = httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    tid = admin.post("/targets", json=target_spec(ent, tenant="tenant-a")).json()["id"]
    try:
        time.sleep(1.0)
        guarded = httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    finally:
        admin.delete(f"/targets/{tid}")
    assert plain.status_code == guarded.status_code == 200
    assert sorted(k for k in plain.headers if k != "content-length") == sorted(k for k in guarded.headers if k != "content-length")
    assert plain.json()["usage"]["prompt_tokens"] == guarded.json()["usage"]["prompt_tokens"]
    answer = guarded.json()["choices"][0]["message"]["content"]
    for word in ("forget", "unlearn", "target", ent["name"].lower()):
        assert word not in answer.lower()
    # The compact JSON formatting of vLLM's responses is kept.
    assert guarded.text.startswith('{"id":')


def test_operators_see_detections(server, world, registered):
    """In the audit log and in Prometheus counters."""
    entries = [json.loads(line) for line in server.audit_log.read_text().splitlines()]
    guarded = [e for e in entries if e["event"] == "guarded"]
    fired = {t["id"] for e in guarded for t in e["targets"]}
    assert set(registered) <= fired, "every registered forget person was asked about and must be in the audit log"
    # Each line says what guarded it: targets with their reasons, or (always-on targets guarding
    # on their mode alone) the always-on set.
    assert all(e["tenant"] in ("tenant-a", "tenant-b") and e["detect_ms"] >= 0
               and ((e["targets"] and e["targets"][0]["reasons"]) or e["always_on"]["targets"]) for e in guarded)
    text = httpx.get(server.base_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    assert 'guardserve_detections_total{tenant="tenant-a"}' in text and "target=" not in text
    # A guarded request of tenant-a counted, whatever order the exposition writes the labels in.
    samples = [line for line in text.splitlines() if line.startswith("guardserve_requests_total{")]
    assert any('tenant="tenant-a"' in line and 'outcome="guarded"' in line and float(line.rsplit(" ", 1)[1]) >= 1
               for line in samples), samples


# --------------------------------------------------------------------------- tenants, hot updates


def test_tenant_isolation_and_hot_updates(server, world, admin, spare_entities):
    ent = spare_entities[1]
    pairs = pairs_of(world, ent)
    a, b = make_client(server, "key-a"), make_client(server, "key-b")
    questions = [p["question"] for p in pairs]
    assert accuracy(ask_many(b, questions), pairs) >= 0.75, "the model should know this person"

    tid = admin.post("/targets", json=target_spec(ent, tenant="tenant-b")).json()["id"]
    try:
        time.sleep(1.0)
        assert not leaks(ask_many(b, questions), pairs)
        assert accuracy(ask_many(a, questions), pairs) >= 0.75, "tenant-a must not be guarded by tenant-b's target"
        listed = admin.get("/targets", params={"tenant": "tenant-a"}).json()["targets"]
        assert tid not in [t["id"] for t in listed]
        r = admin.post("/classify", json={"messages": [{"role": "user", "content": questions[0]}], "tenant": "tenant-a"})
        assert r.json()["triggered"] == []
        r = admin.post("/classify", json={"messages": [{"role": "user", "content": questions[0]}], "tenant": "tenant-b"})
        assert [t["target_id"] for t in r.json()["triggered"]] == [tid]
    finally:
        assert admin.delete(f"/targets/{tid}").status_code == 204
    time.sleep(1.0)
    assert accuracy(ask_many(b, questions), pairs) >= 0.75, "a deleted target must stop applying"


def test_policy_change_from_cli_reaches_the_server(server, world, spare_entities):
    """A target added with `guardserve targets add` (straight into the store) applies too."""
    import os
    import subprocess
    import sys

    ent = spare_entities[2]
    pair = next(p for p in pairs_of(world, ent) if p["attribute"] == "birth_place")
    client = make_client(server, "key-a")
    assert pair["value"].lower() in ask(client, pair["question"]).lower(), "the model should know this fact"
    env = {**os.environ, "GUARDSERVE_DB": server.db}
    out = subprocess.run([sys.executable, "-m", "guardserve", "targets", "add", ent["name"], "--alias", ent["aliases"][1],
                          "--fact", f"birth_place={ent['facts']['birth_place']}", "--json"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    tid = json.loads(out.stdout)["id"]
    try:
        time.sleep(1.0)
        assert pair["value"].lower() not in ask(client, pair["question"]).lower()
    finally:
        subprocess.run([sys.executable, "-m", "guardserve", "targets", "rm", tid], env=env, capture_output=True)


# --------------------------------------------------------------------------- bad input


def test_bad_requests_get_4xx_and_the_server_stays_up(server):
    url = server.base_url + "/v1/chat/completions"
    h = {"Authorization": "Bearer key-a", "Content-Type": "application/json"}
    cases = [
        (b"{not json", 400),
        (json.dumps({"model": MODEL, "messages": "hello"}).encode(), 400),
        (json.dumps({"model": MODEL, "messages": []}).encode(), 400),
        (json.dumps([1, 2]).encode(), 400),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "vllm_xargs": {"a": {"b": 1}}}).encode(), 400),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                     "vllm_xargs": {"guardserve_phrases": "[]"}}).encode(), 400),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "chat_template": "x"}).encode(), 400),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "no_such_field": 1}).encode(), 400),
        (b"{" + b'"x":"' + b"a" * (17 * 1024 * 1024) + b'"}', 413),
        # Longer than the model's 512-token context: vLLM's own 400, through the guard.
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "tell me more " * 400}]}).encode(), 400),
    ]
    for body, status in cases:
        r = httpx.post(url, content=body, headers=h, timeout=60)
        assert r.status_code == status, (body[:80], r.status_code, r.text[:200])
        assert "Traceback" not in r.text
    r = httpx.post(server.base_url + "/v1/completions", json={"model": MODEL, "prompt": {"a": 1}}, headers=h)
    assert r.status_code == 400
    r = httpx.post(server.base_url + "/v1/unlearning/targets", json={"name": ""}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 400 and "name" in r.json()["error"]["message"]
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert ask(make_client(server), "What is the capital of France?").strip()



def test_vllm_features_survive_the_guard(openai_client, world, registered):
    """n > 1, stop sequences and structured output on guarded requests."""
    pair = next(p for p in world["forget"] if p["attribute"] == "birth_place")
    msgs = [{"role": "user", "content": pair["question"]}]
    out = openai_client.chat.completions.create(model=MODEL, messages=msgs, n=3, temperature=1.0, max_tokens=30, seed=1)
    assert len(out.choices) == 3
    assert not [c.message.content for c in out.choices if pair["value"].lower() in c.message.content.lower()]
    out = openai_client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=30, stop=[" born"])
    assert " born" not in out.choices[0].message.content and out.choices[0].finish_reason == "stop"
    choices = ["yes", "no"]
    out = openai_client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=5,
                                                extra_body={"structured_outputs": {"choice": choices}})
    assert out.choices[0].message.content in choices
