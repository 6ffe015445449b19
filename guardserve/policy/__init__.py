"""Forget targets: the model, its validation, the store (SQLite or Postgres) and the audit log.

>>> from guardserve.policy import open_store
>>> store = open_store(":memory:")          # doctest: +SKIP
>>> t = store.add({"name": "Ada Quill", "aliases": ["Quill"]})  # doctest: +SKIP
"""

from guardserve.policy.model import (
    KINDS,
    MODES,
    AuditEntry,
    DuplicateTargetError,
    ForgetTarget,
    PolicyError,
    StoreUnavailableError,
    TargetNotFoundError,
    ValidationError,
    VersionConflictError,
    name_key,
    validate_spec,
)
from guardserve.policy.store import PolicyStore, PostgresStore, SQLiteStore, open_store

__all__ = [
    "KINDS", "MODES", "AuditEntry", "DuplicateTargetError", "ForgetTarget", "PolicyError", "PolicyStore",
    "PostgresStore", "SQLiteStore", "StoreUnavailableError", "TargetNotFoundError", "ValidationError", "VersionConflictError",
    "name_key", "open_store", "validate_spec",
]
