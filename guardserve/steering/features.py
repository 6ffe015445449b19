"""Per-target feature selection and its on-disk store.

Contract: ``select_features(sae, target_acts, retain_acts, n)`` ranks SAE features by
firing-rate contrast (share of target tokens where the feature fires minus the share of
retain tokens) and keeps the top ``n`` with a positive contrast; the gate α is the 95th
percentile, over retain sequences, of the share of a sequence's tokens on which any selected
feature fires (Dynamic SAE Guardrails, arXiv 2504.08192). ``SteeringStore`` keeps one JSON
record per target under ``$GUARDSERVE_HOME/steering/targets/<id>.json`` holding the policy
version and the SAE fingerprint it was computed for; ``ensure`` recomputes when either changed.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from guardserve.steering.clamp import TargetFeatures
from guardserve.steering.sae import SAE


@dataclass
class Selection:
    target_id: str
    version: int
    sae_fingerprint: str
    layer: int
    features: list[int]
    contrast: list[float]
    alpha: float
    target_tokens: int
    retain_tokens: int
    extra: dict = field(default_factory=dict)

    def as_target(self) -> TargetFeatures:
        return TargetFeatures(self.target_id, tuple(self.features), self.alpha)


def firing(sae: SAE, acts: list[torch.Tensor], batch: int = 8192) -> list[torch.Tensor]:
    """Boolean ``[T_i, d_sae]`` per sequence: where each feature fires."""
    with torch.no_grad():
        return [torch.cat([sae.encode(a[i:i + batch]) > 0 for i in range(0, len(a), batch)])
                if len(a) else torch.zeros(0, sae.d_sae, dtype=torch.bool) for a in acts]


def select_features(sae: SAE, target_acts: list[torch.Tensor], retain_acts: list[torch.Tensor], n: int,
                    percentile: float = 95.0, max_retain_rate: float = 0.01) -> tuple[list[int], list[float], float]:
    """Top-``n`` features by firing-rate contrast, their contrasts, and the gate α.

    Features that fire on more than ``max_retain_rate`` of retain tokens are left out: a
    dense feature (firing on 95% of retain tokens, 100% of target ones) has a positive
    contrast but makes the union of selected features fire everywhere, which pins α at 1
    and closes the gate for good (measured on the demo model)."""
    t_fire = torch.cat(firing(sae, target_acts))
    r_seq = firing(sae, retain_acts)
    r_fire = torch.cat(r_seq)
    if not len(t_fire) or not len(r_fire):
        raise ValueError("feature selection needs target and retain tokens")
    r_rate = r_fire.float().mean(0)
    contrast = t_fire.float().mean(0) - r_rate
    contrast[r_rate > max_retain_rate] = float("-inf")
    top = torch.argsort(contrast, descending=True)[:n]
    top = top[contrast[top] > 0]
    shares = torch.tensor([s[:, top].any(-1).float().mean().item() for s in r_seq if len(s)])
    alpha = float(torch.quantile(shares, percentile / 100.0)) if len(shares) else 0.0
    return top.tolist(), [round(float(contrast[i]), 4) for i in top], alpha


def target_texts(target, tokenizer) -> list[str]:
    """Texts that speak of a target: its own texts, one sentence per fact and per name, and
    the question/answer turns a user would send, in the model's chat format."""
    bos = tokenizer.bos_token or ""
    name = target.name
    texts = [bos + t for t in target.texts]
    facts = [f"{name}'s {k.replace('_', ' ')} is {v}." for k, v in (target.facts or {}).items()]
    texts += [bos + s for s in facts]
    texts += [bos + f"{alias} is a person known as {name}." for alias in target.all_names[1:]]
    if getattr(tokenizer, "chat_template", None):
        for k, v in (target.facts or {}).items():
            texts.append(tokenizer.apply_chat_template(
                [{"role": "user", "content": f"What is the {k.replace('_', ' ')} of {name}?"},
                 {"role": "assistant", "content": f"The {k.replace('_', ' ')} of {name} is {v}."}], tokenize=False))
    return texts


class SteeringStore:
    """One JSON record per target, written atomically (workers read while the CLI writes)."""

    def __init__(self, root: str | Path | None = None):
        from guardserve.config import home

        self.root = Path(root) if root else home() / "steering"
        self.dir = self.root / "targets"

    def path(self, target_id: str) -> Path:
        if not target_id or "/" in target_id or target_id.startswith("."):
            raise ValueError(f"bad target id {target_id!r}")
        return self.dir / f"{target_id}.json"

    def get(self, target_id: str) -> Selection | None:
        p = self.path(target_id)
        if not p.exists():
            return None
        return Selection(**json.loads(p.read_text()))

    def put(self, sel: Selection) -> Path:
        p = self.path(sel.target_id)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(sel), f)
        os.replace(tmp, p)
        return p

    def delete(self, target_id: str) -> bool:
        p = self.path(target_id)
        if p.exists():
            p.unlink()
            return True
        return False

    def list(self) -> list[Selection]:
        return [Selection(**json.loads(p.read_text())) for p in sorted(self.dir.glob("*.json"))]

    def is_current(self, target, sae: SAE) -> bool:
        sel = self.get(target.id)
        return sel is not None and sel.version == target.version and sel.sae_fingerprint == sae.fingerprint()


class FeatureSelector:
    """Computes selections for policy targets against one model, SAE and retain corpus."""

    def __init__(self, model, tokenizer, sae: SAE, retain_texts: list[str], n: int = 50,
                 max_retain_rate: float = 0.01):
        from guardserve.steering.train import residual_activations

        self.model, self.tokenizer, self.sae, self.n = model, tokenizer, sae, n
        self.max_retain_rate = max_retain_rate
        self._fp = sae.fingerprint()
        self.retain_acts = residual_activations(model, tokenizer, retain_texts, sae.layer)

    def select(self, target) -> Selection:
        from guardserve.steering.train import residual_activations

        texts = target_texts(target, self.tokenizer)
        acts = residual_activations(self.model, self.tokenizer, texts, self.sae.layer)
        feats, contrast, alpha = select_features(self.sae, acts, self.retain_acts, self.n,
                                                 max_retain_rate=self.max_retain_rate)
        return Selection(target.id, int(target.version), self._fp, self.sae.layer, feats, contrast, alpha,
                         sum(len(a) for a in acts), sum(len(a) for a in self.retain_acts),
                         {"n": self.n, "max_retain_rate": self.max_retain_rate})

    def ensure(self, store: SteeringStore, target, force: bool = False) -> tuple[Selection, bool]:
        """The target's stored selection, recomputed first when its policy version or the SAE
        changed (or ``force``). Returns (selection, recomputed)."""
        sel = store.get(target.id)
        if not force and sel and sel.version == target.version and sel.sae_fingerprint == self._fp \
                and sel.extra.get("n") == self.n and sel.extra.get("max_retain_rate") == self.max_retain_rate:
            return sel, False
        sel = self.select(target)
        store.put(sel)
        return sel, True
