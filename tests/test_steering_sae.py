"""SAE file formats, hand-computed encode/decode, the clamp primitive and feature selection."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from guardserve.steering import SAE, SequenceGate, Steerer, TargetFeatures, clamp
from guardserve.steering.features import Selection, SteeringStore, select_features


def _random_sae(arch: str, d_in=4, d_sae=6, seed=0, **kw) -> SAE:
    g = torch.Generator().manual_seed(seed)
    sae = SAE(d_in, d_sae, arch, hook_name="blocks.2.hook_resid_post", **kw)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae, generator=g) * 0.5)
    return sae


def test_encode_decode_by_hand():
    sae = SAE(2, 3, "standard")
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, -1.0, 0.5], [2.0, 0.0, -1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.5, -0.25]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        sae.b_dec.copy_(torch.tensor([1.0, -1.0]))
    x = torch.tensor([[2.0, 0.0]])
    # x - b_dec = [1, 1]; pre = [1+2, -1+0+0.5, 0.5-1-0.25] = [3, -0.5, -0.75]
    f = sae.encode(x)
    assert torch.allclose(f, torch.tensor([[3.0, 0.0, 0.0]]))
    assert torch.allclose(sae.decode(f), torch.tensor([[4.0, -1.0]]))
    # JumpReLU: a threshold above 3 silences feature 0; TopK(1) keeps only the largest.
    jr = SAE(2, 3, "jumprelu")
    jr.load_state_dict({**sae.state_dict(), "threshold": torch.tensor([3.5, 0.0, 0.0])})
    assert torch.equal(jr.encode(x), torch.zeros(1, 3))
    tk = SAE(2, 3, "topk", k=1)
    tk.load_state_dict(sae.state_dict())
    with torch.no_grad():
        tk.b_enc.copy_(torch.tensor([0.0, 5.0, 0.0]))   # pre = [3, 4, -0.75]
    assert torch.allclose(tk.encode(x), torch.tensor([[0.0, 4.0, 0.0]]))


@pytest.mark.parametrize("arch,kw", [("standard", {}), ("topk", {"k": 2}), ("jumprelu", {})])
def test_saelens_round_trip(tmp_path, arch, kw):
    sae = _random_sae(arch, **kw)
    sae.save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post" and cfg["architecture"] == arch
    back = SAE.load(tmp_path / "sae")
    assert back.layer == 2 and back.architecture == arch and back.k == sae.k
    x = torch.randn(5, 4)
    assert torch.equal(back.encode(x), sae.encode(x)) and back.fingerprint() == sae.fingerprint()
    from safetensors.torch import load_file

    names = set(load_file(str(tmp_path / "sae" / "sae_weights.safetensors")))
    assert names == {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if arch == "jumprelu" else set())


def test_gemma_scope_round_trip(tmp_path):
    sae = _random_sae("jumprelu", apply_b_dec_to_input=False)
    sae.save_gemma_scope(tmp_path / "params.npz")
    assert set(np.load(tmp_path / "params.npz").files) == {"w_enc", "b_enc", "w_dec", "b_dec", "threshold"}
    back = SAE.load(tmp_path, hook_name="blocks.2.hook_resid_post")
    x = torch.randn(7, 4)
    # Gemma Scope's encoder does not subtract b_dec from the input.
    pre = x @ sae.W_enc + sae.b_enc
    expect = torch.relu(pre) * (pre > sae.threshold)
    assert torch.allclose(back.encode(x), expect) and not back.apply_b_dec_to_input
    with pytest.raises(FileNotFoundError):
        SAE.load(tmp_path / "nothing")


def _sparse_sae() -> SAE:
    sae = _random_sae("standard", d_in=8, d_sae=16, seed=3)
    with torch.no_grad():
        sae.b_enc.fill_(-2.0)      # features fire on some positions only
    return sae


def test_clamp_changes_only_where_selected_features_fire():
    sae = _sparse_sae()
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    cols = torch.tensor([2, 5, 11])
    fires = (sae.encode(x)[:, cols] > 0).any(-1)
    assert 0 < fires.sum() < len(x)            # the test needs both kinds of position
    out = clamp(sae, x, cols, 7.0)
    assert torch.equal(out[~fires], x[~fires])
    assert not torch.allclose(out[fires], x[fires])
    # Anthropic's form: decode(f') + (x - decode(f)) with f' clamped.
    f = sae.encode(x)
    f2 = f.clone()
    f2[:, cols] = torch.where(f[:, cols] > 0, torch.tensor(-7.0), f[:, cols])
    assert torch.allclose(out, sae.decode(f2) + (x - sae.decode(f)), atol=1e-4)
    # Positions excluded by `where` (BOS) never change.
    where = torch.ones(40, dtype=torch.bool)
    where[fires.nonzero()[0]] = False
    out2 = clamp(sae, x, cols, 7.0, where)
    assert torch.equal(out2[~where], x[~where])


def test_gate_opens_only_above_alpha():
    sae = _sparse_sae()
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    t = TargetFeatures("t", (2, 5, 11), alpha=0.99)
    valid = torch.ones(40, dtype=torch.bool)
    closed = Steerer(sae, 7.0).delta(x, [t], SequenceGate().bind([t]), valid)
    assert closed is None
    t_open = TargetFeatures("t", (2, 5, 11), alpha=0.0)
    d = Steerer(sae, 7.0).delta(x, [t_open], SequenceGate().bind([t_open]), valid)
    assert torch.allclose(x + d, clamp(sae, x, [2, 5, 11], 7.0), atol=1e-5)


def test_selection_and_store(tmp_path):
    sae = SAE(2, 3, "standard")
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2, 3))       # feature 0 reads dim 0, feature 1 dim 1, feature 2 nothing
        sae.W_dec.copy_(torch.eye(3, 2))
    target = [torch.tensor([[1.0, 0.0], [1.0, 1.0]])]
    retain = [torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])]
    feats, contrast, alpha = select_features(sae, target, retain, n=2, max_retain_rate=0.5)
    # Feature 0 fires on all target tokens and on 1 of 6 retain tokens; feature 1 on fewer
    # target than retain tokens (negative contrast, dropped); feature 2 never.
    assert feats == [0] and contrast[0] == pytest.approx(1 - 1 / 6, abs=1e-4)
    assert alpha == pytest.approx(0.25 * 0.95, abs=1e-6)   # shares 0 and 0.25, 95th percentile
    # A feature firing on more retain tokens than the cap is never selected.
    assert select_features(sae, target, retain, n=2, max_retain_rate=0.1)[0] == []
    store = SteeringStore(tmp_path)
    store.put(Selection("abc", 3, sae.fingerprint(), 0, feats, contrast, alpha, 2, 6))
    got = store.get("abc")
    assert got.version == 3 and got.as_target() == TargetFeatures("abc", (0,), alpha)
    with pytest.raises(ValueError):
        store.path("../x")
