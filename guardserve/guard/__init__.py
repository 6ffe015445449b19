"""The guard pipeline, free of any engine: detect -> decide -> plan.

>>> from guardserve.guard import GuardService
>>> decision = service.decide(["Where was Ada Quillfeather born?"], tenant="default")
>>> decision.phrases, service.plan_xargs(decision)

The server applies it where each request enters vLLM's engine (``guardserve/server/entry.py``);
``guardserve eval`` and offline use call :meth:`GuardService.prepare` on a request body.
"""

from guardserve.guard.service import (
    CHAT,
    COMPLETIONS,
    RESERVED_PREFIX,
    BadRequest,
    Decision,
    GuardError,
    GuardService,
    context_length,
    steered_salt,
    tenant_salt,
)

__all__ = ["CHAT", "COMPLETIONS", "RESERVED_PREFIX", "BadRequest", "Decision", "GuardError", "GuardService",
           "context_length", "steered_salt", "tenant_salt"]
