"""The guard pipeline, engine-agnostic: detect -> decide -> plan.

``GuardService.decide(texts, tenant)`` reads every text the model will see (for the server:
the decoded final prompt and the strings of any output constraint) and returns a
:class:`Decision`: the triggered targets and the plan for them — the forbidden phrases for
the logits processor, the steering flag, and :meth:`GuardService.plan_xargs` turns it into the
``vllm_xargs`` the engine reads. :meth:`GuardService.icul_messages` adds the in-context
unlearning instruction and demonstrations to a chat conversation, fitted into the context.

Three callers, one pipeline: the server's engine-entry hook (``guardserve/server/entry.py``),
which every generation passes; ``guardserve eval`` and offline use through
:meth:`GuardService.prepare`, which rewrites a request body the same way. The phrases travel
with the request, so a request in flight finishes under the policy it started with, in
whatever engine process runs it.

Anything that goes wrong while checking a request raises ``GuardError``: the request is
refused, never served unguarded.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from guardserve import config
from guardserve.classifiers.detector import AlwaysOn
from guardserve.classifiers.signals.always import REASON as ALWAYS_REASON
from guardserve.contract import RESERVED_PREFIX, GuardPlan, steered_salt
from guardserve.guard.configs import GuardConfig, server_config

log = logging.getLogger("guardserve.server")
audit_log = logging.getLogger("guardserve.audit")

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
_ALWAYS_ONLY = (ALWAYS_REASON,)  # the reasons of a target that triggered on its mode alone


class GuardError(Exception):
    """The request could not be checked; it is refused (fail closed)."""


class BadRequest(Exception):
    """The client's request is malformed (HTTP 400)."""


@dataclass
class Decision:
    """What the guard decided for one request: the triggered targets and what serves them."""

    request_id: str
    tenant: str
    triggered: list = field(default_factory=list)  # classifiers.Triggered, best first
    phrases: list[str] = field(default_factory=list)
    steer: list[list] = field(default_factory=list)  # [[target id, version]], with steering on
    added_prompt_tokens: int = 0  # tokens the in-context instruction added (hidden from usage)
    seconds: float = 0.0
    policy_version: int | None = None  # the policy store's change sequence the detector had applied
    vllm_request_id: str | None = None  # vLLM's request id, where the engine entry decided it
    always: AlwaysOn | None = None  # the tenant's always-on set, carried whole (see plan)
    always_only: int = 0  # how many of ``triggered`` are always-on targets the conversation is not about

    @property
    def target_ids(self) -> list[str]:
        return [t.target_id for t in self.triggered]

    @property
    def guarded(self) -> bool:
        return bool(self.triggered)


