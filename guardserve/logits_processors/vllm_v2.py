"""vLLM Model Runner V2 adapter (default on GPU from vLLM 0.33).

V2 differs from V1 in three ways that matter here: per-request state is keyed by a
persistent *slot* (recycled through a free list), ``apply(logits, ctx)`` gets the
step's row -> slot mapping, and the token history lives on the device
(``req_states.all_token_ids``), not in a host list. So each step gathers, in one
device->host copy, the tokens each guarded slot has committed since its last step
(one per slot in steady state; the prompt's tail on a slot's first step), advances
the automata on the host, and applies the ban masks with the same kernel as V1.

Normally built through :class:`.vllm.GuardLogitsProcessor` (one name for both
runners); this module imports on a vLLM without Model Runner V2 but the class then
cannot be instantiated.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .core import GuardBatch
from .engine import FilterSource
from .request import parse_request

logger = logging.getLogger("guardserve.logits")

try:
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as _V2Base

    HAVE_V2 = True
except ImportError:  # vLLM without Model Runner V2: keep the module importable
    _V2Base = object  # type: ignore[misc,assignment]  # fallback base where vLLM has no Model Runner V2
    HAVE_V2 = False


class GuardLogitsProcessorV2(_V2Base):
    """Model Runner V2 twin of :class:`.vllm.GuardLogitsProcessor` (same
    ``vllm_xargs``, same bans)."""

    def __init__(self, vllm_config, req_states):
        if not HAVE_V2:
            raise RuntimeError("this vLLM has no Model Runner V2 logits-processor interface")
        if getattr(vllm_config, "speculative_config", None):
            # Rows would be draft positions whose tokens are not committed: the
            # automaton state per row is undefined. Refuse rather than guard wrongly.
            raise ValueError("guardserve's logits processor does not support speculative decoding")
        self.source = FilterSource(vllm_config)
        self.req_states = req_states
        self.batch = GuardBatch(req_states.device)
        # slot -> committed tokens already fed to its automaton (None: not started).
        self._fed: dict[int, int | None] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        parse_request(sampling_params.extra_args, resolve=False)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        try:
            req = parse_request(sampling_params.extra_args)
            filt = None if req is None else self.source.filter_for(req)
        except ValueError:
            logger.exception("guardserve: bad guard arguments reached the worker; refusing")
            filt = self.source.refusal()
        if filt is None:
            self.batch.remove(req_idx)
            self._fed.pop(req_idx, None)
            return False
        # The slot's tokens may not be on the device yet (staged writes): start the
        # automaton at the first apply() instead.
        self.batch.add(req_idx, filt, None, [])
        self._fed[req_idx] = None
        return True

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        if not self.batch.rows:
            return logits
        slots = ctx.idx_mapping_np
        seq_lens = ctx.seq_lens_upper_bound_np
        rows: dict[int, int] = {}
        want_slot, spans = [], []
        want_pos: list[int] = []
        for b, slot in enumerate(slots.tolist()):
            g = self.batch.rows.get(slot)
            if g is None:
                continue
            rows[slot] = b
            end = int(seq_lens[b])  # tokens before the one sampled now
            start = self._fed[slot]
            if start is None:  # first step: only the prompt's tail decides the state
                start = max(0, end - g.filt.max_depth)
            if end > start:
                want_slot.extend([slot] * (end - start))
                want_pos.extend(range(start, end))
            spans.append((slot, end - start if end > start else 0))
            self._fed[slot] = max(start, end)
        if not rows:
            return logits
        if want_slot:
            dev = self.req_states.all_token_ids.gpu.device
            s = torch.as_tensor(np.asarray(want_slot, dtype=np.int64), device=dev)
            p = torch.as_tensor(np.asarray(want_pos, dtype=np.int64), device=dev)
            toks = self.req_states.all_token_ids.gpu[s, p].tolist()  # one sync per step
            i = 0
            for slot, n in spans:
                if n:
                    self.batch.rows[slot].feed(toks[i:i + n])
                    i += n
        return self.batch.apply(logits, rows)


__all__ = ["GuardLogitsProcessorV2", "HAVE_V2"]
