"""guardserve as a vLLM endpoint plugin (entry point group ``vllm.endpoint_plugins``).

``VLLM_PLUGINS=guardserve python -m vllm.entrypoints.launchers.api_server.entry --model M``
and ``guardserve serve --model M`` start the same guarded server: this plugin adds the
admin API and puts :class:`GuardMiddleware` in front of vLLM's routes; the logits
processor (entry point group ``vllm.logits_processors``) does the banning in the engine.
"""

from __future__ import annotations

import asyncio
import logging

from guardserve.server.auth import Auth

log = logging.getLogger("guardserve.server")


class GuardEndpointPlugin:
    name = "guardserve"
    required_tasks = ("generate",)

    def __init__(self):
        self.auth = Auth.from_env()  # fails here, before the server starts, on a bad key list
        self.service = None
        self._sync_task = None

    def attach_router(self, app) -> None:
        from guardserve.server.admin import router
        from guardserve.server.middleware import GuardMiddleware

        app.include_router(router)
        app.add_middleware(GuardMiddleware, plugin=self)
        app.state.guardserve = self

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:
            raise RuntimeError("guardserve needs an engine: it cannot run on vLLM's render-only server")
        from guardserve.server.guard import GuardService

        model = getattr(args, "model", None)
        tokenizer = getattr(args, "tokenizer", None)
        trust = bool(getattr(args, "trust_remote_code", False))
        # Loading the embedder and indexing the policy take seconds: off the event loop.
        self.service = await asyncio.to_thread(GuardService.from_env, model, tokenizer, trust)
        state.guardserve = self
        n = len(self.service.detector.targets())
        log.info("guardserve: guarding %s with %d registered target(s); policy store %s", model, n, self.service.store)
        self._sync_task = asyncio.get_running_loop().create_task(self._keep_synced())

    async def _keep_synced(self, interval: float = 0.25) -> None:
        """Pull policy changes made elsewhere (CLI, other replicas) so requests that
        start a second later see them, without waiting on the index in the request."""
        while True:
            try:
                await asyncio.to_thread(self.service.detector.sync, True)
            except Exception:  # the next detect() refuses requests if the store stays broken
                log.exception("guardserve: policy sync failed")
            await asyncio.sleep(interval)
