"""The forget target: what an operator registers, and the validation of what they send.

Validation lives here, not in the stores, so that the CLI, the admin API and both
stores reject the same inputs with the same messages.
"""

from __future__ import annotations

import json
import re
import unicodedata
import uuid
from dataclasses import asdict, dataclass, field

KINDS = ("person", "work", "topic", "document")
MODES = ("detected", "always")

# Limits: generous for real use, small enough that one request cannot bloat the store
# or the detector's index (a 10 MB alias list is refused, not truncated).
MAX_NAME = 256
MAX_ALIASES = 256
MAX_ALIAS = 256
MAX_DESCRIPTION = 4_000
MAX_FACTS = 256
MAX_FACT_KEY = 128
MAX_FACT_VALUE = 1_000
MAX_TEXTS = 64
MAX_TEXT = 20_000
MAX_BODY_BYTES = 256 * 1024

_TENANT_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
FIELDS = ("name", "tenant", "aliases", "kind", "description", "facts", "texts", "mode")


class PolicyError(Exception):
    """Base of every error the policy package raises on purpose."""


class StoreUnavailableError(PolicyError):
    """The store cannot be reached (the database is down or unreachable); nothing was changed."""


class ValidationError(PolicyError, ValueError):
    """The input is malformed; the message names the field and the problem."""


class DuplicateTargetError(PolicyError):
    """A target of that name already exists for the tenant."""


class TargetNotFoundError(PolicyError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "target not found"


class VersionConflictError(PolicyError):
    """The target changed since the version the caller read (optimistic concurrency)."""


def name_key(name: str) -> str:
    """The form under which names are unique per tenant: NFKC, case-folded, single spaces."""
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def _check_text(field_name: str, value, max_len: int, multiline: bool = False) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{field_name}: expected a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise ValidationError(f"{field_name}: too long ({len(value)} characters, at most {max_len})")
    for ch in value:
        cat = unicodedata.category(ch)
        # Cc = control characters, Cs = lone surrogates (not valid UTF-8), Co/Cn rarely
        # intended. Newlines and tabs are fine in free text, never in names.
        if cat in ("Cc", "Cs") and not (multiline and ch in "\n\t\r"):
            raise ValidationError(f"{field_name}: contains a control character (U+{ord(ch):04X})")
    return value


def _check_list(field_name: str, value, max_items: int, max_len: int, multiline: bool = False) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValidationError(f"{field_name}: expected a list of strings")
    if len(value) > max_items:
        raise ValidationError(f"{field_name}: too many items ({len(value)}, at most {max_items})")
    out = []
    for i, item in enumerate(value):
        item = _check_text(f"{field_name}[{i}]", item, max_len, multiline).strip()
        if item:
            out.append(item)
    return out


def validate_tenant(tenant) -> str | None:
    """``None`` (or empty) is a global target; otherwise a short identifier."""
    if tenant is None or tenant == "":
        return None
    if not isinstance(tenant, str) or not _TENANT_RE.match(tenant):
        raise ValidationError("tenant: expected 1-64 characters of letters, digits, '_', '.', ':' or '-'")
    return tenant


def validate_spec(payload, partial: bool = False) -> dict:
    """Check a registration (or, with ``partial``, a change) and return it normalised.

    Raises :class:`ValidationError` with a message naming the field.
    """
    if not isinstance(payload, dict):
        raise ValidationError("a target must be a JSON object")
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise ValidationError(f"unknown field(s): {', '.join(map(str, unknown))} (allowed: {', '.join(FIELDS)})")
    try:
        size = len(json.dumps(payload, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    except (TypeError, ValueError) as e:
        raise ValidationError(f"not JSON-serialisable: {e}") from None
    if size > MAX_BODY_BYTES:
        raise ValidationError(f"target too large ({size} bytes, at most {MAX_BODY_BYTES})")

    out: dict = {}
    if "name" in payload or not partial:
        name = _check_text("name", payload.get("name"), MAX_NAME).strip() if payload.get("name") is not None else ""
        if not name:
            raise ValidationError("name: must not be empty")
        out["name"] = " ".join(name.split())
    if "tenant" in payload and not partial:
        out["tenant"] = validate_tenant(payload.get("tenant"))
    elif "tenant" in payload and partial:
        raise ValidationError("tenant: cannot be changed; delete and register the target again")
    if "aliases" in payload or not partial:
        aliases = _check_list("aliases", payload.get("aliases"), MAX_ALIASES, MAX_ALIAS)
        seen, uniq = set(), []
        for a in aliases:
            a = " ".join(a.split())
            if name_key(a) not in seen:
                seen.add(name_key(a))
                uniq.append(a)
        out["aliases"] = uniq
    if "kind" in payload or not partial:
        kind = payload.get("kind") or "person"
        if kind not in KINDS:
            raise ValidationError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        out["kind"] = kind
    if "mode" in payload or not partial:
        mode = payload.get("mode") or "detected"
        if mode not in MODES:
            raise ValidationError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        out["mode"] = mode
    if "description" in payload or not partial:
        desc = payload.get("description")
        out["description"] = "" if desc is None else _check_text("description", desc, MAX_DESCRIPTION, True).strip()
    if "facts" in payload or not partial:
        facts = payload.get("facts") or {}
        if not isinstance(facts, dict):
            raise ValidationError("facts: expected an object of attribute -> value")
        if len(facts) > MAX_FACTS:
            raise ValidationError(f"facts: too many ({len(facts)}, at most {MAX_FACTS})")
        clean = {}
        for k, v in facts.items():
            k = _check_text("facts key", k, MAX_FACT_KEY).strip()
            if not k:
                raise ValidationError("facts: empty attribute name")
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                v = str(v)
            v = _check_text(f"facts[{k}]", v, MAX_FACT_VALUE, True).strip()
            if v:
                clean[k] = v
        out["facts"] = clean
    if "texts" in payload or not partial:
        out["texts"] = _check_list("texts", payload.get("texts"), MAX_TEXTS, MAX_TEXT, multiline=True)
    return out


@dataclass(frozen=True)
class ForgetTarget:
    """One registered target. ``tenant`` None means it applies to every tenant."""

    id: str
    name: str
    tenant: str | None = None
    aliases: tuple[str, ...] = ()
    kind: str = "person"
    description: str = ""
    facts: dict = field(default_factory=dict)
    texts: tuple[str, ...] = ()
    mode: str = "detected"
    version: int = 1
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def all_names(self) -> list[str]:
        """The name followed by the aliases, without repeats."""
        seen, out = set(), []
        for n in (self.name, *self.aliases):
            if name_key(n) not in seen:
                seen.add(name_key(n))
                out.append(n)
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
        d["texts"] = list(self.texts)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ForgetTarget":
        return cls(
            id=d["id"], name=d["name"], tenant=d.get("tenant"), aliases=tuple(d.get("aliases") or ()),
            kind=d.get("kind", "person"), description=d.get("description", ""), facts=dict(d.get("facts") or {}),
            texts=tuple(d.get("texts") or ()), mode=d.get("mode", "detected"), version=int(d.get("version", 1)),
            created_at=float(d.get("created_at", 0.0)), updated_at=float(d.get("updated_at", 0.0)),
        )


def new_target_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class AuditEntry:
    """One line of the append-only audit log. ``target`` is the state after the change
    (None after a delete); ``seq`` orders all changes and lets replicas catch up."""

    seq: int
    at: float
    actor: str
    action: str  # "add" | "update" | "delete" | "setting"
    target_id: str | None
    tenant: str | None
    version: int | None
    target: dict | None

    def to_dict(self) -> dict:
        return asdict(self)
