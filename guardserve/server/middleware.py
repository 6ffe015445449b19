"""The ASGI middleware in front of vLLM's routes: auth, the field policy, and what may pass.

Only routes whose output the guard controls are served: chat and completions (guarded),
model listing, tokenizer utilities, health, metrics (with a key), and the admin API. vLLM's
other generation routes (``/v1/responses``, ``/v1/messages``, batch and SageMaker routes) are
answered with 404; were one reached, the engine entry would refuse its generation anyway.

The guard itself decides at the engine entry (``guardserve/server/entry.py``), over the final
prompt; the middleware resolves the tenant, applies the field policy
(``guardserve/server/fields.py``), hands the tenant to the entry in a context variable, and for
chat re-sends a request once with the in-context unlearning messages when the entry asks for
them. Every feature of vLLM's handlers (streaming, n > 1, beam search, stop sequences,
logprobs, structured output) stays as it is.
"""

from __future__ import annotations

import json
import logging
import re

import anyio

from guardserve import config
from guardserve.guard import CHAT, COMPLETIONS, BadRequest
from guardserve.server.auth import Auth, AuthError
from guardserve.server.entry import REQUEST, RequestContext
from guardserve.server.fields import check_body

log = logging.getLogger("guardserve.server")

GUARDED = {CHAT, COMPLETIONS}
OPEN = {"/health", "/ping", "/version", "/metrics", "/metrics/"}
INFERENCE = {"/v1/models", "/tokenize", "/detokenize"}
DOCS = {"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"}
ADMIN_PREFIX = "/v1/unlearning/"
MAX_BODY = config.get("GUARDSERVE_MAX_BODY_BYTES")
# Clients and routers read this; the reason (how old, why) is in the operator's log and status.
STALE_MESSAGE = ("this replica cannot confirm the current forget policy (its policy store is unreachable) and serves "
                 "no guarded request until it can; retry on another replica")


RETRY_AFTER_S = 1  # what a 503 asks clients to wait: SDKs and routers honour it instead of retrying at once


