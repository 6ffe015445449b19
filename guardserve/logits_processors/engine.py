"""What both vLLM adapters share: tokenizer, compiled-filter cache, fail-closed filter."""

from __future__ import annotations

import logging
import threading

from .compile import CompiledFilter, FilterCache, as_tokenizer_view, compile_token_sequences
from .request import GuardRequest

logger = logging.getLogger("guardserve.logits")


class FilterSource:
    """Turns a :class:`GuardRequest` into a :class:`CompiledFilter` for one model.

    The tokenizer loads on first use (it is not needed by engines that never see a
    guarded request). Compilation failures fail closed: the request gets a filter that
    bans every token but end-of-sequence, so it ends at once instead of being served
    unguarded, and the error is logged.
    """

    def __init__(self, vllm_config):
        self.vllm_config = vllm_config
        self.model_vocab = int(vllm_config.model_config.get_vocab_size())
        self._tok = None
        self._lock = threading.Lock()
        self.cache = FilterCache()
        self._refuse: CompiledFilter | None = None

    @property
    def tokenizer(self):
        with self._lock:
            if self._tok is None:
                from vllm.tokenizers.registry import cached_tokenizer_from_config

                self._tok = as_tokenizer_view(cached_tokenizer_from_config(self.vllm_config.model_config))
            return self._tok

    def filter_for(self, req: GuardRequest) -> CompiledFilter:
        try:
            f = self.cache.get(self.tokenizer, req.phrases, vocab_size=self.model_vocab)
            if req.semantic:
                from .semantic import with_semantic_penalty

                f = with_semantic_penalty(f, self.tokenizer, req.phrases,
                                          threshold=req.sem_threshold, weight=req.sem_weight)
            return f
        except Exception:
            logger.exception("guardserve: compiling the guard failed; refusing the request "
                             "(only end-of-sequence allowed) rather than serving it unguarded")
            return self.refusal()

    def refusal(self) -> CompiledFilter:
        if self._refuse is None:
            V = self.model_vocab
            eos = set()
            try:
                tok = self.tokenizer.raw
                for name in ("eos_token_id", "eos_id"):
                    v = getattr(tok, name, None)
                    if isinstance(v, int):
                        eos.add(v)
                    elif isinstance(v, (list, tuple)):
                        eos.update(int(x) for x in v)
            except Exception:
                logger.exception("guardserve: no tokenizer for the refusal filter")
            f = compile_token_sequences([(t,) for t in range(V) if t not in eos], V)
            f.meta = {"refusal": True}
            self._refuse = f
        return self._refuse

