"""A ``transformers.LogitsProcessor`` with the same bans as the vLLM adapters."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from .compile import CompiledFilter, compile_phrases
from .core import GuardBatch


class GuardTransformersLogitsProcessor(LogitsProcessor):
    r"""
    [`LogitsProcessor`] that keeps forbidden phrases out of generated text, in every
    tokenisation and from the end of the prompt on (a phrase begun in the prompt is not
    completed). The filter reads the text the tokens spell; a token is banned where it
    would complete a phrase's first distinctive word or a later one (see
    `guardserve.logits_processors.compile`); the cost per step does not grow with the
    number of phrases.

    Args:
        filt (`CompiledFilter`):
            From `compile_phrases(tokenizer, phrases)`, optionally with a semantic
            penalty (`guardserve.logits_processors.semantic.with_semantic_penalty`).

    The automaton state of a row depends only on its last `filt.max_depth` tokens, so
    each call recomputes it from `input_ids` (a few transitions per row): no state is
    carried between calls, and beam search may reorder rows freely.

    Examples:

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList
    >>> tok = AutoTokenizer.from_pretrained(path); model = AutoModelForCausalLM.from_pretrained(path)
    >>> proc = GuardTransformersLogitsProcessor.from_phrases(tok, ["New Amsterdam"])
    >>> out = model.generate(**tok("The old name of New York is", return_tensors="pt"),
    ...                      logits_processor=LogitsProcessorList([proc]), do_sample=False)
    ```
    """

    def __init__(self, filt: CompiledFilter):
        self.filt = filt
        self._batch: GuardBatch | None = None

    @classmethod
    def from_phrases(cls, tokenizer, phrases, vocab_size: int | None = None) -> GuardTransformersLogitsProcessor:
        return cls(compile_phrases(tokenizer, phrases, vocab_size=vocab_size))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        if self._batch is None or self._batch.device != scores.device:
            self._batch = GuardBatch(scores.device)  # keeps its device tables across calls
        B, L = input_ids.shape
        d = self.filt.max_depth
        tails = input_ids[:, max(0, L - d):].tolist() if d else [[] for _ in range(B)]
        self._batch.rows.clear()
        for r in range(B):
            self._batch.add(r, self.filt, tails[r], [])
        # transformers expects a new tensor back (it may reuse scores).
        return self._batch.apply(scores.clone())
