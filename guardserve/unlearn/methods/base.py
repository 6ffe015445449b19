"""The interface every unlearning method implements (see the package docstring)."""

from __future__ import annotations

from abc import ABC, abstractmethod


class Method(ABC):
    name = ""
    uses_retain = False
    # UnlearnConfig fields this method trains best with (the CLI and bench start from them).
    default_config: dict = {}

    def __init__(self, **params):
        for k, v in params.items():
            if not hasattr(self, k):
                raise ValueError(f"{self.name}: unknown parameter {k!r}")
            setattr(self, k, type(getattr(self, k))(v))

    def setup(self, trainer) -> None:
        """Called once, after the adapter exists and before the first step."""

    @abstractmethod
    def forget_loss(self, trainer, batch):
        """The loss on a batch of forget answers (minimised by the loop)."""

    def retain_loss(self, trainer, batch):
        return trainer.nll(trainer.model, batch) if self.uses_retain else None
