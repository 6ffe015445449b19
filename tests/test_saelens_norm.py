"""SAELens' ``normalize_activations`` on load: the folded ``expected_average_only_in`` factor
gives SAELens' own features and raw-unit reconstructions (encode, encode_selected, decode and
the clamp alike), and what cannot be honoured is refused, never ignored."""

from __future__ import annotations

import json

import pytest
import torch

from guardserve.steering import SAE, clamp
from guardserve.steering.sae import estimate_norm_scaling_factor

D_IN, D_SAE, C = 4, 6, 0.25


def _weights(arch: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
         "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g)}
    if arch == "jumprelu":
        w["threshold"] = torch.rand(D_SAE, generator=g) * 0.3
    return w


def _saelens_folder(path, arch="standard", mode="expected_average_only_in", scaler=C, cfg_extra=None,
                    apply_b_dec_to_input=True):
    """A folder as SAELens writes it: cfg.json, sae_weights.safetensors and, for a training
    checkpoint, activation_scaler.json."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "architecture": arch, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec_to_input, "normalize_activations": mode,
           "metadata": {"hook_name": "blocks.1.hook_resid_post"}, **(cfg_extra or {})}
    (path / "cfg.json").write_text(json.dumps(cfg))
    weights = _weights(arch)
    save_file(weights, str(path / "sae_weights.safetensors"))
    if scaler is not False:
        (path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": scaler}))
    return weights


def _reference(w: dict, x: torch.Tensor, arch: str, c: float, apply_b_dec_to_input=True):
    """SAELens' maths for a trained-on-scaled-activations SAE: features of ``x * c``, output
    divided by ``c``."""
    pre = (x * c - w["b_dec"] * apply_b_dec_to_input) @ w["W_enc"] + w["b_enc"]
    f = torch.relu(pre) * (pre > w["threshold"]) if arch == "jumprelu" else torch.relu(pre)
    return f, (f @ w["W_dec"] + w["b_dec"]) / c


@pytest.mark.parametrize("arch,apply_b_dec", [("standard", True), ("jumprelu", True), ("jumprelu", False)])
def test_expected_average_only_in_matches_saelens(tmp_path, arch, apply_b_dec):
    w = _saelens_folder(tmp_path / "sae", arch, apply_b_dec_to_input=apply_b_dec)
    sae = SAE.load(tmp_path / "sae")
    x = torch.randn(9, D_IN, generator=torch.Generator().manual_seed(1)) * 8  # raw residual scale
    f_ref, out_ref = _reference(w, x, arch, C, apply_b_dec)
    assert f_ref.gt(0).any() and not f_ref.gt(0).all()  # some features fire, some do not
    f = sae.encode(x)
    assert torch.allclose(f, f_ref, atol=1e-5)
    assert torch.allclose(sae.decode(f), out_ref, atol=1e-5)
    cols = torch.tensor([0, 2, 5])
    assert torch.allclose(sae.encode_selected(x, cols), f_ref[:, cols], atol=1e-5)
    # The clamp, in raw units: x + (f' - f)[cols] @ W_dec[cols] / c, only where a feature fires.
    new = torch.where(f_ref[:, cols] > 0, torch.full_like(f_ref[:, cols], -3.0), f_ref[:, cols])
    expect = x + (new - f_ref[:, cols]) @ w["W_dec"][cols] / C
    assert torch.allclose(clamp(sae, x, cols, 3.0), expect, atol=1e-4)
    # Saved, it is a plain SAE ("none"): loading it again does not fold twice.
    sae.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "cfg.json").read_text())["normalize_activations"] == "none"
    again = SAE.load(tmp_path / "saved")
    assert torch.allclose(again.encode(x), f_ref, atol=1e-5)
    assert again.metadata["folded_norm_scaling_factor"] == C


def test_factor_sources_and_none(tmp_path):
    x = torch.randn(5, D_IN) * 8
    # cfg.json's norm_scaling_factor (SAELens' pretrained directory field), or given to load.
    w = _saelens_folder(tmp_path / "cfg", scaler=False, cfg_extra={"norm_scaling_factor": 2.0})
    assert torch.allclose(SAE.load(tmp_path / "cfg").encode(x), _reference(w, x, "standard", 2.0)[0], atol=1e-5)
    assert torch.allclose(SAE.load(tmp_path / "cfg", norm_scaling_factor=0.5).encode(x),
                          _reference(w, x, "standard", 0.5)[0], atol=1e-5)
    # "none" reads the weights as they are, whatever a stale scaler file says.
    w = _saelens_folder(tmp_path / "none", mode="none")
    assert torch.allclose(SAE.load(tmp_path / "none").encode(x), _reference(w, x, "standard", 1.0)[0], atol=1e-5)
    acts = torch.randn(100, D_IN) * 3
    scaled = acts * estimate_norm_scaling_factor(acts)
    assert scaled.norm(dim=-1).mean().item() == pytest.approx(D_IN ** 0.5, rel=1e-5)


@pytest.mark.parametrize("mode,scaler,match", [
    ("expected_average_only_in", False, "no scaling factor is stored"),
    ("expected_average_only_in", None, "no scaling factor is stored"),  # a folded run's null factor
    ("constant_norm_rescale", C, "cannot honour"),
    ("layer_norm", C, "cannot honour"),
    ("whiten", C, "unknown normalize_activations"),
])
def test_unhonourable_normalization_is_refused(tmp_path, mode, scaler, match):
    from guardserve.steering.loading import SteeringSetupError, load_sae

    _saelens_folder(tmp_path / "sae", mode=mode, scaler=scaler)
    with pytest.raises(ValueError, match=match):
        SAE.load(tmp_path / "sae")
    with pytest.raises(SteeringSetupError, match=match):  # the CLI's one-line error
        load_sae(tmp_path / "sae")


def test_bad_factor_is_refused(tmp_path):
    _saelens_folder(tmp_path / "sae", scaler=-1.0)
    with pytest.raises(ValueError, match="positive number"):
        SAE.load(tmp_path / "sae")
