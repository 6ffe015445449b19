"""Kernels that apply the guard to a batch of logits.

* :func:`guard_apply` — per batch row, the ban bitmask of that row's automaton state
  (plus its short sparse list) to ``-inf`` and its semantic penalty, in one pass.
* :func:`max_cosine` — top-k candidates against the forbidden embeddings.

Each has a Triton kernel (:mod:`.triton_guard`) and a torch reference
(:mod:`.reference`). Dispatch: CUDA tensors run Triton; CPU tensors run the torch
reference, except under ``TRITON_INTERPRET=1`` where Triton's interpreter runs the
kernel on CPU tensors (slowly: for tests). Triton is imported only then, so CPU
serving never imports it.
"""

from __future__ import annotations

import os

import torch

from .reference import guard_apply_reference, max_cosine_reference, unpack_masks

__all__ = [
    "guard_apply",
    "guard_apply_reference",
    "max_cosine",
    "max_cosine_reference",
    "unpack_masks",
    "use_triton",
]


def use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def guard_apply(logits, rows, mask_idx, masks, pen_idx, penalties, sparse_offsets,
                sparse_tokens, masks_bool=None, masks_sparse=None, masks_bias=None):
    """See :func:`.reference.guard_apply_reference` for the contract."""
    if use_triton(logits):
        from .triton_guard import guard_apply_triton

        return guard_apply_triton(logits, rows, mask_idx, masks, pen_idx, penalties,
                                  sparse_offsets, sparse_tokens)
    return guard_apply_reference(logits, rows, mask_idx, masks, pen_idx, penalties,
                                 sparse_offsets, sparse_tokens, masks_bool, masks_sparse, masks_bias)


def max_cosine(cand: torch.Tensor, forbidden: torch.Tensor) -> torch.Tensor:
    """See :func:`.reference.max_cosine_reference` for the contract."""
    if use_triton(cand):
        from .triton_guard import max_cosine_triton

        return max_cosine_triton(cand, forbidden)
    return max_cosine_reference(cand, forbidden)
