"""Triton kernels == their torch references (Triton's interpreter on CPU tensors)."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

from guardserve import kernels
from guardserve.kernels.reference import guard_apply_reference, max_cosine_reference, pack_masks, random_inputs, unpack_masks


@pytest.fixture(scope="module")
def tg():
    """guardserve.kernels.triton_guard with its kernels built for the interpreter.

    Triton decides at decoration time whether a kernel is interpreted, so the module
    is (re)imported with TRITON_INTERPRET=1, which is then restored: the other tests
    of the session keep the CPU dispatch to the torch reference.
    """
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    sys.modules.pop("guardserve.kernels.triton_guard", None)
    mod = importlib.import_module("guardserve.kernels.triton_guard")
    yield mod
    sys.modules.pop("guardserve.kernels.triton_guard", None)
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


def _case(B, V, R, dtype, seed, density=0.3, n_masks=3, n_pens=2, sparse_max=5):
    return random_inputs(B, V, R, dtype, seed, density=density, n_masks=n_masks, n_pens=n_pens, sparse_max=sparse_max)


def _both(tg, args, block_v=1024):
    logits, rows, mask_idx, masks, pen_idx, pens, offs, toks = args[:8]
    ref = guard_apply_reference(logits.clone(), rows, mask_idx, masks, pen_idx, pens, offs, toks)
    tri = tg.guard_apply_triton(logits.clone(), rows, mask_idx, masks, pen_idx, pens, offs, toks,
                                block_v=block_v)
    return ref, tri


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "B,V,R",
    [(1, 100, 1), (4, 1000, 3), (3, 1001, 3), (8, 517, 5), (256, 96, 256), (256, 97, 130)],
)
def test_guard_apply_matches_reference(tg, B, V, R, dtype):
    args = _case(B, V, R, dtype, seed=B * 7919 + V)
    ref, tri = _both(tg, args, block_v=256)
    assert torch.equal(ref, tri)
    untouched = torch.ones(B, dtype=torch.bool)
    untouched[args[1]] = False
    assert torch.equal(ref[untouched], args[0][untouched])  # bit for bit


@pytest.mark.parametrize("V", [32000, 131072])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_guard_apply_real_vocab_sizes(tg, V, dtype):
    args = _case(4, V, 3, dtype, seed=V, sparse_max=40)
    ref, tri = _both(tg, args, block_v=8192)
    assert torch.equal(ref, tri)


def test_semantics_of_reference(tg):
    """The contract itself, checked elementwise against the inputs."""
    logits, rows, mask_idx, masks, pen_idx, pens, offs, toks, banned = _case(6, 300, 4, torch.float32, 3)
    out = guard_apply_reference(logits.clone(), rows, mask_idx, masks, pen_idx, pens, offs, toks)
    for r in range(4):
        row = int(rows[r])
        exp = logits[row].clone()
        if pen_idx[r] >= 0:
            exp = exp - pens[pen_idx[r]]
        ban = banned[mask_idx[r]].clone() if mask_idx[r] >= 0 else torch.zeros(300, dtype=torch.bool)
        ban[toks[offs[r]:offs[r + 1]].long()] = True
        exp[ban] = float("-inf")
        assert torch.equal(out[row], exp)


def test_edge_cases(tg):
    V = 1001  # not a multiple of 32
    logits = torch.randn(3, V)
    rows = torch.tensor([0, 1, 2])
    everything_but_one = torch.ones(1, V, dtype=torch.bool)
    everything_but_one[0, 517] = False
    masks = torch.cat([pack_masks(torch.zeros(1, V, dtype=torch.bool)), pack_masks(everything_but_one)])
    mask_idx = torch.tensor([0, 1, -1], dtype=torch.int32)  # empty set, all but one, none
    pen_idx = torch.full((3,), -1, dtype=torch.int32)
    pens = torch.zeros(0, V)
    offs = torch.zeros(4, dtype=torch.int32)
    toks = torch.zeros(0, dtype=torch.int32)
    ref, tri = _both(tg, (logits, rows, mask_idx, masks, pen_idx, pens, offs, toks))
    assert torch.equal(ref, tri)
    assert torch.equal(ref[0], logits[0]) and torch.equal(ref[2], logits[2])
    assert torch.isfinite(ref[1]).sum() == 1 and torch.isfinite(ref[1, 517])
    assert int(ref[1].argmax()) == 517


def test_unpack_roundtrip():
    b = torch.rand(3, 77) < 0.5
    assert torch.equal(unpack_masks(pack_masks(b), 77), b)
    assert torch.equal(unpack_masks(pack_masks(b), 90)[:, 77:], torch.zeros(3, 13, dtype=torch.bool))


@pytest.mark.parametrize("N,F,D", [(1, 1, 384), (14, 9, 384), (33, 0, 384), (7, 20, 100)])
def test_max_cosine_matches_reference(tg, N, F, D):
    g = torch.Generator().manual_seed(N * 100 + F)
    c = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    f = torch.nn.functional.normalize(torch.randn(F, D, generator=g), dim=1)
    ref = max_cosine_reference(c, f)
    tri = tg.max_cosine_triton(c, f)
    if F == 0:
        assert torch.equal(ref, tri) and torch.isinf(ref).all()
    else:
        torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-5)


def test_cpu_dispatch_runs_reference_without_triton(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernels.use_triton(torch.zeros(1))
    args = _case(2, 64, 2, torch.float32, 1)
    out = kernels.guard_apply(args[0].clone(), *args[1:8])
    ref = guard_apply_reference(args[0].clone(), *args[1:8])
    assert torch.equal(out, ref)


def test_sparse_mask_lists_equal_dense():
    """The CPU shortcuts (a mask's token list, or a 0/-inf row added, instead of
    masked_fill) give the same logits as the bitmask."""
    for B, R in ((1, 1), (5, 3), (4, 4)):
        logits, rows, mask_idx, masks, pen_idx, pens, offs, toks, banned = _case(B, 500, R, torch.float32, B, 0.01)
        sparse = [row.nonzero()[:, 0] for row in unpack_masks(masks, 500)]
        sparse[0] = None  # mixed: one mask through the dense path
        a = guard_apply_reference(logits.clone(), rows, mask_idx, masks, pen_idx, pens, offs, toks)
        b = guard_apply_reference(logits.clone(), rows, mask_idx, masks, pen_idx, pens, offs, toks,
                                  masks_sparse=sparse)
        bias = torch.zeros(masks.shape[0], 500).masked_fill_(unpack_masks(masks, 500), float("-inf"))
        c = guard_apply_reference(logits.clone(), rows, mask_idx, masks, pen_idx, pens, offs, toks,
                                  masks_sparse=sparse, masks_bias=bias)
        assert torch.equal(a, b) and torch.equal(a, c)