def context_length(model: str, trust_remote_code: bool = False) -> int | None:
    """The context vLLM derives by default (the model's position limit), where the config says."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception:
        return None
    cfg = getattr(cfg, "text_config", None) or cfg
    value = getattr(cfg, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


class GuardService:
    """Everything the API process needs to guard requests; one per server."""

    def __init__(self, store, detector, tokenizer=None, guard: GuardConfig | None = None, metrics=None,
                 max_model_len: int | None = None, icul=None, filter_parts=None):
        """``guard``: what the guard does to a triggered request (default: the configuration
        ``GUARDSERVE_GUARD`` names, ``guard`` unless set); ``icul``: the in-context unlearner
        to use where the configuration asks for ICUL (default: a new one); ``filter_parts``: a
        ``logits_processors.parts.FilterParts`` (the server's): plans then name the triggered
        targets and their versions, whose precompiled filter parts the engine loads, instead of
        carrying their phrases (see :meth:`plan`)."""
        self.store = store
        self.detector = detector
        self.tokenizer = tokenizer
        self.guard = guard or server_config()
        if self.guard.icul and icul is None:
            from guardserve.prompting import InContextUnlearner

            icul = InContextUnlearner()
        self.icul = icul if self.guard.icul else None
        self.max_model_len = max_model_len  # the engine's context: ICUL is fitted into it
        self.metrics = metrics
        if metrics is not None and hasattr(metrics, "bind"):
            metrics.bind(self)  # its gauges read this service's detector when scraped
        self.filter_parts = filter_parts
        self._audited_sets: dict[str, None] = {}  # always-on sets whose members the audit log has listed

    @property
    def semantic(self) -> bool:
        return self.guard.semantic

    @property
    def steering(self) -> bool:
        return self.guard.steering

    @classmethod
    def from_env(cls, model: str | None, tokenizer_name: str | None = None, trust_remote_code: bool = False,
                 max_model_len: int | None = None, metrics=None):
        """The server's service, configured by ``GUARDSERVE_*``. Its detector does not sync in
        the request path: the caller runs the sync loop (``GuardEndpointPlugin``)."""
        from guardserve.classifiers import Detector, DetectorConfig
        from guardserve.policy import open_store

        store = open_store()
        # Target-text embeddings are cached on disk: a restart with 100,000 targets
        # reads them back in seconds instead of embedding them again for minutes.
        cache = config.home() / "cache" / "target-vectors.sqlite"
        cache.parent.mkdir(parents=True, exist_ok=True)
        # The server's loop keeps the detector synced (woken by the store's notifications), so
        # requests never wait on the store, and refuse once the policy is older than the bound.
        detector = Detector(store, DetectorConfig(vector_cache=str(cache),
                                                  hidden_state_model=config.get("GUARDSERVE_HIDDEN_STATE_MODEL"),
                                                  sync_in_detect=False,
                                                  max_policy_age_s=config.get("GUARDSERVE_MAX_POLICY_AGE_S")))
        tokenizer = None
        if model:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or model, trust_remote_code=trust_remote_code)
            if max_model_len is None:
                max_model_len = context_length(model, trust_remote_code)
        parts = None
        guard = server_config()
        if tokenizer is not None and guard.token_filter:
            from guardserve.logits_processors.parts import FilterParts

            parts = FilterParts(tokenizer)
        return cls(store, detector, tokenizer, guard, metrics=metrics, max_model_len=max_model_len,
                   filter_parts=parts)

    # ------------------------------------------------------------------ the pipeline
    def decide(self, texts: list, tenant: str, route: str = "", lexical_only: Sequence[str] = ()) -> Decision:
        """Detect over ``texts`` (strings or chat messages; ``lexical_only``: texts for the
        lexical matcher alone) and plan the guard for what triggered. Raises ``GuardError``
        when the request cannot be checked."""
        started = time.perf_counter()
        decision = Decision(request_id=uuid.uuid4().hex[:16], tenant=tenant)
        try:
            found = self.detector.examine(texts, tenant=tenant, lexical_only=lexical_only)
        except Exception as e:  # DetectionError included: fail closed
            raise GuardError(f"detection failed: {e}") from e
        triggered = decision.triggered = found.triggered
        decision.always, decision.always_only = found.always, found.always_only
        decision.policy_version = self.policy_version()
        if triggered:
            if found.always is not None and found.always_only:
                # The set's phrases are made once per policy change; only the targets the
                # conversation is about are added (a sort of every member's phrases would cost
                # each request that names someone tens of milliseconds at 20,000 always-on).
                phrases = list(found.always.phrases)
                phrases += [p for t in self.icul_subjects(triggered) for p in t.forbidden]
            else:
                phrases = sorted({p for t in triggered for p in t.forbidden})
            if not phrases and self.guard.token_filter:
                raise GuardError(f"no forbidden phrases retrieved for triggered targets {decision.target_ids}")
            decision.phrases = phrases if self.guard.token_filter else []
            if self.steering:
                # As ICUL: the targets the conversation is about. An always-on target it is not
                # about is enforced by the filter; clamping thousands of them on every token is not.
                decision.steer = sorted([t.target_id, t.version] for t in self.icul_subjects(triggered))
        decision.seconds = time.perf_counter() - started
        self._count(decision)
        return decision

    def policy_version(self) -> int | None:
        """The policy store's change sequence number the detector has applied (the policy this
        replica enforces), None where the detector does not say."""
        seq = getattr(self.detector, "policy_seq", None)
        return seq if isinstance(seq, int) else None

    def audit(self, decision: Decision, route: str, adapter: str | None = None) -> None:
        """One line in the operators' audit log for a request on which something triggered
        (or that an unlearning adapter served): an ISO-8601 UTC timestamp, vLLM's request id
        (null offline) and the guard's decision id, tenant, route, the policy version, the
        triggered targets with their versions, scores and reasons."""
        if not decision.guarded and adapter is None:
            return
        audit_log.info(json.dumps({
            **self._audit_head("guarded", decision.tenant, route, decision),
            "phrases": len(decision.phrases), "adapter": adapter, "detect_ms": round(decision.seconds * 1000, 2),
        }))

    def audit_refusal(self, tenant: str, route: str, reason: str, decision: Decision | None = None,
                      request_id: str | None = None, fail_closed: bool = True) -> None:
        """One line for a refused request: ``fail_closed`` (the guard could not check it;
        ``decision`` is None where detection itself failed) or refused by the policy (a channel
        closed to a triggered request). ``reason`` is for operators only: it may name targets."""
        head = self._audit_head("refused", tenant, route, decision, request_id)
        audit_log.info(json.dumps({**head, "outcome": "refused_fail_closed" if fail_closed else "refused_policy",
                                   "reason": reason}))

    def _audit_head(self, event: str, tenant: str, route: str, decision: Decision | None,
                    request_id: str | None = None) -> dict:
        """The fields every audit line has. A decision's always-on targets that the
        conversation is not about are not listed one by one (thousands on every request):
        ``always_on`` gives their number and their set's digest, whose members (``ids`` and
        ``versions``) the line ``{"event": "always_on_set"}`` lists once per set."""
        d = decision
        listed = d.triggered if d is not None else []
        always = None
        if d is not None and d.always is not None and d.always_only:
            self._audit_always(d.always, tenant)
            listed = [] if d.always_only == len(listed) else [t for t in listed if t.reasons != _ALWAYS_ONLY]
            always = {"targets": d.always_only, "set": d.always.digest}
        return {
            "ts": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "event": event,
            "request_id": (d.vllm_request_id if d is not None else None) or request_id,
            "decision_id": d.request_id if d is not None else None,
            "tenant": tenant, "route": route,
            "policy_version": d.policy_version if d is not None else self.policy_version(),
            "targets": [{"id": t.target_id, "version": t.version, "score": t.score, "reasons": list(t.reasons)}
                        for t in listed],
            "always_on": always,
        }

    def _audit_always(self, always: AlwaysOn, tenant: str) -> None:
        if always.digest in self._audited_sets:
            return
        self._audited_sets[always.digest] = None
        while len(self._audited_sets) > 1024:
            self._audited_sets.pop(next(iter(self._audited_sets)))
        audit_log.info(json.dumps({
            "ts": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "event": "always_on_set", "set": always.digest, "tenant": tenant,
            # Two flat lists, not thousands of pairs: this line is written on a request's path.
            "ids": [t.id for g in always.groups for t in g],
            "versions": [t.version for g in always.groups for t in g],
        }))

    def plan_xargs(self, decision: Decision, xargs: dict | None = None) -> dict:
        """The ``vllm_xargs`` that carry ``decision`` to the engine: a client's own keys kept,
        any ``guardserve_`` key replaced by the guard's."""
        return self.plan(decision).to_xargs(xargs)

    def plan(self, decision: Decision) -> GuardPlan:
        """What the engine does for ``decision`` (:mod:`guardserve.contract`).

        With ``filter_parts`` (the server), the plan names the triggered targets and versions:
        their parts were compiled when they were registered; one still missing (a compile
        under way, a cleared cache) is compiled here, in this request's thread, never in the
        engine's step. The tenant's always-on targets travel as their set parts (a few names
        for thousands of targets), those of a set not built yet as their own parts. Without
        ``filter_parts`` (offline use), the plan carries the phrases."""
        steer = tuple((t, v) for t, v in decision.steer)
        semantic = self.semantic and bool(decision.phrases)
        if self.filter_parts is None or not decision.phrases:
            return GuardPlan(tuple(decision.phrases), semantic, steer)
        triggered: list = decision.triggered
        sets: list[str] = []
        if decision.always is not None and decision.always_only:
            sets, loose = self.filter_parts.set_plan(decision.always.groups)
            covered = decision.always.ids
            triggered = [] if decision.always_only == len(triggered) else \
                [t for t in triggered if t.target_id not in covered]
            for target in loose:  # a set still being built: its targets one by one meanwhile
                if not self.filter_parts.has(target.id, target.version):
                    try:
                        self.filter_parts.ensure([target], where="request")
                    except Exception as e:
                        raise GuardError(f"the filter of target {target.id} could not be built: {e}") from e
            sets_targets = [(t.id, t.version) for t in loose]
        else:
            sets_targets = []
        targets = []
        for t in triggered:
            if not self.filter_parts.has(t.target_id, t.version):
                target = self.detector_target(t.target_id)
                if target is None:
                    raise GuardError(f"target {t.target_id} is gone; its filter cannot be built")
                if target.version != t.version:  # changed since detection: its newer policy applies
                    t = dataclasses.replace(t, version=target.version)
                try:
                    self.filter_parts.ensure([target], where="request")
                except Exception as e:
                    raise GuardError(f"the filter of target {t.target_id} could not be built: {e}") from e
            targets.append((t.target_id, t.version))
        return GuardPlan((), semantic, steer, tuple(targets + sets_targets), tuple(sets))

    def prepare(self, route: str, body: dict, tenant: str) -> tuple[dict, Decision]:
        """A chat or completions request body rewritten as the guard serves it (offline use and
        ``guardserve eval``; the server decides at the engine entry instead): unchanged when
        nothing triggered, else with the plan in ``vllm_xargs``, the steering cache salt and,
        for chat, the in-context unlearning messages."""
        started = time.perf_counter()
        try:
            out, decision = self._prepare(route, body, tenant)
        except GuardError as e:  # fail closed: counted and audited, then raised
            self.count_outcome(tenant, "refused_fail_closed", time.perf_counter() - started)
            self.audit_refusal(tenant, route, str(e))
            raise
        self.count_outcome(tenant, "guarded" if decision.guarded else "served", time.perf_counter() - started)
        return out, decision

    def _prepare(self, route: str, body: dict, tenant: str) -> tuple[dict, Decision]:
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        xargs = body.get("vllm_xargs")
        if xargs is not None and not isinstance(xargs, dict):
            raise BadRequest("vllm_xargs must be an object of flat values")
        reserved = sorted(k for k in (xargs or {}) if str(k).startswith(RESERVED_PREFIX))
        if reserved:
            raise BadRequest(f"vllm_xargs keys starting with '{RESERVED_PREFIX}' are reserved by the server: {reserved}")
        if route == CHAT:
            conversation = body.get("messages")
            if not isinstance(conversation, list) or not conversation:
                raise BadRequest("'messages' must be a non-empty list")
        else:
            conversation = self._prompt_texts(body.get("prompt"))
        decision = self.decide(conversation, tenant, route)
        self.audit(decision, route)
        if not decision.guarded:
            return body, decision
        body = {**body, "vllm_xargs": self.plan_xargs(decision, xargs)}
        if decision.steer:
            body["cache_salt"] = steered_salt(body.get("cache_salt"), decision.steer)
        subjects = self.icul_subjects(decision.triggered) if route == CHAT and self.icul is not None else []
        targets = [t for t in (self.detector_target(x.target_id) for x in subjects) if t is not None]
        if targets:
            guarded_messages, decision.added_prompt_tokens = self.icul_guarded(body, targets)
            if guarded_messages is not None:
                body["messages"] = guarded_messages
        return body, decision

    @staticmethod
    def icul_subjects(triggered: list) -> list:
        """The triggered targets (``Triggered``) the in-context instruction names and steering
        clamps: those the conversation is about. A target that triggered on its ``always``
        mode alone is left to the filter: naming every always-on target in every prompt would
        show them all to the model and grow each prompt (and its checks) with the policy."""
        return [t for t in triggered if t.reasons != _ALWAYS_ONLY]

    def icul_messages(self, body: dict, targets: list) -> list[dict] | None:
        """ICUL's conversation, with fewer demonstrations (down to the instruction alone) where
        the full one would not fit the model's context next to the requested completion; None
        (the filters still apply) when not even the instruction fits. Built for the serving
        tokenizer's chat template: where it refuses a system message, the instruction heads the
        first user turn (:meth:`InContextUnlearner.build_messages`). Only for a service with ICUL on."""
        return self.icul_guarded(body, targets)[0]

    def icul_guarded(self, body: dict, targets: list) -> tuple[list[dict] | None, int]:
        """:meth:`icul_messages`, and how many prompt tokens they add to the client's, so that
        ``usage`` reports what the client sent (a changed count would tell that a guard fired).
        Each conversation is rendered and counted once: the fit already counted both."""
        icul = self.icul
        assert icul is not None  # callers ask only where the configuration has ICUL
        tok = self.tokenizer

        def plain() -> tuple[list[dict], int]:
            out = icul.build_messages(body["messages"], targets, tokenizer=tok)
            return out, self.added_tokens(body["messages"], out)

        if not self.max_model_len or tok is None or not getattr(tok, "chat_template", None):
            return plain()
        reserve = body.get("max_completion_tokens") or body.get("max_tokens") or 1
        reserve = reserve if isinstance(reserve, int) and reserve > 0 else 1
        try:
            before = self._prompt_tokens(body["messages"])
        except Exception:
            return plain()
        if before + reserve > self.max_model_len:
            # Too long before guarding as well: vLLM refuses it exactly as it would unguarded.
            return plain()
        counted: list[int] = []
        limit = self.max_model_len

        def fits(messages: list[dict]) -> bool:
            counted.append(self._prompt_tokens(messages))
            return counted[-1] + reserve <= limit

        try:
            out = icul.fit_messages(body["messages"], targets, fits, tokenizer=tok)
        except Exception:  # a chat template that refuses the conversation: vLLM will say so
            return plain()
        if out is None:
            log.warning("in-context unlearning left out: the instruction does not fit the context "
                        "(%d tokens) next to the request; the filters still apply", self.max_model_len)
            return None, 0
        return out, max(0, counted[-1] - before)

    def _prompt_tokens(self, messages: list[dict]) -> int:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def detector_target(self, target_id: str):
        try:
            return self.store.get(target_id)
        except Exception:
            return None

    def _prompt_texts(self, prompt) -> list[str]:
        """The texts of a completions ``prompt``: a string, a list of strings, or token ids."""
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return list(prompt)
            if all(isinstance(p, int) for p in prompt):
                return [self._decode(prompt)]
            if all(isinstance(p, list) and all(isinstance(i, int) for i in p) for p in prompt):
                return [self._decode(p) for p in prompt]
        raise BadRequest("'prompt' must be a string, a list of strings, or token ids")

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            raise GuardError("token-id prompts need the serving tokenizer, which is not loaded")
        return self.tokenizer.decode(ids)

    def added_tokens(self, before: list[dict], after: list[dict]) -> int:
        """How many prompt tokens the in-context instruction added, so that ``usage``
        reports what the client sent (a changed count would tell that a guard fired)."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            return 0
        try:
            texts = [self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in (before, after)]
            n = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        except Exception:
            return 0
        return max(0, n[1] - n[0])

    def _count(self, decision: Decision) -> None:
        if self.metrics is not None:
            self.metrics.observe(decision, decision.triggered)

    def count_outcome(self, tenant: str, outcome: str, seconds: float | None = None) -> None:
        """One request's outcome in the metrics (``served``, ``guarded``, ``refused_fail_closed``,
        ``refused_policy``, ``icul_retry``) and the time the guard spent on it."""
        if self.metrics is not None:
            self.metrics.request(tenant, outcome, seconds)
