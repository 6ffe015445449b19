"""The guarded request path without the engine: auth, body rewriting, fail-closed
refusals and the usage rewrite, through the real middleware and a real policy store.
(The engine side is covered by test_server_guard.py.)"""

from __future__ import annotations

import json

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from guardserve.classifiers import Detector, DetectorConfig
from guardserve.contract import PHRASES
from guardserve.guard import CHAT, COMPLETIONS, BadRequest, GuardError, GuardService
from guardserve.guard.configs import CONFIGS
from guardserve.policy import open_store
from guardserve.prompting import InContextUnlearner
from guardserve.server.auth import Auth, parse_api_keys
from guardserve.server.metrics import GuardMetrics
from guardserve.server.middleware import GuardMiddleware

ADA = {"name": "Ada Quillfeather", "aliases": ["Quillfeather"], "kind": "person",
       "facts": {"birth_place": "Port Verity", "award": "the Golden Loom Prize"}}


@pytest.fixture
def service(tmp_path):
    store = open_store(str(tmp_path / "p.db"))
    store.add(ADA)
    svc = GuardService(store, Detector(store, DetectorConfig(use_embeddings=False)), guard=CONFIGS["guard"],
                       icul=InContextUnlearner(), metrics=GuardMetrics())
    yield svc
    store.close()


def chat(text: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


def test_parse_api_keys():
    assert parse_api_keys(None) is None and parse_api_keys(" ") is None
    assert parse_api_keys("k1:a, k2:b") == {"k1": "a", "k2": "b"}
    with pytest.raises(ValueError, match="key:tenant"):
        parse_api_keys("justakey")


def test_unrelated_request_passes_untouched(service):
    body = chat("What is the capital of France?")
    out, decision = service.prepare(CHAT, body, "default")
    assert out is body and not decision.guarded


def test_triggered_request_carries_phrases_and_icul(service):
    out, decision = service.prepare(CHAT, chat("Where was Ada Quillfeather born?"), "default")
    phrases = json.loads(out["vllm_xargs"][PHRASES])
    assert "Port Verity" in phrases and "Ada Quillfeather" in phrases
    assert out["messages"][0]["role"] == "system" and len(out["messages"]) > 2
    assert decision.guarded and service.metrics.value("guardserve_requests_total", tenant="default", outcome="guarded") == 1
    out, _ = service.prepare(COMPLETIONS, {"model": "m", "prompt": ["hello", "Q: Quillfeather's award?"]}, "default")
    assert "Golden Loom Prize" in json.loads(out["vllm_xargs"][PHRASES])  # leading stop-word trimmed


def test_steering_flag_and_cache_salt(service):
    from guardserve.contract import STEER, parse_steer

    out, decision = service.prepare(CHAT, chat("Where was Ada Quillfeather born?"), "default")
    assert STEER not in out["vllm_xargs"] and "cache_salt" not in out  # steering off: nothing added
    service.guard = CONFIGS["guard+sae"]
    out, decision = service.prepare(CHAT, chat("Where was Ada Quillfeather born?") | {"cache_salt": "mine"}, "default")
    assert parse_steer(out["vllm_xargs"][STEER]) == [(decision.target_ids[0], 1)]
    # Steered requests never share prefix-cache blocks with unsteered ones; the client's salt is kept.
    assert out["cache_salt"].startswith("mine.guardserve-steer-")
    plain, _ = service.prepare(CHAT, chat("What is the capital of France?"), "default")
    assert "cache_salt" not in plain and STEER not in (plain.get("vllm_xargs") or {})
    with pytest.raises(BadRequest, match="reserved"):
        service.prepare(CHAT, chat("hi") | {"vllm_xargs": {STEER: "[]"}}, "default")


class _WordTokenizer:
    """One token per whitespace-separated word; a chat template that joins the turns."""

    chat_template = "words"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return " ".join(f"{m['role']}: {m['content']}" for m in messages) + " assistant:"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


def test_icul_is_fitted_into_the_context(service):
    """A guarded prompt is never refused for its length when the client's own prompt fits:
    the refusal would tell that a guard fired. Demonstrations go first, then ICUL entirely."""
    service.tokenizer = _WordTokenizer()
    ask = chat("Where was Ada Quillfeather born?") | {"max_tokens": 10}
    full, _ = service.prepare(CHAT, dict(ask), "default")
    n_full = service._prompt_tokens(full["messages"])
    service.max_model_len = n_full + 10
    out, d = service.prepare(CHAT, dict(ask), "default")
    assert out["messages"] == full["messages"] and d.added_prompt_tokens > 0
    service.max_model_len = n_full + 9  # one word short: fewer demonstrations, instruction kept
    out, d = service.prepare(CHAT, dict(ask), "default")
    assert service._prompt_tokens(out["messages"]) + 10 <= service.max_model_len
    assert out["messages"][0]["role"] == "system" and len(out["messages"]) < len(full["messages"])
    service.max_model_len = service._prompt_tokens(ask["messages"]) + 11  # no room for the instruction
    out, d = service.prepare(CHAT, dict(ask), "default")
    assert out["messages"] == ask["messages"] and d.added_prompt_tokens == 0 and PHRASES in out["vllm_xargs"]


def test_client_cannot_set_guard_arguments(service):
    body = chat("hi") | {"vllm_xargs": {"guardserve_phrases": "[]"}}
    with pytest.raises(BadRequest, match="reserved"):
        service.prepare(CHAT, body, "default")


def test_broken_store_fails_closed(service):
    service.store.close()
    service.detector.config.sync_interval_s = 0
    with pytest.raises(GuardError):
        service.prepare(CHAT, chat("What is the capital of France?"), "default")


# --------------------------------------------------------------------------- middleware


class _Plugin:
    def __init__(self, service, auth):
        self.service, self.auth = service, auth


def _app(service, added_usage: bool = False):
    """Stands in for vLLM's handlers: echoes what reached it, with a usage block."""

    async def handler(request: Request):
        body = await request.json()
        n = sum(len(m["content"]) for m in body.get("messages", []))
        usage = {"prompt_tokens": n, "total_tokens": n + 3, "completion_tokens": 3}
        if body.get("stream"):
            async def events():
                yield "data: " + json.dumps({"choices": [{"delta": {"content": "x"}}]}, separators=(",", ":")) + "\n\n"
                yield "data: " + json.dumps({"choices": [], "usage": usage}, separators=(",", ":")) + "\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse({"received": body, "usage": usage})

    app = Starlette(routes=[Route("/v1/chat/completions", handler, methods=["POST"]),
                            Route("/v1/models", lambda r: JSONResponse({"data": []}))])
    app.add_middleware(GuardMiddleware, plugin=_Plugin(service, Auth({"ka": "tenant-a"}, "adm")))
    return TestClient(app)


def test_middleware_auth_and_routes(service):
    client = _app(service)
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer ka"}).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer adm"}).status_code == 403
    assert client.post("/v1/responses", json={}, headers={"Authorization": "Bearer ka"}).status_code == 404
    assert client.get("/v1/unlearning/targets", headers={"Authorization": "Bearer ka"}).status_code == 403


