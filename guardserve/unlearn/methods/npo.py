"""NPO: negative preference optimisation against the reference model (adapter off)."""

from __future__ import annotations

from guardserve.unlearn.methods.base import Method


class NPO(Method):
    """Negative preference optimisation: a DPO loss with only the losing side,
    -2/beta * log sigmoid(-beta * (log p_theta(y|x) - log p_ref(y|x))), plus retain NLL."""

    name = "NPO"
    uses_retain = True
    beta = 0.1

    def forget_loss(self, trainer, batch):
        import torch

        logp, _, _ = trainer.token_logps(trainer.model, batch)
        with torch.no_grad(), trainer.reference():
            ref, _, _ = trainer.token_logps(trainer.model, batch)
        ratio = logp.sum(1) - ref.sum(1)
        return (-2.0 / self.beta * torch.nn.functional.logsigmoid(-self.beta * ratio)).mean()
