"""The Triton kernels compiled for a CUDA device (not interpreted) == their torch references.

tests/test_kernels.py holds the kernels to the reference under Triton's interpreter (CPU
tensors, every machine); this file runs the same cases on the GPU, where serving runs the
compiled kernels. It skips without CUDA (``scripts/gpu-check.sh`` runs it on a GPU machine).
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
from test_kernels import _case

from guardserve.kernels.reference import guard_apply_reference, max_cosine_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def tg_cuda():
    """guardserve.kernels.triton_guard imported without TRITON_INTERPRET: compiled kernels."""
    old = os.environ.pop("TRITON_INTERPRET", None)
    sys.modules.pop("guardserve.kernels.triton_guard", None)
    yield importlib.import_module("guardserve.kernels.triton_guard")
    sys.modules.pop("guardserve.kernels.triton_guard", None)
    if old is not None:
        os.environ["TRITON_INTERPRET"] = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,V,R,block_v", [(1, 100, 1, 256), (4, 1000, 3, 256), (3, 1001, 3, 1024),
                                           (256, 97, 130, 256), (4, 32000, 3, 8192), (4, 131072, 3, 8192),
                                           (64, 131072, 64, 1024)])
def test_guard_apply_cuda_matches_reference(tg_cuda, B, V, R, block_v, dtype):
    args = _case(B, V, R, dtype, seed=B * 7919 + V, sparse_max=40)
    logits, rows, mask_idx, masks, pen_idx, pens, offs, toks = args[:8]
    ref = guard_apply_reference(logits.clone(), rows, mask_idx, masks, pen_idx, pens, offs, toks)
    cuda = [t.cuda() for t in (logits, rows, mask_idx, masks, pen_idx, pens, offs, toks)]
    out = tg_cuda.guard_apply_triton(cuda[0].clone(), *cuda[1:], block_v=block_v)
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), ref)


def test_dispatch_runs_triton_on_cuda(tg_cuda):
    from guardserve import kernels

    args = _case(8, 4096, 5, torch.float32, seed=5)
    ref = guard_apply_reference(args[0].clone(), *args[1:8])
    cuda = [t.cuda() for t in args[:8]]
    assert kernels.use_triton(cuda[0])
    assert torch.equal(kernels.guard_apply(cuda[0].clone(), *cuda[1:]).cpu(), ref)


@pytest.mark.parametrize("N,F,D", [(1, 1, 384), (14, 9, 384), (33, 0, 384), (7, 20, 100), (512, 300, 384)])
def test_max_cosine_cuda_matches_reference(tg_cuda, N, F, D):
    g = torch.Generator().manual_seed(N * 100 + F)
    c = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    f = torch.nn.functional.normalize(torch.randn(F, D, generator=g), dim=1)
    ref = max_cosine_reference(c, f)
    out = tg_cuda.max_cosine_triton(c.cuda(), f.cuda()).cpu()
    if F == 0:
        assert torch.equal(ref, out) and torch.isinf(ref).all()
    else:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
