"""The guard pipeline, free of any engine: detect -> decide -> plan.

>>> from guardserve.guard import GuardService
>>> decision = service.decide(["Where was Ada Quillfeather born?"], tenant="default")
>>> decision.phrases, service.plan_xargs(decision)

What the guard does is a :class:`GuardConfig` of the :data:`CONFIGS` registry
(``guardserve/guard/configs.py``), the same object for the server and the evaluation.
The server applies it where each request enters vLLM's engine (``guardserve/server/entry.py``);
``guardserve eval`` and offline use call :meth:`GuardService.prepare` on a request body.
"""

from guardserve.guard.configs import CONFIGS, GuardConfig, get_config, server_config
from guardserve.guard.service import (
    CHAT,
    COMPLETIONS,
    BadRequest,
    Decision,
    GuardError,
    GuardService,
    context_length,
)

__all__ = ["CHAT", "COMPLETIONS", "CONFIGS", "BadRequest", "Decision", "GuardConfig", "GuardError", "GuardService",
           "context_length", "get_config", "server_config"]
