"""The conditional clamp: suppress a target's SAE features in the residual stream.

Contract: ``clamp(sae, x, cols, value, where)`` returns ``decode(f') + err`` with
``err = x - decode(f)``, where ``f'`` equals ``f = encode(x)`` except that selected features
(``cols``) that fire (> 0) at a position allowed by ``where`` are set to ``-value``. Because the
error term is kept, this is ``x + (f' - f)[cols] @ W_dec[cols]``: positions and features that
are not clamped come back bit-identical. ``SequenceGate`` implements Dynamic SAE Guardrails'
per-sequence gate (clamp a target only once the share of a sequence's tokens on which any of
its features fires exceeds α), counting tokens across calls so that decode steps, which see
one token each, are gated on the whole sequence so far. ``SteeringHook`` installs all of it
on a transformers causal LM as forward hooks; the first position (BOS) is never counted or
changed, nor are padding positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from guardserve.steering.sae import SAE


def clamp_delta(sae: SAE, x: torch.Tensor, cols: torch.Tensor, value: float, where: torch.Tensor | None = None):
    """``(clamped residual) - x`` for ``x [T, d]``, and the per-position firing of each selected
    feature ``[T, len(cols)]`` (so a caller can gate on it without encoding twice)."""
    f = sae.encode_selected(x, cols)
    active = f > 0
    hit = active if where is None else active & where[:, None]
    new = torch.where(hit, torch.full_like(f, -float(value)), f)
    return ((new - f) @ sae.W_dec[cols]).to(x.dtype), active


def clamp(sae: SAE, x: torch.Tensor, cols, value: float, where: torch.Tensor | None = None) -> torch.Tensor:
    cols = torch.as_tensor(cols, dtype=torch.long)
    delta, _ = clamp_delta(sae, x, cols, value, where)
    out = x.clone()
    rows = torch.nonzero(delta.abs().sum(-1) > 0).flatten()
    # Only rows with a clamped feature are written, so the others stay bit-identical (adding a
    # zero delta could still turn -0.0 into 0.0).
    out[rows] = x[rows] + delta[rows]
    return out


@dataclass(frozen=True)
class TargetFeatures:
    """What steering needs of one target: its SAE features and its gate α."""

    target_id: str
    features: tuple[int, ...]
    alpha: float


class SequenceGate:
    """Running counts for one sequence: per target, tokens seen and tokens where any of the
    target's features fired."""

    def __init__(self):
        self.seen: dict[str, int] = {}
        self.fired: dict[str, int] = {}

    def update(self, target_id: str, n_tokens: int, n_fired: int) -> bool:
        self.seen[target_id] = self.seen.get(target_id, 0) + n_tokens
        self.fired[target_id] = self.fired.get(target_id, 0) + n_fired
        seen = self.seen[target_id]
        return seen > 0 and self.fired[target_id] / seen > self._alpha[target_id]

    def bind(self, targets: list[TargetFeatures]) -> "SequenceGate":
        self._alpha = {t.target_id: t.alpha for t in targets}
        return self


class Steerer:
    """Applies the clamp for a set of targets to a run of one sequence's tokens."""

    def __init__(self, sae: SAE, value: float):
        self.sae, self.value = sae, float(value)
        self._cols_cache: dict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def _cols(self, targets: list[TargetFeatures]):
        key = tuple((t.target_id, t.features) for t in targets)
        if key not in self._cols_cache:
            union = sorted({c for t in targets for c in t.features})
            pos = {c: i for i, c in enumerate(union)}
            dev = self.sae.W_enc.device
            self._cols_cache[key] = (torch.tensor(union, dtype=torch.long, device=dev),
                                     [torch.tensor([pos[c] for c in t.features], dtype=torch.long, device=dev)
                                      for t in targets])
        return self._cols_cache[key]

    def delta(self, x: torch.Tensor, targets: list[TargetFeatures], gate: SequenceGate,
              valid: torch.Tensor) -> torch.Tensor | None:
        """The change to ``x [T, d]`` (one sequence's tokens of this step), or None when no
        target's gate is open. ``valid`` marks the positions that count and may change."""
        if not targets:
            return None
        union, parts = self._cols(targets)
        f = self.sae.encode_selected(x, union)
        active = (f > 0) & valid[:, None]
        keep = torch.zeros(len(union), dtype=torch.bool, device=f.device)
        n_valid = int(valid.sum())
        for t, idx in zip(targets, parts):
            if gate.update(t.target_id, n_valid, int(active[:, idx].any(-1).sum())):
                keep[idx] = True
        if not keep.any():
            return None
        hit = active & keep[None, :]
        if not hit.any():
            return None
        new = torch.where(hit, torch.full_like(f, -self.value), f)
        return ((new - f) @ self.sae.W_dec[union]).to(x.dtype)


class SteeringHook:
    """Steering on a transformers causal LM (Llama-style ``model.model.layers``).

    ``with SteeringHook(model, sae, targets, value):`` steers every row of every forward pass
    inside the block; a forward pass over more than one new token starts new sequences (a
    prefill), a one-token pass continues them (a cached decode step)."""

    def __init__(self, model, sae: SAE, targets: list[TargetFeatures], value: float):
        self.model, self.sae, self.targets = model, sae, list(targets)
        self.steerer = Steerer(sae, value)
        self.gates: list[SequenceGate] = []
        self._valid: torch.Tensor | None = None
        self._seen = 0
        self._handles = []

    def _capture(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        B, T = ids.shape
        if T > 1 or len(self.gates) != B:
            self.gates = [SequenceGate().bind(self.targets) for _ in range(B)]
            self._seen = 0
        if mask is None:
            # No padding (transformers passes no mask): the sequence so far is all attended, so
            # this pass's tokens sit after the ones already seen, and position 0 is BOS.
            mask = torch.ones(B, self._seen + T, dtype=torch.long)
        self._seen = mask.shape[1]
        # Per row, the first attended position is BOS: never counted, never changed.
        first = mask.long().argmax(-1)
        total = mask.shape[1]
        positions = torch.arange(total - T, total)
        self._valid = (mask[:, -T:] > 0) & (positions[None, :] != first[:, None])

    def _steer(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        changed = False
        out = hidden
        for row in range(hidden.shape[0]):
            d = self.steerer.delta(hidden[row].float(), self.targets, self.gates[row], self._valid[row])
            if d is not None:
                if not changed:
                    out, changed = hidden.clone(), True
                out[row] = hidden[row] + d.to(hidden.dtype)
        if not changed:
            return None
        return (out, *output[1:]) if isinstance(output, tuple) else out

    def __enter__(self):
        inner = self.model.model
        self._handles = [inner.register_forward_pre_hook(self._capture, with_kwargs=True),
                         inner.layers[self.sae.layer].register_forward_hook(self._steer)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
