"""RMU: representation misdirection at one decoder layer."""

from __future__ import annotations

from guardserve.unlearn.methods.base import Method


class RMU(Method):
    """Representation misdirection: at decoder layer ``layer`` push the activations of
    forget tokens toward a fixed random direction scaled to ``steering`` times their mean
    norm, and keep retain activations where the frozen model has them (MSE, weighted by
    ``alpha``). The scale is relative because activation norms differ across models (the
    paper's absolute coefficient 6.5 fits Zephyr-7B's layer 7)."""

    name = "RMU"
    uses_retain = True
    layer = -1  # -1: the middle layer
    steering = 4.0
    alpha = 100.0

    def setup(self, trainer) -> None:
        import torch

        n_layers = trainer.model.config.num_hidden_layers
        self._layer = n_layers // 2 if self.layer < 0 else self.layer
        gen = torch.Generator().manual_seed(trainer.config.seed)
        u = torch.rand(trainer.model.config.hidden_size, generator=gen)
        batch = trainer.forget_stream.next()
        with torch.no_grad(), trainer.reference():
            h = self._acts(trainer, batch)
        norm = h.norm(dim=-1)[batch["attention_mask"].bool()].mean()
        self._target = (u / u.norm()).to(h.device, h.dtype) * self.steering * norm

    def _acts(self, trainer, batch):
        out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        return out.hidden_states[self._layer + 1]

    def forget_loss(self, trainer, batch):
        mask = (batch["labels"] != -100).unsqueeze(-1).float()
        h = self._acts(trainer, batch)
        return (((h - self._target) ** 2) * mask).sum() / (mask.sum() * h.shape[-1])

    def retain_loss(self, trainer, batch):
        import torch

        mask = batch["attention_mask"].unsqueeze(-1).float()
        h = self._acts(trainer, batch)
        with torch.no_grad(), trainer.reference():
            ref = self._acts(trainer, batch)
        return self.alpha * (((h - ref) ** 2) * mask).sum() / (mask.sum() * h.shape[-1])
