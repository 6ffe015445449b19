"""Settings shared by every component, read from the environment (the README lists them)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """``$GUARDSERVE_HOME``: data, caches and the default policy store."""
    return Path(os.environ.get("GUARDSERVE_HOME", "~/.cache/guardserve")).expanduser()


def db_url() -> str:
    """``$GUARDSERVE_DB``: a SQLite path (default) or a ``postgresql://`` URL."""
    return os.environ.get("GUARDSERVE_DB") or str(home() / "policy.db")
