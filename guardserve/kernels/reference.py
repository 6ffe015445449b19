"""Torch references of the guard kernels: the CPU path, and the oracle in tests.

Both functions define the contract their Triton twins in :mod:`.triton_guard` keep
bit for bit (see that module for the argument layout).
"""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(32, dtype=torch.int32)


def unpack_masks(masks: torch.Tensor, vocab: int) -> torch.Tensor:
    """Packed int32 bitmasks ``[M, W]`` -> bool ``[M, vocab]`` (bit j of word w is
    token 32w + j; tokens past ``32 * W`` are not banned)."""
    shifts = _SHIFTS.to(masks.device)
    bits = ((masks.unsqueeze(-1) >> shifts) & 1).bool().reshape(masks.shape[0], -1)
    if bits.shape[1] >= vocab:
        return bits[:, :vocab].contiguous()
    pad = torch.zeros(masks.shape[0], vocab - bits.shape[1], dtype=torch.bool, device=masks.device)
    return torch.cat([bits, pad], dim=1)


def pack_masks(bool_rows: torch.Tensor) -> torch.Tensor:
    """bool ``[M, V]`` -> packed int32 bitmasks ``[M, ceil(V / 32)]``: the inverse of
    :func:`unpack_masks` (bit j of word w is token 32w + j, stored in two's complement)."""
    m, v = bool_rows.shape
    w = (v + 31) // 32
    padded = torch.zeros(m, w * 32, dtype=torch.int64)
    padded[:, :v] = bool_rows.to(torch.int64)
    words = (padded.view(m, w, 32) << torch.arange(32)).sum(-1)
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32)


