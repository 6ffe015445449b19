"""The request flag that asks workers to steer, shared by the API process and the workers.

``vllm_xargs["guardserve_steer"]`` is a JSON list of ``[target id, policy version]`` pairs (or
of bare ids); ``GUARDSERVE_STEERING=1`` turns steering on in both processes
(``guardserve serve --steering`` sets it). Kept free of torch so the API process imports it
cheaply.
"""

from __future__ import annotations

import json
from pathlib import Path

STEER_KEY = "guardserve_steer"


def steering_enabled() -> bool:
    from guardserve import config

    return config.get("GUARDSERVE_STEERING")


def sae_path() -> Path:
    """The SAE serving uses: ``$GUARDSERVE_SAE``, else ``$GUARDSERVE_HOME/steering/sae``."""
    from guardserve import config
    from guardserve.config import home

    return Path(config.get("GUARDSERVE_SAE") or home() / "steering" / "sae")


def parse_flag(value) -> list[tuple[str, int | None]]:
    """``(target id, policy version or None)`` pairs from a ``guardserve_steer`` value: a JSON
    list of ids or of ``[id, version]`` pairs, or a single id."""
    if value is None or value == "" or value is False:
        return []
    items = value if isinstance(value, (list, tuple)) else None
    if items is None:
        text = str(value).strip()
        items = json.loads(text) if text.startswith("[") else [text]
    out = []
    for item in items:
        if isinstance(item, (list, tuple)):
            if len(item) != 2:
                raise ValueError(f"bad steering entry {item!r}")
            out.append((str(item[0]), int(item[1])))
        else:
            out.append((str(item), None))
    return out
