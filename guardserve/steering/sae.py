"""Sparse autoencoders over a model's residual stream, in SAELens' file format.

Contract: ``SAE(d_in, d_sae, architecture, k=None, hook_name=...)`` with weights
``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and, for
JumpReLU, ``threshold [d_sae]``. ``encode(x)`` computes
``pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc`` and then ReLU, TopK (keep the k
largest, ReLU'd) or JumpReLU (``relu(pre) * (pre > threshold)``); ``decode(f) = f @ W_dec + b_dec``.
``save(dir)`` writes ``cfg.json`` + ``sae_weights.safetensors``; ``SAE.load(path)`` reads that
or Gemma Scope's ``params.npz`` (lower-case names, always JumpReLU, b_dec applied to the input
is *not* part of the Gemma Scope encoder, so ``apply_b_dec_to_input`` is False there).
``hook_name`` is SAELens' ``blocks.{L}.hook_resid_post``: the output of decoder layer L.

SAELens' ``normalize_activations`` (cfg.json) is honoured on load, never ignored:
``"none"`` reads the weights as they are. ``"expected_average_only_in"`` means the SAE was
trained on activations multiplied by one constant ``c`` (SAELens estimates ``sqrt(d_in) /
mean ||x||``) and its output is divided by it; the factor is read from the folder's
``activation_scaler.json`` (``{"scaling_factor": c}``, what SAELens' trainer writes next to a
checkpoint), from a ``norm_scaling_factor`` entry in cfg.json (SAELens' pretrained-SAE
directory field), or given to ``SAE.load``, and folded into the weights as SAELens'
``fold_activation_norm_scaling_factor`` does (``W_enc * c``, ``W_dec / c``, ``b_dec / c``): the
features of raw activations are then exactly those SAELens computes on scaled ones, and
``encode``, ``encode_selected``, ``decode`` and anything that uses ``W_dec`` directly (the
clamp) all work in raw residual units. A folded SAE saves as ``"none"``, as SAELens' own
folded ones do. Without a factor the load is refused. The per-token schemes
(``"constant_norm_rescale"``, ``"layer_norm"``) cannot be folded into weights: the clamp's
``delta @ W_dec`` would need each token's own scale, so they are refused too.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch
from torch import nn

ARCHITECTURES = ("standard", "topk", "jumprelu")
_HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_post$")
# SAELens' normalize_activations values; the per-token ones are refused on load.
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
ACTIVATION_SCALER_FILE = "activation_scaler.json"


def estimate_norm_scaling_factor(acts: torch.Tensor) -> float:
    """SAELens' ``expected_average_only_in`` factor for activations ``acts [N, d_in]``:
    ``sqrt(d_in) / mean ||x||`` (scaled activations have mean norm ``sqrt(d_in)``)."""
    return float(acts.shape[-1] ** 0.5 / acts.float().norm(dim=-1).mean().item())


def hook_name_for_layer(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


class SAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, architecture: str = "standard", *, k: int | None = None,
                 hook_name: str = "blocks.0.hook_resid_post", apply_b_dec_to_input: bool = True,
                 metadata: dict | None = None):
        super().__init__()
        # SAELens calls the plain ReLU SAE "standard"; accept "relu" as a user-facing alias.
        architecture = "standard" if architecture == "relu" else architecture
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {architecture!r} (one of relu/standard, topk, jumprelu)")
        if architecture == "topk" and not k:
            raise ValueError("a TopK SAE needs k")
        self.d_in, self.d_sae, self.architecture, self.k = d_in, d_sae, architecture, k
        self.hook_name, self.apply_b_dec_to_input = hook_name, apply_b_dec_to_input
        self.metadata = dict(metadata or {})
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae))

    @property
    def layer(self) -> int:
        m = _HOOK.match(self.hook_name)
        if not m:
            raise ValueError(f"hook {self.hook_name!r} is not a residual-stream hook (blocks.L.hook_resid_post)")
        return int(m.group(1))

    # ------------------------------------------------------------------ maths
    def pre_acts(self, x: torch.Tensor, cols=None) -> torch.Tensor:
        """Encoder pre-activations, for all features or only the columns ``cols``."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        if cols is None:
            return x @ self.W_enc + self.b_enc
        return x @ self.W_enc[:, cols] + self.b_enc[cols]

    def activate(self, pre: torch.Tensor, cols=None) -> torch.Tensor:
        if self.architecture == "standard":
            return torch.relu(pre)
        if self.architecture == "jumprelu":
            thr = self.threshold if cols is None else self.threshold[cols]
            return torch.relu(pre) * (pre > thr)
        vals, idx = torch.topk(pre, self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(x))

    def encode_selected(self, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Activations of the features ``cols`` only. Exact and cheap for ReLU and JumpReLU
        (a feature depends only on its own column); TopK must rank every feature."""
        if self.architecture == "topk":
            return self.encode(x)[..., cols]
        return self.activate(self.pre_acts(x, cols), cols)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ files
    def cfg(self) -> dict:
        cfg = {"d_in": self.d_in, "d_sae": self.d_sae, "architecture": self.architecture,
               "apply_b_dec_to_input": self.apply_b_dec_to_input, "dtype": "float32", "device": "cpu",
               "normalize_activations": "none",
               "metadata": {**self.metadata, "hook_name": self.hook_name}}
        if self.k:
            cfg["k"] = self.k
        return cfg

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "cfg.json").write_text(json.dumps(self.cfg(), indent=2) + "\n")
        save_file({k: v.detach().contiguous().float() for k, v in self.state_dict().items()},
                  str(path / "sae_weights.safetensors"))
        return path

    @classmethod
    def load(cls, path: str | Path, hook_name: str | None = None, norm_scaling_factor: float | None = None) -> "SAE":
        """A SAELens directory (``cfg.json`` + ``sae_weights.safetensors``), or a Gemma Scope
        ``params.npz`` (file, or a directory holding one; give ``hook_name`` for it, Gemma Scope
        files do not name their layer). ``norm_scaling_factor``: the factor of a SAELens SAE
        whose cfg.json says ``normalize_activations: expected_average_only_in`` (by default read
        from the folder, see the module docstring). Raises ValueError for a normalization that
        cannot be honoured."""
        path = Path(path)
        if path.is_dir() and (path / "cfg.json").exists():
            return cls._load_saelens(path, norm_scaling_factor)
        npz = path if path.suffix == ".npz" else path / "params.npz"
        if npz.exists():
            return cls._load_gemma_scope(npz, hook_name)
        raise FileNotFoundError(f"no SAE at {path}: expected cfg.json + sae_weights.safetensors, or params.npz")

    @classmethod
    def _load_saelens(cls, path: Path, norm_scaling_factor: float | None = None) -> "SAE":
        from safetensors.torch import load_file

        cfg = json.loads((path / "cfg.json").read_text())
        meta = dict(cfg.get("metadata") or {})
        # Older SAELens configs keep hook_name at the top level.
        hook = meta.pop("hook_name", None) or cfg.get("hook_name") or "blocks.0.hook_resid_post"
        factor = cls._norm_factor(path, cfg, norm_scaling_factor)
        sae = cls(int(cfg["d_in"]), int(cfg["d_sae"]), cfg.get("architecture", "standard"), k=cfg.get("k"),
                  hook_name=hook, apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), metadata=meta)
        sae._fill(load_file(str(path / "sae_weights.safetensors")))
        if factor is not None:
            sae.fold_activation_norm_scaling_factor(factor)
            sae.metadata["folded_norm_scaling_factor"] = factor
        return sae

    @staticmethod
    def _norm_factor(path: Path, cfg: dict, given: float | None) -> float | None:
        """The input scaling factor to fold in for cfg.json's ``normalize_activations`` (None:
        nothing to fold); ValueError for what cannot be honoured."""
        mode = cfg.get("normalize_activations") or "none"
        if mode == "none":
            return None
        if mode in ("constant_norm_rescale", "layer_norm"):
            raise ValueError(
                f"normalize_activations {mode!r} rescales each token by its own norm, which guardserve's SAE "
                "steering cannot honour (its clamp edits the residual through W_dec in raw units); "
                "use an SAE trained with 'none' or 'expected_average_only_in'")
        if mode != "expected_average_only_in":
            raise ValueError(f"unknown normalize_activations {mode!r} in {path / 'cfg.json'} "
                             f"(SAELens knows {', '.join(NORMALIZATIONS)})")
        if given is not None:
            return float(given)
        scaler = path / ACTIVATION_SCALER_FILE
        if scaler.is_file():
            try:
                stored = json.loads(scaler.read_text()).get("scaling_factor")
            except (ValueError, AttributeError) as e:
                raise ValueError(f"{scaler}: unreadable ({e})") from None
            if stored is not None:
                return float(stored)
        if cfg.get("norm_scaling_factor") is not None:
            return float(cfg["norm_scaling_factor"])
        raise ValueError(
            f"{path / 'cfg.json'} says normalize_activations 'expected_average_only_in' but no scaling factor is "
            f"stored with it (neither {ACTIVATION_SCALER_FILE} with a scaling_factor nor a norm_scaling_factor "
            "entry in cfg.json); add one (SAELens estimates sqrt(d_in) / mean activation norm), or fold it into the "
            "weights and set normalize_activations to 'none'")

    @classmethod
    def _load_gemma_scope(cls, npz: Path, hook_name: str | None) -> "SAE":
        import numpy as np

        params = {k.lower(): torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in np.load(npz).items()}
        d_in, d_sae = params["w_enc"].shape
        sae = cls(d_in, d_sae, "jumprelu", hook_name=hook_name or "blocks.0.hook_resid_post",
                  apply_b_dec_to_input=False, metadata={"source": "gemma-scope", "path": str(npz)})
        sae._fill({"W_enc": params["w_enc"], "b_enc": params["b_enc"], "W_dec": params["w_dec"],
                   "b_dec": params["b_dec"], "threshold": params["threshold"]})
        return sae

    def save_gemma_scope(self, npz: str | Path) -> Path:
        """Write Gemma Scope's ``params.npz`` (JumpReLU only, the format has no other kind)."""
        import numpy as np

        if self.architecture != "jumprelu" or self.apply_b_dec_to_input:
            raise ValueError("Gemma Scope params.npz holds JumpReLU SAEs without b_dec applied to the input")
        npz = Path(npz)
        npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez(npz, **{k.lower(): v.detach().float().numpy() for k, v in self.state_dict().items()})
        return npz

    def _fill(self, tensors: dict) -> None:
        missing = {n for n, _ in self.named_parameters()} - set(tensors)
        if missing:
            raise ValueError(f"SAE weights lack {sorted(missing)}")
        with torch.no_grad():
            for name, p in self.named_parameters():
                t = tensors[name].float()
                if t.shape != p.shape:
                    raise ValueError(f"SAE weight {name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
                p.copy_(t)

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, factor: float) -> None:
        """Fold an input scaling ``x * factor`` (and the output's ``/ factor``) into the
        weights, as SAELens does: afterwards raw activations give the features the scaled
        ones gave, and decode returns raw units."""
        factor = float(factor)
        if not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"the activation norm scaling factor must be a positive number, got {factor!r}")
        self.W_enc.mul_(factor)
        self.W_dec.div_(factor)
        self.b_dec.div_(factor)

    def fingerprint(self) -> str:
        """A short hash of config and weights: steering data computed for one SAE is never
        applied with another."""
        h = hashlib.sha256(json.dumps(self.cfg(), sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]
