"""Whether steering is on, and which SAE it uses; shared by the API process and the workers.

A request asks to be steered with ``guardserve_steer`` (:mod:`guardserve.contract`); steering
is on in both processes when the served guard configuration has it (``GUARDSERVE_GUARD=guard+sae``
or ``full``; ``guardserve serve --steering`` sets the first).
Kept free of torch so the API process imports it cheaply.
"""

from __future__ import annotations

from pathlib import Path


def steering_enabled() -> bool:
    from guardserve.guard.configs import server_config

    return server_config().steering


def sae_path() -> Path:
    """The SAE serving uses: ``$GUARDSERVE_SAE``, else ``$GUARDSERVE_HOME/steering/sae``."""
    from guardserve import config
    from guardserve.config import home

    return Path(config.get("GUARDSERVE_SAE") or home() / "steering" / "sae")
