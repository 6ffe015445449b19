"""Unlearning adapters in the running server: admin routes and request routing.

Routes (under the admin prefix, so the admin key guards them):

- ``GET /v1/unlearning/adapters`` — the registry's records, each with ``loaded``.
- ``POST /v1/unlearning/adapters`` ``{"path", "name"?, "targets"?, "route"?}`` — validate
  the folder (files, base-model shapes, rank against ``--max-lora-rank``), register it
  (copied to a new versioned path, or pinned when ``path`` is an ``hf://`` URI, with its
  checksum) and load it into vLLM; 201 with the record. Every replica loads a record by
  its URI and checks the checksum first (``guardserve/artifacts.py``). Any
  failure: 400/404 with the reason, nothing half-loaded, the server keeps serving.
- ``POST /v1/unlearning/adapters/sync`` — load every active adapter of the registry that
  is not loaded (registered by the CLI or another replica), unload retired ones.
- ``DELETE /v1/unlearning/adapters/{name}`` — retire it and unload it.

Loading goes through vLLM's own ``OpenAIServingModels.load_lora_adapter`` (what
``/v1/load_lora_adapter`` calls), so the adapter's ``lora_name`` becomes a model name that
requests can use. Every version has its own name and path (``<name>-v<version>``), so no
prefix-cache block computed with older weights is reused. Unloading removes the name;
the engine's LoRA slot is freed by vLLM's LRU when needed, never under a running request.

``AdapterManager.pick(triggered_targets)`` is what the engine entry
(``guardserve/server/entry.py``) calls: the covering adapter's ``lora_name``, whose
``LoRARequest`` it attaches to the request (the response still names the model the client
asked for).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from guardserve.artifacts import ArtifactError, fetch, fetch_verified
from guardserve.unlearn.registry import AdapterError, AdapterRegistry, choose_adapter, validate_adapter

log = logging.getLogger("guardserve.server")
router = APIRouter(prefix="/v1/unlearning", tags=["guardserve adapters"])
ACTOR = "admin-api"


class AdapterManager:
    """The adapters this server has loaded, kept in step with the registry."""

    def __init__(self, registry: AdapterRegistry, serving_models, engine_client):
        self.registry = registry
        self.serving_models = serving_models
        self.engine_client = engine_client
        self.loaded: dict[str, dict] = {}  # lora_name -> record
        self._lock = asyncio.Lock()
        vcfg = getattr(engine_client, "vllm_config", None)
        lora_cfg = getattr(vcfg, "lora_config", None)
        self.lora_enabled = lora_cfg is not None
        self.max_rank = getattr(lora_cfg, "max_lora_rank", None)
        self.base_model = getattr(getattr(engine_client, "model_config", None), "model", None)

    @classmethod
    def of(cls, app_state) -> "AdapterManager":
        """The server's manager, created on first use."""
        manager = getattr(app_state, "guardserve_adapters", None)
        if manager is None:
            plugin = app_state.guardserve
            if plugin.service is None:
                raise RuntimeError("guardserve is still starting")
            manager = cls(AdapterRegistry(plugin.service.store), app_state.openai_serving_models,
                          app_state.openai_serving_models.engine_client)
            app_state.guardserve_adapters = manager
            plugin.service.adapters = manager  # the request path routes through it
        return manager

    def _check_enabled(self) -> None:
        if not self.lora_enabled:
            raise AdapterError("this server was started without LoRA support: start it with "
                               "'guardserve serve -- --enable-lora --max-lora-rank 16' and VLLM_ALLOW_RUNTIME_LORA_UPDATING=1")

    async def load(self, record: dict) -> None:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        self._check_enabled()
        folder = await anyio.to_thread.run_sync(self.local_copy, record)
        await anyio.to_thread.run_sync(validate_adapter, folder, self.base_model, self.max_rank)
        result = await self.serving_models.load_lora_adapter(
            LoadLoRAAdapterRequest(lora_name=record["lora_name"], lora_path=str(folder)))
        if isinstance(result, ErrorResponse):
            raise AdapterError(f"vLLM refused adapter {record['lora_name']}: {result.error.message}")
        self.loaded[record["lora_name"]] = record
        log.info("unlearning adapter %s loaded from %s (covers %d target(s), route %s)",
                 record["lora_name"], record["path"], len(record.get("targets", [])), record.get("route"))

    @staticmethod
    def local_copy(record: dict) -> Path:
        """The record's folder on this host, fetched by its URI and checked against its checksum
        (records from before checksums are loaded from their path, with a warning)."""
        if not record.get("sha256"):
            log.warning("unlearning adapter %s has no checksum in the registry (registered by an older guardserve); "
                        "register it again to pin it", record["lora_name"])
        try:
            return fetch_verified(record.get("uri") or record["path"], record.get("sha256"))
        except ArtifactError as e:
            raise AdapterError(str(e)) from None

    async def unload(self, lora_name: str) -> None:
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        if self.loaded.pop(lora_name, None) is not None:
            await self.serving_models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=lora_name))
            log.info("unlearning adapter %s unloaded", lora_name)

    async def sync(self) -> dict:
        """Load active registry adapters not loaded yet; unload retired or replaced ones.
        Returns what changed and what failed (one failure does not stop the others)."""
        async with self._lock:
            records = await anyio.to_thread.run_sync(lambda: self.registry.list(include_retired=False))
            wanted = {r["lora_name"]: r for r in records}
            changed = {"loaded": [], "unloaded": [], "failed": {}}
            for name, rec in wanted.items():
                if name not in self.loaded:
                    try:
                        await self.load(rec)
                        changed["loaded"].append(name)
                    except Exception as e:  # a bad adapter is reported, the others still load
                        changed["failed"][name] = str(e)
            for name in [n for n in self.loaded if n not in wanted]:
                await self.unload(name)
                changed["unloaded"].append(name)
            return changed

    def pick(self, triggered_targets: list) -> str | None:
        """The adapter (``lora_name``) a request that triggered these ForgetTargets is
        served with; None keeps the base model."""
        if not self.loaded:
            return None
        return choose_adapter(list(self.loaded.values()), triggered_targets)


