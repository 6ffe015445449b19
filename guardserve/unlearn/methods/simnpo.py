"""SimNPO: reference-free NPO on the length-normalised log-probability."""

from __future__ import annotations

from guardserve.unlearn.methods.base import Method


class SimNPO(Method):
    """Reference-free NPO on the length-normalised log-probability:
    -2/beta * log sigmoid(-beta * mean_t log p(y_t) - delta), plus retain NLL."""

    name = "SimNPO"
    uses_retain = True
    beta = 4.5
    delta = 0.0

    def forget_loss(self, trainer, batch):
        import torch

        logp, mask, _ = trainer.token_logps(trainer.model, batch)
        avg = logp.sum(1) / mask.sum(1).clamp(min=1)
        return (-2.0 / self.beta * torch.nn.functional.logsigmoid(-self.beta * avg - self.delta)).mean()
