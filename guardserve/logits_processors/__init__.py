"""Token and semantic logit filtering: keep forbidden phrases out of generated text.

* :func:`compile_phrases` — phrases -> :class:`CompiledFilter` (an automaton over
  token ids with a ban set per state), for any tokenizer.
* :class:`GuardBatch` — the engine-agnostic per-request state and the one kernel
  call per step.
* Adapters: :mod:`.vllm` (``GuardLogitsProcessor``, V1 runner and, through it, Model
  Runner V2 in :mod:`.vllm_v2`) and :mod:`.transformers`
  (``GuardTransformersLogitsProcessor``). They import vLLM / transformers, so they are
  not imported here.
* :mod:`.semantic` — per-target semantic penalty over the vocabulary (MiniLM).
"""

from .compile import (
    CompiledFilter,
    FilterCache,
    compile_phrases,
    compile_token_sequences,
    first_distinctive,
    token_variants,
)
from .core import GuardBatch, RequestGuard
from .request import register_target_resolver

__all__ = [
    "CompiledFilter",
    "FilterCache",
    "GuardBatch",
    "RequestGuard",
    "compile_phrases",
    "compile_token_sequences",
    "first_distinctive",
    "register_target_resolver",
    "token_variants",
]
