"""Unlearning methods: each gives the shared loop (trainer.py) a forget loss and, where it
uses one, a retain loss. Reference behaviour: locuslab/open-unlearning (GradAscent,
GradDiff, NPO, SimNPO, RMU); SHRED from the seeds. GU's projection is the loop's ``gu``
option, valid for every method.

Token log-probabilities are those of the answer tokens only (the question is never
trained on). The reference model of NPO, RMU and SHRED is the base model with the LoRA
adapter switched off, so no second copy of the model is held.

One file per method (``grad_ascent``, ``grad_diff``, ``npo``, ``simnpo``, ``rmu``,
``shred``), each a subclass of :class:`Method` (``base.py``). ``METHODS`` maps the
lower-cased ``name`` of each to its class, in the order the CLIs and benchmarks list and
run them; :func:`get_method` builds one by name (any case).

Adding a method: a new file here with a ``Method`` subclass (``name``, ``uses_retain``,
``forget_loss``; ``retain_loss``, ``setup``, ``default_config`` and float/int parameters
as class attributes where it needs them), plus its import and its entry in ``METHODS``
below (append it: the order of the others is kept). Then add its name to the training
test's parametrisation in ``tests/test_unlearn_methods.py``: ``tests/test_unlearn_registry.py``
checks that every registered method has a file of its own, that every method file is
registered, and that the training test runs each.
"""

from __future__ import annotations

from guardserve.unlearn.methods.base import Method
from guardserve.unlearn.methods.grad_ascent import GradAscent
from guardserve.unlearn.methods.grad_diff import GradDiff
from guardserve.unlearn.methods.npo import NPO
from guardserve.unlearn.methods.rmu import RMU
from guardserve.unlearn.methods.shred import SHRED
from guardserve.unlearn.methods.simnpo import SimNPO

METHODS = {m.name.lower(): m for m in (GradAscent, GradDiff, NPO, SimNPO, RMU, SHRED)}


def get_method(name: str, **params) -> Method:
    try:
        cls = METHODS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(m.name for m in METHODS.values())}") from None
    return cls(**params)


__all__ = ["GradAscent", "GradDiff", "METHODS", "Method", "NPO", "RMU", "SHRED", "SimNPO", "get_method"]
