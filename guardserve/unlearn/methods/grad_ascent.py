"""GradAscent: gradient ascent on the forget answers, nothing else."""

from __future__ import annotations

from guardserve.unlearn.methods.base import Method


class GradAscent(Method):
    """Maximise the NLL of the forget answers."""

    name = "GradAscent"

    def forget_loss(self, trainer, batch):
        return -trainer.nll(trainer.model, batch)
