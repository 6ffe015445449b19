"""Toys for scoring tests without a model: a tokenizer with one token per character and a
"model" whose logits favour the next character, so every loss has a closed form."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from guardserve.eval.runner import Scorer
from guardserve.logits_processors.compile import compile_token_sequences
from guardserve.textgen import SCORE_MAX_LEN

EOS = "<|end|>"


class CharTokenizer:
    """One token per character (its code point, < 256); a trivial chat template."""

    pad_token_id = 0
    bos_token, eos_token = None, EOS

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "Q:" + messages[-1]["content"] + "\nA:"


class SuccessorLM:
    """Logit ``HIT`` on the successor of the current token, 0 elsewhere (vocab 256)."""

    V, HIT = 256, 5.0
    config = SimpleNamespace(vocab_size=256)

    def __call__(self, input_ids, attention_mask=None, **kw):
        logits = torch.zeros(*input_ids.shape, self.V)
        logits.scatter_(2, ((input_ids + 1) % self.V).unsqueeze(-1), self.HIT)
        return SimpleNamespace(logits=logits)

    @classmethod
    def token_loss(cls, prev: str, nxt: str) -> float:
        z = math.exp(cls.HIT) + cls.V - 1
        return -(cls.HIT - math.log(z)) if ord(nxt) == ord(prev) + 1 else math.log(z)


class ToyScorer(Scorer):
    """The evaluation's Scorer on the toys: phrases compile to character sequences; every
    adapter is the base model."""

    def __init__(self, max_len: int = SCORE_MAX_LEN):
        self.tokenizer, self.base, self.adapters, self.clamp = CharTokenizer(), SuccessorLM(), {}, 0.0
        self._merged, self.sae, self.selections, self.max_len = {}, None, None, max_len
        self.device, self.dtype = "cpu", "float32"

    def model(self, adapter):
        return self.base

    def _token_filter(self, served):
        if not served.phrases:
            return None
        return compile_token_sequences([[ord(c) for c in p] for p in served.phrases], SuccessorLM.V)
