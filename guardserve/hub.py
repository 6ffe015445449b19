"""Where a model comes from: a local Hugging Face folder, or a Hugging Face Hub repo id.

Every command that takes a model (``serve``, ``unlearn``, ``eval``, ``sae``, ``eval detect``)
resolves it here, so they all accept the same things and refuse the same mistakes with the same
message. A repo id is passed on unchanged: transformers and vLLM read it from the local
Hugging Face cache or download it. With ``HF_HUB_OFFLINE=1`` (or no network, as on a locked-down
host), a repo id must already be in the cache.

>>> resolve_model("/models/llama-3.2-1b")              # doctest: +SKIP
'/models/llama-3.2-1b'
>>> resolve_model("mistralai/Mistral-7B-Instruct-v0.3")  # doctest: +SKIP
'mistralai/Mistral-7B-Instruct-v0.3'
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFound(ValueError):
    """A model that is neither a model folder nor a usable repo id; the message says why."""


def is_repo_id(spec: str) -> bool:
    """``org/name`` as the Hub spells repo ids (not a path: no leading ``.``, ``/`` or ``~``)."""
    return bool(_REPO_ID.match(spec)) and ".." not in spec


def resolve_model(spec: str | Path) -> str:
    """A model folder (its absolute path), or a repo id (unchanged). Raises ModelNotFound for a
    folder without ``config.json``, for a path that does not exist and is no repo id, and for a
    repo id that is not in the local cache while the Hub is switched off (``HF_HUB_OFFLINE``)."""
    text = str(spec)
    local = Path(text).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelNotFound(f"{text}: no config.json there; give a Hugging Face model folder or a Hub repo id")
        return str(local.resolve())
    if not is_repo_id(text):
        raise ModelNotFound(f"{text}: no such folder, and not a Hub repo id (org/name)")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on") and not in_cache(text):
        raise ModelNotFound(f"{text}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set "
                            "(download it first, or give a model folder)")
    return text


def in_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds the repo's ``config.json``."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)