def _error(status: int, message: str) -> JSONResponse:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _resolve_targets(store, names) -> list[str]:
    """Target ids and names for a list of ids or names; unknown ones are an error."""
    from guardserve.policy import TargetNotFoundError

    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise AdapterError("'targets' must be a list of target ids or names")
    out = []
    for n in names:
        try:
            t = store.find(n)
        except TargetNotFoundError:
            raise AdapterError(f"unknown target {n!r}: register it first (POST /v1/unlearning/targets)") from None
        out += [t.id, t.name]
    return out


@router.get("/adapters")
async def list_adapters(request: Request):
    try:
        manager = AdapterManager.of(request.app.state)
    except RuntimeError as e:
        return _error(503, str(e))
    records = await anyio.to_thread.run_sync(lambda: manager.registry.list(include_retired=True))
    return {"adapters": [{**r, "loaded": r["lora_name"] in manager.loaded} for r in records],
            "lora_enabled": manager.lora_enabled, "max_lora_rank": manager.max_rank}


@router.post("/adapters")
async def add_adapter(request: Request):
    try:
        manager = AdapterManager.of(request.app.state)
        manager._check_enabled()
        try:
            payload = await request.json()
        except ValueError as e:
            raise AdapterError(f"the request body is not valid JSON: {e}") from e
        if not isinstance(payload, dict) or not isinstance(payload.get("path"), str):
            raise AdapterError("send {\"path\": adapter folder, \"name\"?, \"targets\"?, \"route\"?}")
        # Checked against this server before anything is recorded: a bad adapter leaves no trace.
        try:
            folder = await anyio.to_thread.run_sync(fetch, payload["path"])
        except ArtifactError as e:
            raise AdapterError(str(e)) from None
        await anyio.to_thread.run_sync(validate_adapter, folder, manager.base_model, manager.max_rank)
        store = manager.registry.store
        targets = await anyio.to_thread.run_sync(_resolve_targets, store, payload.get("targets"))
        async with manager._lock:
            record = await anyio.to_thread.run_sync(lambda: manager.registry.register(
                payload["path"], name=payload.get("name"), targets=targets, route=payload.get("route", "triggered"),
                base_model=manager.base_model, actor=ACTOR))
            try:
                await manager.load(record)
            except Exception:
                await anyio.to_thread.run_sync(lambda: manager.registry.retire(record["name"], actor=ACTOR))
                raise
            # The new version replaces older versions of the same name.
            for old in [n for n, r in manager.loaded.items() if r["name"] == record["name"] and n != record["lora_name"]]:
                await manager.unload(old)
        return JSONResponse({**record, "loaded": True}, status_code=201)
    except AdapterError as e:
        return _error(400, str(e))
    except RuntimeError as e:
        return _error(503, str(e))


@router.post("/adapters/sync")
async def sync_adapters(request: Request):
    try:
        manager = AdapterManager.of(request.app.state)
        manager._check_enabled()
    except AdapterError as e:
        return _error(400, str(e))
    except RuntimeError as e:
        return _error(503, str(e))
    return await manager.sync()


@router.delete("/adapters/{name}")
async def delete_adapter(name: str, request: Request):
    try:
        manager = AdapterManager.of(request.app.state)
        async with manager._lock:
            record = await anyio.to_thread.run_sync(lambda: manager.registry.retire(name, actor=ACTOR))
            for lora_name in [n for n, r in manager.loaded.items() if r["name"] == name]:
                await manager.unload(lora_name)
        return {**record, "loaded": False}
    except AdapterError as e:
        return _error(404, str(e))
    except RuntimeError as e:
        return _error(503, str(e))