def _entry_app(service):
    """Stands in for vLLM's handlers behind the engine entry: decides as the entry does on
    what reached the handler, asks for an ICUL retry the way the entry does."""
    from guardserve.server.entry import REQUEST

    async def handler(request: Request):
        body = await request.json()
        ctx = REQUEST.get()
        decision = service.decide(body["messages"], ctx.tenant, ctx.route)
        if decision.guarded and ctx.icul and ctx.icul_targets is None:
            ctx.retry_with = decision.triggered
            return JSONResponse({"error": {"message": "retry"}}, status_code=400)
        n = sum(len(m["content"]) for m in body["messages"])
        return JSONResponse({"received": body, "usage": {"prompt_tokens": n, "total_tokens": n + 1}})

    app = Starlette(routes=[Route("/v1/chat/completions", handler, methods=["POST"]),
                            Route("/metrics", lambda r: JSONResponse({}))])
    app.add_middleware(GuardMiddleware, plugin=_Plugin(service, Auth({"ka": "tenant-a"}, "adm", "scrape")))
    return TestClient(app)


def test_middleware_retries_with_icul_when_the_entry_asks(service):
    service.tokenizer = _WordTokenizer()
    client = _entry_app(service)
    h = {"Authorization": "Bearer ka"}
    plain = client.post("/v1/chat/completions", json=chat("What is the capital of France?"), headers=h)
    assert plain.status_code == 200 and len(plain.json()["received"]["messages"]) == 1
    r = client.post("/v1/chat/completions", json=chat("Where was Ada Quillfeather born?"), headers=h)
    assert r.status_code == 200, r.text
    received = r.json()["received"]["messages"]
    assert received[0]["role"] == "system" and received[-1]["content"] == "Where was Ada Quillfeather born?"
    # usage counts what the client sent, not the instruction the guard added
    assert r.json()["usage"]["prompt_tokens"] < sum(len(m["content"]) for m in received)


def test_metrics_need_their_key(service):
    client = _entry_app(service)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer ka"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer scrape"}).status_code == 200
    assert client.get("/metrics", headers={"Authorization": "Bearer adm"}).status_code == 200


def _engine_request(prompt_ids, **sampling):
    from vllm import SamplingParams
    from vllm.v1.engine import EngineCoreRequest

    return EngineCoreRequest(request_id="r1", prompt_token_ids=list(prompt_ids), mm_features=None,
                             sampling_params=SamplingParams(**sampling), pooling_params=None, arrival_time=0.0,
                             lora_request=None, cache_salt=None, data_parallel_rank=None)


