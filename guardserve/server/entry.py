"""The guard at the engine's door: every generation is decided where it enters vLLM.

Reading the client's JSON cannot win: vLLM builds the prompt from many fields (templates,
template variables, roles, ``kv_transfer_params``, truncation), beam search sends its own
requests, and each release adds fields. So the guard decides on what the model will see:
:class:`EngineEntryGuard` wraps the API server's engine client (``AsyncLLM``) and checks each
``EngineCoreRequest`` once vLLM has built it and before it is registered or sent:

1. the final prompt token ids are decoded and read by detection, with every string of the
   output constraint (choices, regex, JSON schema, grammar, structural tag) and stop strings;
2. the plan is attached to the request itself: the triggered targets and their versions (whose
   filter parts were compiled at registration; see ``GuardService.plan``) and the steering flag
   in ``sampling_params.extra_args``, the covering unlearning adapter as ``lora_request``, a
   per-tenant prefix-cache salt; every later step (beam search steps, ``n`` > 1 children)
   carries them;
3. channels that would show what the guard hides are refused where something triggered:
   prompt logprobs, ``logprob_token_ids``;
4. a request that reaches the engine without the guard's stamp is refused (fail closed), as
   is one with no HTTP context (a route that did not come through the guarded middleware),
   with prompt embeddings or non-text inputs, or pooling.

The tenant and route travel from the HTTP middleware in :data:`REQUEST`, a context variable:
asyncio copies it into every task vLLM spawns for the request.

In-context unlearning changes the conversation before vLLM templates it, so for chat the
middleware adds it up front for the targets a first, embedding-free look at the messages
names (``Detector.detect(..., embeddings=False)``: microseconds). When the entry's full
decision finds a target that ICUL does not cover yet (a paraphrase only the embedding
recognises, text from the template), it records the targets in the context and refuses with
:class:`IculRetry`; the middleware drops that response and sends the request once more with
the ICUL messages (see ``guardserve/server/middleware.py``). Untriggered requests are read
once by the full detection.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator
from contextvars import ContextVar
from dataclasses import dataclass, field

from guardserve.contract import PHRASES, SETS, TARGETS, tenant_salt
from guardserve.guard import Decision, GuardError, GuardService

log = logging.getLogger("guardserve.server")

STAMP = "guardserve_stamp"


@dataclass
class RequestContext:
    """What the HTTP layer knows of a request, for the engine entry."""

    tenant: str
    route: str
    icul: bool = False  # the middleware can retry with in-context unlearning (chat)
    icul_targets: list = field(default_factory=list)  # targets whose ICUL messages the request carries
    retried: bool = False  # the middleware already re-sent the request once
    retry_with: list | None = None  # set by the entry: retry with ICUL for these triggered targets
    guard_texts: list[str] = field(default_factory=list)  # ICUL's own texts inside the prompt
    decisions: list[Decision] = field(default_factory=list)
    pending: tuple[str, Decision] | None = None  # decided off the event loop, keyed by the texts read
    choices: list[str] = field(default_factory=list)  # a choice constraint's answers, as sent


REQUEST: ContextVar[RequestContext | None] = ContextVar("guardserve_request", default=None)


def _validation_error(message: str, parameter: str | None = None) -> Exception:
    from vllm.exceptions import VLLMValidationError

    return VLLMValidationError(message, parameter=parameter)


def IculRetry() -> Exception:  # noqa: N802 - an exception factory: vLLM maps its type to a 400
    return _validation_error("the request was re-planned; retrying")


def constraint_texts(sp) -> list[str]:
    """Every string an output constraint or stop condition carries: a constraint can hold the
    question itself (``choice=["Jostem Falls", ...]``) or steer the answer to a fact."""
    out: list[str] = []
    so = getattr(sp, "structured_outputs", None)
    if so is not None:
        for name in ("json", "regex", "grammar", "structural_tag", "whitespace_pattern"):
            value = getattr(so, name, None)
            if value is None or value is False:
                continue
            out.append(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
        out.extend(c for c in (getattr(so, "choice", None) or []) if isinstance(c, str))
    stop = getattr(sp, "stop", None)
    out.extend([stop] if isinstance(stop, str) else [s for s in (stop or []) if isinstance(s, str)])
    out.extend(w for w in (getattr(sp, "bad_words", None) or []) if isinstance(w, str))
    return [t for t in out if t.strip()]


def _fold(text: str) -> str:
    return " ".join(text.casefold().split())


def _choice_of(sp) -> list[str]:
    so = getattr(sp, "structured_outputs", None)
    return [c for c in (getattr(so, "choice", None) or []) if isinstance(c, str)] if so is not None else []


def _choices_all_forbidden(choices: list[str], phrases) -> bool:
    """Whether a ``choice`` constraint lists only answers that contain a forbidden phrase (as
    the filter reads text: case and runs of white space do not matter)."""
    if not choices:
        return False  # most requests: no pass over (maybe thousands of) phrases
    folded = [_fold(p) for p in phrases if p.strip()]
    return bool(folded) and all(any(p in _fold(c) for p in folded) for c in choices)


class EngineEntryGuard:
    """Wraps ``engine_client`` (vLLM's ``AsyncLLM``) so every request is decided on its way in.

    ``service``: the guard pipeline (its tokenizer decodes the prompt; its ``adapters``, when
    the server serves LoRA, route triggered requests to their unlearning adapter).
    """

    def __init__(self, service: GuardService, engine_client):
        self.service = service
        self.engine = engine_client
        self._key = secrets.token_bytes(32)  # stamps are valid in this process only

    # ------------------------------------------------------------------ installation
    def install(self) -> None:
        engine = self.engine
        processor = engine.input_processor
        sync_process, async_process = processor.process_inputs, processor.process_inputs_async
        add_request = engine.add_request
        core_add = engine.engine_core.add_request_async

        def process_inputs(*args, **kwargs):
            return self.enforce(sync_process(*args, **kwargs))

        async def process_inputs_async(*args, **kwargs):
            request = await async_process(*args, **kwargs)
            return await asyncio.to_thread(self.enforce, request)

        async def guarded_add_request(request_id, prompt, params, *args, **kwargs):
            from vllm.v1.engine import EngineCoreRequest

            if isinstance(prompt, AsyncGenerator):
                raise _validation_error("streaming inputs are not served by a guarded server")
            if isinstance(prompt, EngineCoreRequest) and not self._stamped(prompt):
                prompt = await asyncio.to_thread(self.enforce, prompt)
            elif isinstance(prompt, dict) and prompt.get("type") == "token" and REQUEST.get() is not None:
                # The common path (rendered by the OpenAI server): decide off the event loop now;
                # process_inputs (synchronous) then finds the decision for the same tokens.
                await asyncio.to_thread(self._predecide, prompt, params)
            return await add_request(request_id, prompt, params, *args, **kwargs)

        async def checked_core_add(request):
            if not self._stamped(request):
                log.error("refused request %s: it reached the engine without the guard's stamp", request.request_id)
                ctx = REQUEST.get()
                if ctx is not None:
                    self.service.count_outcome(ctx.tenant, "refused_fail_closed")
                    self.service.audit_refusal(ctx.tenant, ctx.route, "no valid guard stamp at the engine",
                                               request_id=getattr(request, "external_req_id", None) or request.request_id)
                raise _validation_error("the request could not be checked against the server's policy")
            return await core_add(request)

        processor.process_inputs = process_inputs
        processor.process_inputs_async = process_inputs_async
        engine.add_request = guarded_add_request
        engine.engine_core.add_request_async = checked_core_add

    # ------------------------------------------------------------------ the decision
    def _ctx(self) -> RequestContext:
        ctx = REQUEST.get()
        if ctx is None:
            # A generation that did not come through the guarded HTTP routes.
            raise _validation_error("this route is not served by a guarded server")
        return ctx

    def _texts(self, prompt_ids, sp) -> list[str]:
        if self.service.tokenizer is None:
            raise GuardError("the serving tokenizer is not loaded")
        text = self.service.tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
        return [text, *constraint_texts(sp)]

    def _predecide(self, prompt: dict, params) -> None:
        ctx = REQUEST.get()
        try:
            texts = self._texts(prompt["prompt_token_ids"], params)
            key = self._texts_key(texts)
            ctx.pending = (key, self._decide(ctx, texts))
        except Exception:  # decided again, synchronously, in process_inputs
            log.debug("pre-decision failed", exc_info=True)

    @staticmethod
    def _texts_key(texts: list[str]) -> str:
        return hashlib.sha256("\x00".join(texts).encode()).hexdigest()

    def _decide(self, ctx: RequestContext, texts: list[str]) -> Decision:
        prompt, rest = texts[0], texts[1:]
        if ctx.guard_texts:
            # The guard's own instruction and demonstrations are not embedded again (they name
            # only targets that already triggered, and would multiply the embedder's work on a
            # 2-core machine); the lexical matcher still reads the whole prompt.
            own = prompt
            for t in sorted(ctx.guard_texts, key=len, reverse=True):
                own = own.replace(t, " ")
            decision = self.service.decide([own, *rest], ctx.tenant, ctx.route, lexical_only=[prompt])
            ctx.decisions.append(decision)
            return decision
        decision = self.service.decide(texts, ctx.tenant, ctx.route)
        ctx.decisions.append(decision)
        return decision

    def enforce(self, request):
        """Decide ``request`` (an ``EngineCoreRequest``) and attach the plan to it, or raise
        vLLM's validation error (the client gets a 4xx with a message that names no target)."""
        ctx = self._ctx()
        sp = request.sampling_params
        if sp is None or request.pooling_params is not None:
            raise _validation_error("a guarded server serves text generation only")
        if request.prompt_embeds is not None or request.mm_features:
            raise _validation_error("a guarded server reads text prompts only: prompt embeddings and "
                                    "multimodal inputs are not accepted")
        if request.prompt_token_ids is None:
            raise _validation_error("a guarded server needs the prompt's token ids")
        pending, ctx.pending = ctx.pending, None
        started = time.perf_counter()
        decision = None
        try:
            texts = self._texts(request.prompt_token_ids, sp)
            if pending is not None and pending[0] == self._texts_key(texts):
                decision = pending[1]
            else:
                decision = self._decide(ctx, texts)
            decision.vllm_request_id = request.request_id  # vLLM's id (the response's), for the audit log
            lora = self._adapter(decision)
        except GuardError as e:
            raise self._fail_closed(ctx, e, decision, request, started) from None

        if decision.guarded:
            covered = {t.target_id for t in ctx.icul_targets}
            uncovered = [t for t in self.service.icul_subjects(decision.triggered) if t.target_id not in covered]
            if ctx.icul and not ctx.retried and uncovered:
                ctx.retry_with = [*ctx.icul_targets, *uncovered]
                self.service.count_outcome(ctx.tenant, "icul_retry", time.perf_counter() - started)
                raise IculRetry()
            closed = None
            if sp.prompt_logprobs is not None:
                closed = _validation_error("prompt logprobs are not available for this prompt under the server's "
                                           "policy", parameter="prompt_logprobs")
            elif sp.logprob_token_ids:
                closed = _validation_error("logprob_token_ids are not available for this prompt under the server's "
                                           "policy", parameter="logprob_token_ids")
            elif _choices_all_forbidden(ctx.choices or _choice_of(sp), decision.phrases):
                # Every answer the constraint allows writes a forbidden phrase: the filter would
                # leave the grammar no token to take, which the engine reports as a server error.
                closed = _validation_error("no answer the output constraint allows is available under the server's "
                                           "policy", parameter="structured_outputs")
            if closed is not None:
                self.service.count_outcome(ctx.tenant, "refused_policy", time.perf_counter() - started)
                self.service.audit_refusal(ctx.tenant, ctx.route, str(closed), decision, fail_closed=False)
                raise closed
        try:
            sp.extra_args = self.service.plan_xargs(decision, sp.extra_args)
        except GuardError as e:  # a filter part that could not be built: never a 500 naming the target
            raise self._fail_closed(ctx, e, decision, request, started) from None
        request.cache_salt = tenant_salt(ctx.tenant, request.cache_salt, decision.steer or None)
        if lora is not False:
            request.lora_request = lora
        sp.extra_args[STAMP] = self._stamp(request)
        self.service.count_outcome(ctx.tenant, "guarded" if decision.guarded else "served", time.perf_counter() - started)
        self.service.audit(decision, ctx.route, lora.lora_name if lora else None)
        return request

    def _fail_closed(self, ctx: RequestContext, error: GuardError, decision, request, started: float) -> Exception:
        """Log, count and audit a request the guard could not check; the client's error names no target."""
        log.error("refused a request of tenant %r (fail closed): %s", ctx.tenant, error)
        self.service.count_outcome(ctx.tenant, "refused_fail_closed", time.perf_counter() - started)
        self.service.audit_refusal(ctx.tenant, ctx.route, str(error), decision, request_id=request.request_id)
        return _validation_error("the request could not be checked against the server's policy and was not "
                                 "served; the operator's log has the reason")

    def _adapter(self, decision: Decision):
        """The unlearning adapter that serves this request, or False to keep the client's
        choice. The covering adapter wins over any model the client named, so a client cannot
        dodge it by naming another."""
        manager = getattr(self.service, "adapters", None)  # set once the server's AdapterManager exists
        if manager is None or not manager.loaded:
            return False
        # The detector's own index (the versions that triggered), not a store read per target:
        # a tenant's thousands of always-on targets are on every request.
        detector = self.service.detector
        targets = [t for t in (detector.target(i) for i in decision.target_ids) if t is not None]
        name = manager.pick(targets)
        if name is None:
            return False
        lora = manager.serving_models.lora_requests.get(name)
        if lora is None:
            raise GuardError(f"unlearning adapter {name} is registered as loaded but vLLM does not know it")
        return lora

    # ------------------------------------------------------------------ the stamp
    def _stamp(self, request) -> str:
        sp = request.sampling_params
        blob = json.dumps([list(request.prompt_token_ids), sp.extra_args.get(PHRASES, ""), sp.extra_args.get(TARGETS, ""),
                           sp.extra_args.get(SETS, ""), request.cache_salt],
                          separators=(",", ":")).encode()
        return hmac.new(self._key, blob, hashlib.sha256).hexdigest()[:32]

    def _stamped(self, request) -> bool:
        sp = getattr(request, "sampling_params", None)
        extra = getattr(sp, "extra_args", None) or {}
        stamp = extra.get(STAMP)
        return isinstance(stamp, str) and request.prompt_token_ids is not None \
            and hmac.compare_digest(stamp, self._stamp(request))
