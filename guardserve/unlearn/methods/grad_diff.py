"""GradDiff: gradient ascent on forget plus the NLL on retain."""

from __future__ import annotations

from guardserve.unlearn.methods.base import Method


class GradDiff(Method):
    """Gradient ascent on forget + gradient descent (NLL) on retain."""

    name = "GradDiff"
    uses_retain = True

    def forget_loss(self, trainer, batch):
        return -trainer.nll(trainer.model, batch)