class _CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_entry_plans_on_the_final_prompt_and_fails_closed(service):
    """The engine entry on real ``EngineCoreRequest`` objects: the plan travels in the request,
    stamped; without the HTTP context, or with a broken store, the request is refused."""
    from vllm.exceptions import VLLMValidationError

    from guardserve.server.entry import REQUEST, STAMP, EngineEntryGuard, RequestContext

    service.tokenizer = _CharTokenizer()
    guard = EngineEntryGuard(service, engine_client=None)
    with pytest.raises(VLLMValidationError, match="not served by a guarded server"):
        guard.enforce(_engine_request(_ids("hello")))
    token = REQUEST.set(RequestContext(tenant="default", route=COMPLETIONS))
    try:
        plain = guard.enforce(_engine_request(_ids("What is the capital of France?")))
        assert PHRASES not in plain.sampling_params.extra_args and guard._stamped(plain)
        assert plain.cache_salt.startswith("t-")  # per-tenant prefix cache
        # The question only in the output constraint.
        from vllm.sampling_params import StructuredOutputsParams

        hidden = guard.enforce(_engine_request(_ids("Answer:"), structured_outputs=StructuredOutputsParams(
            choice=["Ada Quillfeather was born in Port Verity", "somewhere else"])))
        assert "Port Verity" in json.loads(hidden.sampling_params.extra_args[PHRASES])
        assert guard._stamped(hidden)
        hidden.prompt_token_ids.append(32)  # changed after the decision: the stamp no longer holds
        assert not guard._stamped(hidden)
        with pytest.raises(VLLMValidationError, match="prompt logprobs"):
            guard.enforce(_engine_request(_ids("Q: Quillfeather's award? A: the Golden Loom Prize"), prompt_logprobs=1))
        assert guard.enforce(_engine_request(_ids("Q: capital of France? A: Paris"), prompt_logprobs=1))
        service.store.close()
        service.detector.config.sync_interval_s = 0
        with pytest.raises(VLLMValidationError, match="could not be checked") as e:
            guard.enforce(_engine_request(_ids("hello")))
        assert "Quillfeather" not in str(e.value) and STAMP
        assert service.metrics.value("guardserve_requests_total", tenant="default", outcome="refused_fail_closed") == 1
    finally:
        REQUEST.reset(token)


def _rewrite(messages, added):
    import anyio

    from guardserve.server.middleware import _UsageRewriter

    out = []

    async def send(m):
        out.append(m)

    async def run():
        w = _UsageRewriter(send, added)
        for m in messages:
            await w(m)

    anyio.run(run)
    return out


def test_usage_rewrite_plain_and_streamed():
    body = b'{"id":"x","choices":[{"text":"\\"prompt_tokens\\": 7"}],"usage":{"prompt_tokens":50,"total_tokens":53,"completion_tokens":3}}'
    out = _rewrite([{"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"),
                                                                                (b"content-length", b"999")]},
                    {"type": "http.response.body", "body": body[:40], "more_body": True},
                    {"type": "http.response.body", "body": body[40:]}], added=20)
    text = out[1]["body"]
    assert b'"usage":{"prompt_tokens":30,"total_tokens":33,"completion_tokens":3}' in text
    assert b'\\"prompt_tokens\\": 7' in text, "text inside strings is never touched"
    assert dict(out[0]["headers"])[b"content-length"] == str(len(text)).encode()

    events = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: {"choices":[],"usage":{"prompt_tokens":50,"total_tokens":53}}\n\ndata: [DONE]\n\n'  # noqa: E501
    chunks = [events[i:i + 7] for i in range(0, len(events), 7)]  # events split anywhere
    msgs = [{"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}]
    msgs += [{"type": "http.response.body", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    streamed = b"".join(m.get("body", b"") for m in _rewrite(msgs, added=20))
    assert streamed == events.replace(b'"prompt_tokens":50,"total_tokens":53', b'"prompt_tokens":30,"total_tokens":33')


def test_oversized_and_malformed_bodies(service, monkeypatch):
    import guardserve.server.middleware as mw

    monkeypatch.setattr(mw, "MAX_BODY", 1000)
    client = _app(service)
    h = {"Authorization": "Bearer ka", "Content-Type": "application/json"}
    assert client.post("/v1/chat/completions", content=b"x" * 2000, headers=h).status_code == 413
    assert client.post("/v1/chat/completions", content=b"{oops", headers=h).status_code == 400
    r = client.post("/v1/chat/completions", json={"messages": "hi"}, headers=h)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]


def test_icul_skips_a_target_deleted_since_the_first_look(service):
    """The middleware's first look names a target that the sync loop then deletes: the request
    goes on unrewritten (the engine entry decides), never a 500."""
    import asyncio
    from types import SimpleNamespace

    from guardserve.server.entry import RequestContext

    mw = GuardMiddleware(app=None, plugin=_Plugin(service, Auth(None, "adm")))
    body = chat("Where was Ada Quill born?")
    ctx = RequestContext(tenant="default", route=CHAT, icul=True)
    gone = SimpleNamespace(target_id="deleted-meanwhile")
    data, send = asyncio.run(mw._with_icul(service, body, [gone], ctx, send="the client's send"))
    assert json.loads(data) == body and send == "the client's send" and not ctx.icul_targets