async def send_json(send, status: int, message: str, err_type: str) -> None:
    body = json.dumps({"error": {"message": message, "type": err_type, "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        # Without it, clients that retry at once flood a replica that is waiting for its store,
        # and the flood delays the store reads that bring it back.
        headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware), so streamed responses pass through untouched."""

    def __init__(self, app, plugin):
        self.app = app
        self.plugin = plugin  # holds .service (GuardService) once init_state ran, and .auth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].rstrip("/") or "/"
        method = scope["method"]
        headers = dict(scope.get("headers") or [])
        auth: Auth = self.plugin.auth
        try:
            if path in OPEN:
                if path == "/metrics":
                    auth.check_metrics(headers)
                    return await self._metrics(scope, receive, send)
                if path == "/health" and self._stale() is not None:  # a router drains this replica
                    return await send_json(send, 503, STALE_MESSAGE, "service_unavailable")
                return await self.app(scope, receive, send)
            if path.startswith(ADMIN_PREFIX.rstrip("/")):
                auth.check_admin(headers)
                return await self.app(scope, receive, send)
            if path in DOCS:
                return await self.app(scope, receive, send)
            if path in INFERENCE:
                auth.tenant(headers)
                if path == "/v1/models":
                    scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"accept-encoding"]}
                    return await self.app(scope, receive, _JsonRewriter(send, self._models_for_clients))
                return await self.app(scope, receive, send)
            if path in GUARDED:
                tenant = auth.tenant(headers)
                if method != "POST":
                    return await self.app(scope, receive, send)
                return await self._guarded(scope, receive, send, path, tenant)
        except AuthError as e:
            return await send_json(send, e.status, e.message, "authentication_error" if e.status == 401 else "permission_error")
        return await send_json(
            send, 404,
            f"{method} {path} is not available on a guardserve server; use /v1/chat/completions or /v1/completions",
            "not_found_error",
        )

    async def _guarded(self, scope, receive, send, route: str, tenant: str):
        service = self.plugin.service
        if service is None:
            return await send_json(send, 503, "the server is starting; retry shortly", "service_unavailable")
        if self._stale() is not None:
            service.count_outcome(tenant, "refused_fail_closed", 0.0)
            return await send_json(send, 503, STALE_MESSAGE, "service_unavailable")
        raw = await self._read_body(receive)
        if raw is None:
            return await send_json(send, 413, f"request body larger than {MAX_BODY} bytes", "invalid_request_error")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return await send_json(send, 400, f"the request body is not valid JSON: {e}", "invalid_request_error")
        try:
            check_body(route, body)
        except BadRequest as e:
            return await send_json(send, 400, str(e), "invalid_request_error")

        ctx = RequestContext(tenant=tenant, route=route, icul=route == CHAT and service.icul is not None,
                             choices=_choices(body))
        token = REQUEST.set(ctx)
        try:
            if not ctx.icul:
                return await self.app(*_with_body(scope, raw, receive), send)
            # A first look (names, aliases, fact values, always-on targets; no embedder): ICUL
            # up front for what it names, so the usual triggered request is rendered once.
            try:
                named = service.icul_subjects(await anyio.to_thread.run_sync(
                    lambda: service.detector.detect(body["messages"], tenant=tenant, embeddings=False)))
            except Exception:  # the entry's full detection decides, and fails closed, on its own
                named = []
            first, first_send = (raw, send) if not named else await self._with_icul(service, body, named, ctx, send)
            held = _HeldUntilBody(first_send, ctx)
            await self.app(*_with_body(scope, first, receive), held)
            if ctx.retry_with is None:
                if held.start is not None:  # a response without a body
                    await first_send(held.start)
                return
            # The entry found a target that ICUL did not cover: render the request once more
            # with it. The first response was never sent.
            targets, ctx.retry_with, ctx.retried = ctx.retry_with, None, True
            again, again_send = await self._with_icul(service, body, targets, ctx, send)
            return await self.app(*_with_body(scope, again, receive), again_send)
        finally:
            REQUEST.reset(token)

    def _stale(self) -> str | None:
        """Why this replica's policy cannot be trusted now (the operator's words), or None."""
        service = self.plugin.service
        return None if service is None else service.detector.stale()

    async def _with_icul(self, service, body: dict, triggered: list, ctx: RequestContext, send):
        """``body`` (the client's) with in-context unlearning for ``triggered``, and the ``send``
        that reports the client's own prompt size in ``usage``."""
        found = [(x, t) for x in triggered if (t := service.detector_target(x.target_id)) is not None]
        if not found:  # deleted since the first look: the engine entry's full detection decides alone
            return json.dumps(body).encode(), send
        ctx.icul_targets = [x for x, _ in found]
        targets = [t for _, t in found]
        guarded, added = await anyio.to_thread.run_sync(service.icul_guarded, body, targets)
        if guarded is None:  # not even the instruction fits the context: the filters still apply
            return json.dumps(body).encode(), send
        ctx.guard_texts = service.icul.own_texts(guarded, body["messages"], targets)
        data = json.dumps({**body, "messages": guarded}).encode()
        return data, (_UsageRewriter(send, added) if added else send)

    def _models_for_clients(self, listing: dict) -> dict:
        """``/v1/models`` without guardserve's unlearning adapters (which adapter serves whom is
        the guard's business, and their names tell which targets exist) and without any
        adapter's path on this host."""
        service = self.plugin.service
        manager = getattr(service, "adapters", None) if service is not None else None
        ours = set(manager.loaded) if manager is not None else set()
        data = []
        for card in listing.get("data") or []:
            if not isinstance(card, dict) or card.get("id") in ours:
                continue
            if card.get("parent"):  # an adapter: its root is a path on this host
                card = {**card, "root": card.get("id")}
            data.append(card)
        return {**listing, "data": data}

    async def _read_body(self, receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b""
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _metrics(self, scope, receive, send):
        """vLLM's metrics with the guard's appended (uncompressed; ``guardserve/server/metrics.py``)."""
        service = self.plugin.service
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"accept-encoding"]}
        start, parts = None, []

        async def capture(message):
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))
                if not message.get("more_body"):
                    body = b"".join(parts)
                    if service is not None and service.metrics is not None and start["status"] == 200:
                        ctype = dict(start["headers"]).get(b"content-type", b"")
                        body = service.metrics.append_to(body, ctype)  # in vLLM's format (text or OpenMetrics)
                    hdrs = [(k, v) for k, v in start["headers"] if k != b"content-length"]
                    hdrs.append((b"content-length", str(len(body)).encode()))
                    await send({**start, "headers": hdrs})
                    await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capture)


