"""Triton kernels for the guard: ban masks + semantic penalty, and candidate scoring.

Imported only when a kernel runs on CUDA, or on CPU tensors under
``TRITON_INTERPRET=1`` (how tests hold them equal to :mod:`.reference`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# No tl.sum / tl.max here: those are @triton.jit functions of triton.language, built
# when Triton was first imported; under TRITON_INTERPRET=1 that may have been before
# the variable was set (vLLM imports Triton early) and the interpreter cannot call
# them. The one reduction left (a small tile) uses tl.reduce with this combine
# function, which the interpreter runs element by element: fine for 16x16, not more.
@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _guard_apply_kernel(
    logits_ptr,
    stride_row,
    V,
    rows_ptr,
    mask_idx_ptr,
    masks_ptr,
    W,
    pen_idx_ptr,
    pens_ptr,
    stride_pen,
    VP,
    sp_off_ptr,
    sp_tok_ptr,
    BLOCK_V: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    # One program per (guarded row, block of the vocabulary): a single read and a
    # single write of the logits, whatever the number of forbidden phrases.
    r = tl.program_id(0)
    vb = tl.program_id(1)
    row = tl.load(rows_ptr + r).to(tl.int64)
    offs = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    inb = offs < V
    ptrs = logits_ptr + row * stride_row + offs
    x = tl.load(ptrs, mask=inb, other=0.0).to(tl.float32)

    p = tl.load(pen_idx_ptr + r)
    if p >= 0:
        pen = tl.load(pens_ptr + p.to(tl.int64) * stride_pen + offs, mask=inb & (offs < VP), other=0.0)
        x = x - pen

    banned = offs < 0  # all False, of the right shape
    m = tl.load(mask_idx_ptr + r)
    if m >= 0:
        word_i = offs // 32
        words = tl.load(masks_ptr + m.to(tl.int64) * W + word_i, mask=inb & (word_i < W), other=0)
        banned = ((words >> (offs % 32)) & 1) != 0

    # The per-state extra list is short (a few ids): test the block against each
    # rather than scattering, so no other program races on these logits.
    s0 = tl.load(sp_off_ptr + r)
    s1 = tl.load(sp_off_ptr + r + 1)
    for s in range(s0, s1):
        banned = banned | (offs == tl.load(sp_tok_ptr + s))

    x = tl.where(banned, float("-inf"), x)
    if OUT_BF16:
        # fp32 -> bf16 rounded to nearest even by hand: what torch and the GPU do,
        # and what Triton's interpreter does not (it truncates), so the kernel is
        # bit-identical to the reference on both.
        u = x.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        tl.store(ptrs, (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=inb)
    else:
        tl.store(ptrs, x.to(logits_ptr.dtype.element_ty), mask=inb)


def guard_apply_triton(
    logits: torch.Tensor,
    rows: torch.Tensor,
    mask_idx: torch.Tensor,
    masks: torch.Tensor,
    pen_idx: torch.Tensor,
    penalties: torch.Tensor,
    sparse_offsets: torch.Tensor,
    sparse_tokens: torch.Tensor,
    masks_bool: torch.Tensor | None = None,
    block_v: int = 1024,
) -> torch.Tensor:
    """Triton twin of :func:`guard_apply_reference` (same arguments, in place)."""
    del masks_bool  # the kernel reads packed words directly
    R = int(rows.numel())
    if R == 0:
        return logits
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    V = logits.shape[1]
    if penalties.numel() == 0:
        penalties = torch.zeros((1, 1), dtype=torch.float32, device=logits.device)
    if sparse_tokens.numel() == 0:
        sparse_tokens = torch.full((1,), -1, dtype=torch.int32, device=logits.device)
    grid = (R, triton.cdiv(V, block_v))
    _guard_apply_kernel[grid](
        logits,
        logits.stride(0),
        V,
        rows.to(torch.int32),
        mask_idx.to(torch.int32),
        masks,
        masks.shape[1],
        pen_idx.to(torch.int32),
        penalties,
        penalties.stride(0),
        penalties.shape[1],
        sparse_offsets.to(torch.int32),
        sparse_tokens.to(torch.int32),
        BLOCK_V=block_v,
        OUT_BF16=logits.dtype == torch.bfloat16,
    )
    return logits


@triton.jit
def _max_cosine_kernel(
    cand_ptr, forb_ptr, out_ptr, N, F, D,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Rows of candidates against all forbidden embeddings, max over the latter.
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    c = tl.load(cand_ptr + n[:, None] * D + d[None, :], mask=(n[:, None] < N) & (d[None, :] < D), other=0.0)
    c = c.to(tl.float32)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        e = tl.load(forb_ptr + f[:, None] * D + d[None, :], mask=(f[:, None] < F) & (d[None, :] < D), other=0.0)
        e = e.to(tl.float32)
        # Full fp32 (no TF32 on GPU): scores are compared with a fixed threshold.
        sims = tl.dot(c, tl.trans(e), input_precision="ieee")  # [BLOCK_N, BLOCK_F]
        sims = tl.where(f[None, :] < F, sims, float("-inf"))
        best = tl.maximum(best, tl.reduce(sims, 1, _max))
    tl.store(out_ptr + n, best, mask=n < N)


def max_cosine_triton(cand: torch.Tensor, forbidden: torch.Tensor) -> torch.Tensor:
    """Triton twin of :func:`max_cosine_reference`."""
    N, D = cand.shape
    F = forbidden.shape[0]
    out = torch.empty(N, dtype=torch.float32, device=cand.device)
    if N == 0:
        return out
    if F == 0:
        return out.fill_(float("-inf"))
    cand = cand.contiguous()
    forbidden = forbidden.contiguous()
    block_d = triton.next_power_of_2(D)
    block_n, block_f = 16, 16  # tl.dot's minimum tile
    _max_cosine_kernel[(triton.cdiv(N, block_n),)](
        cand, forbidden, out, N, F, D, BLOCK_N=block_n, BLOCK_F=block_f, BLOCK_D=block_d
    )
    return out
