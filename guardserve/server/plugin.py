"""guardserve as a vLLM endpoint plugin (entry point group ``vllm.endpoint_plugins``).

``VLLM_PLUGINS=guardserve python -m vllm.entrypoints.launchers.api_server.entry --model M``
and ``guardserve serve --model M`` start the same guarded server: this plugin adds the
admin API, puts :class:`GuardMiddleware` in front of vLLM's routes and installs the guard at
the engine client's request entry (``guardserve/server/entry.py``); the logits processor (entry
point group ``vllm.logits_processors``) does the banning in the engine.
"""

from __future__ import annotations

import asyncio
import logging

from guardserve.server.auth import Auth

log = logging.getLogger("guardserve.server")


def setup_logging() -> str:
    """guardserve's log lines go to stderr beside vLLM's; the audit log (one JSON object a
    line: which targets fired on which request, never shown to end users) goes to
    ``$GUARDSERVE_AUDIT_LOG`` (default ``$GUARDSERVE_HOME/audit.jsonl``)."""
    import os

    from guardserve import config

    root = logging.getLogger("guardserve")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("(guardserve) %(levelname)s %(asctime)s %(message)s", "%m-%d %H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    path = config.get("GUARDSERVE_AUDIT_LOG") or str(config.home() / "audit.jsonl")
    audit = logging.getLogger("guardserve.audit")
    if not any(isinstance(h, logging.FileHandler) for h in audit.handlers):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fh = logging.FileHandler(path)
        fh.setFormatter(logging.Formatter("%(message)s"))
        audit.addHandler(fh)
        audit.propagate = False  # the audit trail stays out of the console log
        audit.setLevel(logging.INFO)
    return path


class GuardEndpointPlugin:
    name = "guardserve"
    required_tasks = ("generate",)

    def __init__(self):
        self.auth = Auth.from_env()  # fails here, before the server starts, on a bad key list
        self.service = None
        self.upkeep = None  # SAE selection upkeep (guardserve/steering/upkeep.py), with steering on
        self._sync_task = None

    def attach_router(self, app) -> None:
        from guardserve.server.adapters import router as adapters_router
        from guardserve.server.admin import router
        from guardserve.server.middleware import GuardMiddleware

        app.include_router(router)
        app.include_router(adapters_router)  # /v1/unlearning/adapters (issue 7)
        app.add_middleware(GuardMiddleware, plugin=self)
        app.state.guardserve = self

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:
            raise RuntimeError("guardserve needs an engine: it cannot run on vLLM's render-only server")
        from guardserve.guard import GuardService
        from guardserve.server.entry import EngineEntryGuard
        from guardserve.server.metrics import GuardMetrics
        from guardserve.server.preflight import engine_problem

        problem = engine_problem(getattr(engine_client, "vllm_config", None), args)
        if problem:
            log.error("guardserve: refusing to start: %s", problem)
            raise RuntimeError(f"guardserve: refusing to start, the guard would not apply: {problem}")

        audit_path = setup_logging()
        model = getattr(args, "model", None)
        tokenizer = getattr(args, "tokenizer", None)
        trust = bool(getattr(args, "trust_remote_code", False))
        # The engine's context, which ICUL's demonstrations are fitted into.
        context = getattr(getattr(engine_client, "model_config", None), "max_model_len", None) \
            or getattr(args, "max_model_len", None)
        # Loading the embedder and indexing the policy take seconds: off the event loop.
        self.service = await asyncio.to_thread(GuardService.from_env, model, tokenizer, trust,
                                               context if isinstance(context, int) else None, GuardMetrics())
        # Every generation, whatever route or field produced it, is decided where it enters the engine.
        EngineEntryGuard(self.service, engine_client).install()
        if self.service.filter_parts is not None:
            # Every target's filter part, compiled once per version in this thread: the request
            # path and the engine only read them (guardserve/logits_processors/parts.py).
            self.service.filter_parts.start(self.service.detector.targets, sets=self.service.detector.always_groups)
        state.guardserve = self
        await self._load_adapters(state)
        n = len(self.service.detector.targets())
        embedder = self.service.detector.embedder
        log.info("guarding %s with %d registered target(s); policy store %s; audit log %s; embedder on %s", model, n,
                 self.service.store, audit_path,
                 "none" if embedder is None else "torch" if embedder.onnx is None
                 else f"ONNX Runtime ({'int8' if embedder.onnx.int8 else 'float32'})")
        if self.service.steering:
            from guardserve.steering.upkeep import AUTOSELECT_ENV, SelectionUpkeep, autoselect_enabled

            if autoselect_enabled():
                # Its own store connection and thread: it never waits on, or holds up, the request path.
                self.upkeep = SelectionUpkeep(model=model).start()
            else:
                log.info("steering: %s=0, feature selections are not kept current (run `guardserve sae select`)",
                         AUTOSELECT_ENV)
        self._sync_task = asyncio.get_running_loop().create_task(self._keep_synced(state))

    @staticmethod
    def _embed_pending(detector, budget_s: float = 2.0) -> None:
        """One pass of embedding newly registered targets (meanwhile they are matched by name)."""
        try:
            detector.embed_pending(budget_s)
        except Exception:
            log.exception("guardserve: embedding new targets failed; they stay matched by name and will be retried")

    async def _load_adapters(self, state) -> None:
        """Load the registry's active unlearning adapters when vLLM serves LoRA; the
        request path routes covered targets to them (guardserve/server/adapters.py)."""
        from guardserve.server.adapters import AdapterManager

        manager = AdapterManager.of(state)
        if manager.lora_enabled:
            changed = await manager.sync()
            for name, why in changed["failed"].items():
                log.error("unlearning adapter %s not loaded: %s", name, why)

    async def _keep_synced(self, state, interval: float = 0.25, adapter_every: int = 8) -> None:
        """Pull policy changes made elsewhere (CLI, other replicas): woken at once by the
        store's notification (Postgres), else every ``interval`` s, so a change made on any
        replica is in force here well within a second. Each successful pass confirms the
        policy current (``Detector.policy_age_s``); while the store is away the age grows
        until requests are refused (``GUARDSERVE_MAX_POLICY_AGE_S``), and the first pass
        that reaches it again restores service. Every couple of seconds also load adapters
        registered with the CLI."""
        from guardserve.server.adapters import AdapterManager

        manager = AdapterManager.of(state)
        detector = self.service.detector
        tick, failing = 0, False
        embedding: asyncio.Task | None = None
        while True:
            try:
                # Store reads only: embedding new targets' texts runs beside this loop
                # (_embed_pending), so a slow embedding never ages the policy into refusals.
                changed = await asyncio.to_thread(detector.sync, True, 0.0)
                if detector.pending and (embedding is None or embedding.done()):
                    embedding = asyncio.get_running_loop().create_task(asyncio.to_thread(self._embed_pending, detector))
                if changed and self.service.filter_parts is not None:
                    self.service.filter_parts.poke()  # changes made elsewhere (CLI, replicas): their parts
                if failing:
                    log.warning("guardserve: the policy store answers again; enforcing policy version %d",
                                detector.policy_seq)
                failing = False
            except Exception as e:  # the policy's age grows: past the bound requests are refused
                if not failing:
                    log.error("guardserve: policy sync failed (%s: %s); refusing guarded requests once the policy "
                              "is %g s old", type(e).__name__, e, detector.config.max_policy_age_s or float("inf"))
                failing = True
            if self.upkeep is not None:
                self.upkeep.poke()  # returns at once: selections are recomputed in the upkeep's thread
            tick += 1
            if manager.lora_enabled and tick % adapter_every == 0:
                try:
                    changed = await manager.sync()
                    for name, why in changed["failed"].items():
                        log.error("unlearning adapter %s not loaded: %s", name, why)
                except Exception:
                    log.exception("guardserve: adapter sync failed")
            await asyncio.to_thread(self.service.store.wait_for_change, interval)