def _choices(body: dict) -> list[str]:
    """The answers a ``choice`` constraint allows, as the client sent them (vLLM turns them
    into a grammar before the engine entry sees the request)."""
    so = body.get("structured_outputs")
    choice = so.get("choice") if isinstance(so, dict) else None
    return [c for c in choice if isinstance(c, str)] if isinstance(choice, list) else []


def _with_body(scope, data: bytes, receive):
    """The scope and receive channel that give the app ``data`` as the request body."""
    headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"transfer-encoding")]
    headers.append((b"content-length", str(len(data)).encode()))
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": data, "more_body": False}
        return await receive()  # http.disconnect, when the client goes away

    return {**scope, "headers": headers}, replay


class _HeldUntilBody:
    """Holds the response start until the first body message: by then the engine entry has
    decided, and a response it asked to retry (``ctx.retry_with``) is dropped whole."""

    def __init__(self, send, ctx: RequestContext):
        self.send, self.ctx = send, ctx
        self.start = None
        self.dropping = False

    async def __call__(self, message):
        if self.dropping:
            return
        if message["type"] == "http.response.start" and self.start is None:
            self.start = message
            return
        if message["type"] == "http.response.body" and self.start is not None:
            if self.ctx.retry_with is not None:
                self.dropping = True
                return
            start, self.start = self.start, None
            await self.send(start)
        await self.send(message)


class _JsonRewriter:
    """Buffers a JSON response and sends ``fn(parsed)`` instead (error responses pass as they are)."""

    def __init__(self, send, fn):
        self.send, self.fn = send, fn
        self.start = None
        self.parts: list[bytes] = []

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.start = message
            return
        if message["type"] != "http.response.body":
            return await self.send(message)
        self.parts.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = b"".join(self.parts)
        if self.start["status"] == 200:
            body = json.dumps(self.fn(json.loads(body)), separators=(",", ":")).encode()
        hdrs = [(k, v) for k, v in self.start["headers"] if k != b"content-length"]
        hdrs.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": hdrs})
        await self.send({"type": "http.response.body", "body": body})


_USAGE_KEYS = re.compile(rb'("(?:prompt_tokens|total_tokens)"\s*:\s*)(\d+)')


class _UsageRewriter:
    """Makes ``usage.prompt_tokens`` count the client's prompt, not the guarded one, in
    plain and streamed responses: a count that changed would tell that a guard fired."""

    def __init__(self, send, added: int):
        self.send, self.added = send, added
        self.start = None
        self.buffer = b""
        self.streaming = False

    def _fix(self, blob: bytes) -> bytes:
        # Only the digits change: re-serialising the JSON would change its formatting
        # (spacing, float notation), itself a tell. Inside JSON strings quotes are
        # escaped, so the pattern can only match real keys.
        def repl(m: re.Match) -> bytes:
            return m.group(1) + str(max(0, int(m.group(2)) - self.added)).encode()

        return _USAGE_KEYS.sub(repl, blob)

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers") or [])
            self.streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            self.start = message
            if self.streaming:
                await self.send(message)
            return
        if message["type"] != "http.response.body":
            return await self.send(message)
        more = message.get("more_body", False)
        self.buffer += message.get("body", b"")
        if self.streaming:
            # Server-sent events: rewrite whole events only.
            cut = self.buffer.rfind(b"\n\n") + 2 if more else len(self.buffer)
            if cut >= 2 or not more:
                ready, self.buffer = self.buffer[:cut], self.buffer[cut:]
                await self.send({"type": "http.response.body", "body": self._fix(ready), "more_body": more})
            return
        if more:
            return
        body = self._fix(self.buffer)
        hdrs = [(k, v) for k, v in self.start["headers"] if k != b"content-length"]
        hdrs.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": hdrs})
        await self.send({"type": "http.response.body", "body": body})
