"""A ``transformers.LogitsProcessor`` with the same bans as the vLLM adapters."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from .compile import CompiledFilter, compile_phrases
from .core import GuardBatch


class GuardTransformersLogitsProcessor(LogitsProcessor):
    r"""
    [`LogitsProcessor`] that keeps forbidden phrases out of generated text, in every
    tokenisation variant and from the end of the prompt on (a phrase begun in the
    prompt is not completed). Phrases are banned at their first distinctive token
    (see `guardserve.logits_processors.compile`); the cost per step does not grow with
    the number of phrases.

    Args:
        filt (`CompiledFilter`):
            From `compile_phrases(tokenizer, phrases)`, optionally with a semantic
            penalty (`guardserve.logits_processors.semantic.with_semantic_penalty`).
        prompt_length (`int`, *optional*):
            Length of the (left-padded) prompt in `input_ids`. Defaults to the length
            at the first call. Pad tokens are read as text like any other token; they
            do not begin forbidden phrases.

    Examples:

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList
    >>> tok = AutoTokenizer.from_pretrained(path); model = AutoModelForCausalLM.from_pretrained(path)
    >>> proc = GuardTransformersLogitsProcessor.from_phrases(tok, ["New Amsterdam"])
    >>> out = model.generate(**tok("The old name of New York is", return_tensors="pt"),
    ...                      logits_processor=LogitsProcessorList([proc]), do_sample=False)
    ```
    """

    def __init__(self, filt: CompiledFilter, prompt_length: int | None = None):
        self.filt = filt
        self.prompt_length = prompt_length
        self._batch: GuardBatch | None = None
        self._outputs: list[list[int]] = []

    @classmethod
    def from_phrases(cls, tokenizer, phrases, **kwargs) -> GuardTransformersLogitsProcessor:
        return cls(compile_phrases(tokenizer, phrases, vocab_size=kwargs.pop("vocab_size", None)), **kwargs)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        B, L = input_ids.shape
        if self._batch is None or len(self._outputs) != B:
            # First call of a generate(): every row starts from the end of its prompt.
            P = L if self.prompt_length is None else self.prompt_length
            self._batch = GuardBatch(scores.device)
            self._outputs = [[] for _ in range(B)]
            ids = input_ids[:, :P].tolist()
            for r in range(B):
                self._batch.add(r, self.filt, ids[r], self._outputs[r])
            self._start = P
        # Tokens generated since the last call (the live lists the core reads).
        new = input_ids[:, self._start + len(self._outputs[0]):].tolist()
        for r in range(B):
            self._outputs[r].extend(new[r])
        # transformers expects a fresh tensor back (it may reuse scores).
        return self._batch.apply(scores.clone())
