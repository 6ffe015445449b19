"""Whether steering is on, and which SAE it uses; shared by the API process and the workers.

A request asks to be steered with ``guardserve_steer`` (:mod:`guardserve.contract`); steering
is on in both processes when the served guard configuration has it (``GUARDSERVE_GUARD=guard+sae``
or ``full``; ``guardserve serve --steering`` sets the first).
Kept free of torch so the API process imports it cheaply.
"""

from __future__ import annotations

import functools
from pathlib import Path


def steering_enabled() -> bool:
    from guardserve.guard.configs import server_config

    return server_config().steering


def sae_path() -> Path:
    """The SAE serving uses: ``$GUARDSERVE_SAE`` (a folder, or ``hf://org/name[@revision]``
    fetched into the local Hugging Face cache), else ``$GUARDSERVE_HOME/steering/sae``.
    Raises ArtifactError for a Hub URI that cannot be fetched."""
    from guardserve import config
    from guardserve.artifacts import is_hub_uri
    from guardserve.config import home

    value = config.get("GUARDSERVE_SAE")
    if value and is_hub_uri(value):
        return _fetched(value)
    return Path(value or home() / "steering" / "sae")


@functools.lru_cache(maxsize=4)
def _fetched(uri: str) -> Path:
    from guardserve.artifacts import fetch

    return fetch(uri)


def check_sae(path: Path) -> None:
    """Raise ArtifactError unless the SAE's files have the digest ``$GUARDSERVE_SAE_SHA256``
    (when it is set): every replica then steers with the very SAE its features were selected on."""
    from guardserve import config
    from guardserve.artifacts import verify

    expected = config.get("GUARDSERVE_SAE_SHA256")
    if expected:
        verify(path, expected)