def random_inputs(B: int, V: int, R: int, dtype: torch.dtype, seed: int, density: float = 0.3, n_masks: int = 3,
                  n_pens: int = 2, sparse_max: int = 5, inf_share: float = 0.03) -> tuple:
    """Random arguments of :func:`guard_apply_reference` (and its Triton twin), seeded, on the
    CPU: ``B`` rows of ``V`` logits, ``R`` guarded rows with bitmasks banning a ``density`` share
    of the vocabulary, penalties (``inf_share`` of them infinite, as the semantic threshold
    bans), and up to ``sparse_max`` sparse bans per row. Returns ``(logits, rows, mask_idx,
    masks, pen_idx, pens, offs, toks, banned)``, ``banned`` the masks unpacked."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype)
    banned = torch.rand(n_masks, V, generator=g) < density
    masks = pack_masks(banned)
    pens = torch.rand(n_pens, V, generator=g)
    pens[pens > 1 - inf_share] = float("inf")
    rows = torch.randperm(B, generator=g)[:R]
    mask_idx = torch.randint(-1, n_masks, (R,), generator=g, dtype=torch.int32)
    pen_idx = torch.randint(-1, n_pens, (R,), generator=g, dtype=torch.int32)
    counts = torch.randint(0, sparse_max + 1, (R,), generator=g)
    offs = torch.zeros(R + 1, dtype=torch.int32)
    offs[1:] = counts.cumsum(0)
    toks = torch.randint(0, V, (int(offs[-1]),), generator=g, dtype=torch.int32)
    return logits, rows, mask_idx, masks, pen_idx, pens, offs, toks, banned


def guard_apply_reference(
    logits: torch.Tensor,
    rows: torch.Tensor,
    mask_idx: torch.Tensor,
    masks: torch.Tensor,
    pen_idx: torch.Tensor,
    penalties: torch.Tensor,
    sparse_offsets: torch.Tensor,
    sparse_tokens: torch.Tensor,
    masks_bool: torch.Tensor | None = None,
    masks_sparse: list[torch.Tensor | None] | None = None,
    masks_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply, in place, each guarded row's semantic penalty and ban set.

    For guarded row ``r`` (logits row ``rows[r]``): ``x = float(x) - penalties[pen_idx[r]]``
    when ``pen_idx[r] >= 0``; then ``-inf`` on every token set in
    ``masks[mask_idx[r]]`` (when ``mask_idx[r] >= 0``) or listed in
    ``sparse_tokens[sparse_offsets[r]:sparse_offsets[r+1]]``; stored back in the
    logits dtype. Rows not in ``rows`` are not touched.

    Rows that share a mask or a penalty are handled as one broadcast op: in serving,
    most rows of a step share the root mask of the same targets, and on CPU the cost
    is memory traffic, so one pass over the rows beats a gathered copy.
    ``masks_bool`` is ``unpack_masks(masks, V)``, cached by the caller;
    ``masks_sparse[m]``, where given, lists the tokens of mask ``m`` when they are few
    enough that writing them beats a pass over the vocabulary (the usual case);
    ``masks_bias`` is the masks as ``0`` / ``-inf`` float rows: adding one costs the
    same whatever the ban set, where ``masked_fill`` slows down as it fills more.
    """
    R = int(rows.numel())
    if R == 0:
        return logits
    V = logits.shape[1]
    if masks_bool is None:
        masks_bool = unpack_masks(masks, V)
    elif masks_bool.shape[1] != V:
        masks_bool = masks_bool[:, :V] if masks_bool.shape[1] > V else torch.cat(
            [masks_bool, masks_bool.new_zeros(masks_bool.shape[0], V - masks_bool.shape[1])], 1)
    rows_l = rows.tolist()
    all_rows = R == logits.shape[0] and rows_l == list(range(R))
    neg_inf = float("-inf")

    pen_l = pen_idx.tolist()
    for p in sorted(set(pen_l)):
        if p < 0:
            continue
        pen = penalties[p, :V] if penalties.shape[1] >= V else torch.cat(
            [penalties[p], penalties.new_zeros(V - penalties.shape[1])])
        sel = [rows_l[i] for i in range(R) if pen_l[i] == p]
        if logits.dtype == torch.float32:
            if len(sel) == logits.shape[0] and sel == list(range(len(sel))):
                logits.sub_(pen)
            else:
                idx = torch.tensor(sel, device=logits.device)
                logits.index_copy_(0, idx, logits.index_select(0, idx) - pen)
        else:
            idx = torch.tensor(sel, device=logits.device)
            x = logits.index_select(0, idx).float() - pen
            logits.index_copy_(0, idx, x.to(logits.dtype))

    mask_l = mask_idx.tolist()
    for m in sorted(set(mask_l)):
        if m < 0:
            continue
        sel = [rows_l[i] for i in range(R) if mask_l[i] == m]
        sp = masks_sparse[m] if masks_sparse is not None else None
        # Scattered writes cost ~100x a streamed add per element (measured on CPU):
        # a token list pays off for one row up to V/16 tokens, for many up to V/256.
        if sp is not None and len(sel) > 1 and masks_bias is not None and sp.numel() * 256 > V:
            sp = None
        if sp is not None:
            if sp.numel():
                if len(sel) == 1:
                    logits[sel[0]].index_fill_(0, sp, neg_inf)
                else:
                    idx = torch.tensor(sel, device=logits.device)
                    logits.index_put_((idx[:, None], sp[None, :]), torch.tensor(neg_inf, dtype=logits.dtype))
            continue
        if masks_bias is not None:
            bias = masks_bias[m, :V]
            if all_rows and len(sel) == R:
                logits.add_(bias)
            elif len(sel) == 1:
                logits[sel[0]].add_(bias)
            else:
                idx = torch.tensor(sel, device=logits.device)
                logits.index_copy_(0, idx, logits.index_select(0, idx).add_(bias))
            continue
        mb = masks_bool[m]
        if all_rows and len(sel) == R:
            logits.masked_fill_(mb, neg_inf)
        elif len(sel) == 1:
            logits[sel[0]].masked_fill_(mb, neg_inf)
        else:
            idx = torch.tensor(sel, device=logits.device)
            logits.index_copy_(0, idx, logits.index_select(0, idx).masked_fill_(mb, neg_inf))

    counts = (sparse_offsets[1:] - sparse_offsets[:-1]).to(torch.int64)
    if int(sparse_offsets[-1]) > int(sparse_offsets[0]):
        row_of = torch.repeat_interleave(rows.to(torch.int64), counts)
        toks = sparse_tokens[int(sparse_offsets[0]): int(sparse_offsets[-1])].to(torch.int64)
        keep = toks < V
        logits[row_of[keep], toks[keep]] = neg_inf
    return logits


def max_cosine_reference(cand: torch.Tensor, forbidden: torch.Tensor) -> torch.Tensor:
    """``out[i] = max_j <cand[i], forbidden[j]>`` in float32 (inputs L2-normalised by
    the caller, so this is the max cosine); ``-inf`` when ``forbidden`` is empty."""
    if forbidden.shape[0] == 0:
        return torch.full((cand.shape[0],), float("-inf"), dtype=torch.float32, device=cand.device)
    return (cand.float() @ forbidden.float().T).amax(dim=1)
