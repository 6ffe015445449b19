"""The admin API under ``/v1/unlearning/`` (the admin key is checked by the middleware).

Every change is written to the policy store (audited there) and applied to this
process's detector at once; other server processes pick it up from the store's change
feed (woken by its notification on Postgres) well within a second. ``GET status`` says
which policy version this replica enforces and how fresh it is.
"""

from __future__ import annotations

import json
import logging

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from guardserve.policy import (
    DuplicateTargetError,
    PolicyError,
    StoreUnavailableError,
    TargetNotFoundError,
    ValidationError,
    VersionConflictError,
)
from guardserve.server.middleware import RETRY_AFTER_S

router = APIRouter(prefix="/v1/unlearning", tags=["guardserve admin"])
ACTOR = "admin-api"
log = logging.getLogger("guardserve.server")


def _error(status: int, message: str) -> JSONResponse:
    kind = {400: "invalid_request_error", 404: "not_found_error", 409: "conflict_error"}.get(status, "error")
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)


def _policy_error(e: Exception) -> JSONResponse:
    if isinstance(e, StoreUnavailableError):  # nothing was changed; the caller retries
        return _error(503, str(e))
    if isinstance(e, TargetNotFoundError):
        return _error(404, str(e))
    if isinstance(e, (DuplicateTargetError, VersionConflictError)):
        return _error(409, str(e))
    if isinstance(e, (ValidationError, PolicyError, ValueError)):
        return _error(400, str(e))
    raise e


async def _json(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the request body is not valid JSON: {e}") from e


def _service(request: Request):
    service = request.app.state.guardserve.service
    if service is None:
        raise RuntimeError("guardserve is still starting")
    return service


async def _run(fn, *args):
    return await anyio.to_thread.run_sync(fn, *args)


# How long an admin call builds the filter parts of the targets it changed before it returns;
# the rest (a bulk import) are built by the worker thread, or by a request that needs one.
PARTS_BUDGET_S = 10.0


def _changed(service, targets=(), deleted: str | None = None) -> None:
    # Names and aliases apply before the call returns; embeddings follow in the
    # server's sync loop, so a bulk import does not hold the admin call for minutes.
    try:
        service.detector.sync(force=True, embed_budget_s=0.0)
    except StoreUnavailableError:  # the change is committed: the sync loop applies it when the store answers
        log.warning("guardserve: a committed change is not applied yet: the policy store stopped answering")
        return
    parts = getattr(service, "filter_parts", None)
    if parts is None:
        return
    if deleted is not None:
        parts.forget(deleted)
    # Each changed target's filter part is compiled now (that target alone), so the first
    # request about it finds it built: nothing is compiled on the request path or in the engine.
    try:
        parts.ensure(targets, where="registration", budget_s=PARTS_BUDGET_S)
    except Exception:  # a request naming the target compiles it again, or is refused
        log.exception("guardserve: building a filter part failed")
    # Always-on targets guard every request of their tenant as set parts: the sets a change
    # touched (one or two) are compiled now, the others are reused as they are.
    try:
        parts.ensure_sets(service.detector.always_groups(), where="registration", budget_s=PARTS_BUDGET_S)
    except Exception:  # requests carry the targets of a set not built one by one
        log.exception("guardserve: building a set part failed")


@router.post("/targets")
async def add_targets(request: Request):
    """One target (an object) or many (a list, registered atomically)."""
    service = _service(request)
    try:
        payload = await _json(request)
        if isinstance(payload, list):
            if not payload:
                return _error(400, "an empty list registers nothing")
            targets = await _run(lambda: service.store.add_many(payload, actor=ACTOR))
            await _run(_changed, service, targets)
            return JSONResponse({"count": len(targets), "targets": [{"id": t.id, "version": t.version, "name": t.name} for t in targets]},
                                status_code=201)
        if not isinstance(payload, dict):
            return _error(400, "send a target object or a list of them")
        target = await _run(lambda: service.store.add(payload, actor=ACTOR))
        await _run(_changed, service, [target])
        return JSONResponse(target.to_dict(), status_code=201)
    except (PolicyError, ValueError) as e:
        return _policy_error(e)


@router.get("/targets")
async def list_targets(request: Request, tenant: str | None = None):
    service = _service(request)
    try:
        targets = await _run(lambda: service.store.list(tenant))
    except (PolicyError, ValueError) as e:
        return _policy_error(e)
    return {"targets": [t.to_dict() for t in targets], "count": len(targets)}


@router.get("/targets/{target_id}")
async def get_target(request: Request, target_id: str):
    service = _service(request)
    try:
        return (await _run(service.store.get, target_id)).to_dict()
    except (PolicyError, ValueError) as e:
        return _policy_error(e)


@router.patch("/targets/{target_id}")
async def update_target(request: Request, target_id: str):
    service = _service(request)
    try:
        changes = await _json(request)
        if not isinstance(changes, dict):
            return _error(400, "send an object with the fields to change")
        expected = changes.pop("expected_version", None)
        target = await _run(lambda: service.store.update(target_id, changes, actor=ACTOR, expected_version=expected))
        await _run(_changed, service, [target])
        return target.to_dict()
    except (PolicyError, ValueError) as e:
        return _policy_error(e)


@router.delete("/targets/{target_id}")
async def delete_target(request: Request, target_id: str):
    service = _service(request)
    try:
        await _run(lambda: service.store.delete(target_id, actor=ACTOR))
        await _run(_changed, service, (), target_id)
    except (PolicyError, ValueError) as e:
        return _policy_error(e)
    return Response(status_code=204)


@router.get("/status")
async def status(request: Request):
    """The policy this replica enforces: its version (the store's change sequence number it
    has applied), how long ago the store last confirmed it current, the bound past which
    guarded requests are refused, the targets indexed and those still being embedded."""
    service = _service(request)
    detector = service.detector
    limit = detector.config.max_policy_age_s
    return {"policy_version": detector.policy_seq, "policy_age_s": round(detector.policy_age_s, 3),
            "max_policy_age_s": limit, "stale": detector.stale() is not None,
            "targets": len(detector.targets()), "pending_embeddings": detector.pending,
            "store": type(service.store).__name__}


@router.get("/filters")
async def filter_parts(request: Request):
    """The filter parts' state: compiles by where they ran (``registration``: the admin call;
    ``background``: the worker thread; ``request``: a request that found its part missing),
    targets still waiting for theirs, and how many parts engine processes compiled themselves."""
    parts = getattr(_service(request), "filter_parts", None)
    if parts is None:
        return {"enabled": False}
    return {"enabled": True, **(await _run(parts.report))}


@router.post("/classify")
async def classify(request: Request):
    """A dry run of detection: which targets would trigger, with scores and reasons."""
    service = _service(request)
    try:
        payload = await _json(request)
    except ValueError as e:
        return _error(400, str(e))
    if not isinstance(payload, dict) or not (("messages" in payload) ^ ("prompt" in payload)):
        return _error(400, "send {'messages': [...]} or {'prompt': '...'}, optionally with 'tenant'")
    conversation = payload.get("messages", payload.get("prompt"))
    tenant = payload.get("tenant")
    try:
        triggered = await _run(lambda: service.detector.detect(conversation, tenant=tenant))
    except Exception as e:
        return _error(400, f"could not classify: {e}")
    return {"triggered": [{"target_id": t.target_id, "name": t.name, "version": t.version, "score": t.score,
                           "reasons": list(t.reasons), "forbidden": list(t.forbidden)} for t in triggered]}
