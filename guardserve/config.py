"""Every ``GUARDSERVE_*`` environment variable, declared once: its parser, default and meaning.

Components read settings with :func:`get` (``config.get("GUARDSERVE_GUARD")``), never from
``os.environ`` directly, so one parser decides what "on" means and the README's table of
settings is generated from :data:`SETTINGS` (``python -m guardserve.config --readme README.md``;
a test fails when the two differ). Values are read at each call: a test or a launcher that
sets a variable sees it at once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off", "")


def flag(raw: str) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` (any case); anything else is an error, not "off"."""
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ValueError(f"expected one of {', '.join(TRUE)} or {', '.join(v for v in FALSE if v)}, got {raw!r}")


def text(raw: str) -> str | None:
    return raw.strip() or None


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    shown_default: str = ""  # how the README shows a default that is computed

    def get(self) -> Any:
        raw = os.environ.get(self.name)
        if raw is None or (raw.strip() == "" and self.parse is not flag):
            return self.default
        try:
            return self.parse(raw)
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None


def _int(raw: str) -> int:
    return int(raw.strip())


def _name(raw: str) -> str:
    return raw.strip()


def _float(raw: str) -> float:
    return float(raw.strip())


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("GUARDSERVE_HOME", text, None, "data, caches, the demo build and the default policy store",
            "`~/.cache/guardserve`"),
    Setting("GUARDSERVE_DEMO", _name, "bpe4k", "the demo build commands use when no model is given: `bpe4k` (Llama, "
            "its own tokenizer) or `sp32k` (Mistral, Mistral 7B's SentencePiece tokenizer and [INST] template)"),
    Setting("GUARDSERVE_DB", text, None, "policy store: a SQLite path or a `postgresql://` URL",
            "`$GUARDSERVE_HOME/policy.db`"),
    Setting("GUARDSERVE_EMBEDDER_BACKEND", _name, "onnx-int8", "what runs the detector's sentence embedder on "
            "requests: `onnx-int8` (ONNX Runtime, the graph exported once to `$GUARDSERVE_HOME/cache/embedder` and "
            "quantised to int8: cosine >= 0.98 with torch's vectors, about 3x faster than `onnx` on a CPU), `onnx` "
            "(the same graph in float32: torch's vectors, about 4x faster than torch) or `torch`"),
    Setting("GUARDSERVE_DB_TIMEOUT_S", _float, 2.0, "how long a Postgres policy store call waits for a connection "
            "before it fails (the store is then reported unreachable; the pool keeps reconnecting)"),
    Setting("GUARDSERVE_MAX_POLICY_AGE_S", _float, 5.0, "a server whose policy was last confirmed against the store "
            "longer ago refuses guarded requests with `503` and fails `/health`, until the store answers again"),
    Setting("GUARDSERVE_API_KEYS", text, None, "inference keys, `key:tenant` pairs separated by commas; unset: no "
            "inference auth, tenant `default`"),
    Setting("GUARDSERVE_ADMIN_KEY", text, None, "guards `/v1/unlearning/*` and `/metrics`; unset: the admin API is off "
            "(the CLI still works)"),
    Setting("GUARDSERVE_METRICS_KEY", text, None, "a key for `/metrics` alone (a Prometheus scraper); without it and the "
            "admin key `/metrics` answers `403`"),
    Setting("GUARDSERVE_AUDIT_LOG", text, None, "where guarded requests are logged (JSON lines)",
            "`$GUARDSERVE_HOME/audit.jsonl`"),
    Setting("GUARDSERVE_GUARD", _name, "guard", "the guard configuration served (`guardserve.guard.configs`): `guard` "
            "(ICUL + token filter on triggered targets), `guard+semantic`, `guard+sae` (steering too), `full` "
            "(everything); `guardserve serve --guard` sets it"),
    Setting("GUARDSERVE_HIDDEN_STATE_MODEL", text, None, "a trained hidden-state classifier (GUARD's MLP; "
            "`guardserve eval detect --hidden-state M --save-classifier F`) that detection also consults"),
    Setting("GUARDSERVE_ALLOW_CLIENT_TEMPLATES", flag, False, "clients may send `chat_template` / "
            "`chat_template_kwargs` (the engine entry still reads the final prompt)"),
    Setting("GUARDSERVE_MAX_BODY_BYTES", _int, 16 * 1024 * 1024, "larger request bodies get `413`", "16 MiB"),
    Setting("GUARDSERVE_SAE", text, None, "the SAE that steering uses: an SAELens folder, or `hf://org/name[@revision]`",
            "`$GUARDSERVE_HOME/steering/sae`"),
    Setting("GUARDSERVE_SAE_SHA256", text, None, "the SAE's digest (`guardserve sae train` prints it); when set, "
            "a replica whose SAE files differ refuses to steer with them"),
    Setting("GUARDSERVE_STEERING_AUTOSELECT", flag, True, "with steering on, the server keeps feature selections "
            "current as targets change"),
    Setting("GUARDSERVE_STEER_CLAMP", _float, 100.0, "the value selected SAE features are clamped to"),
    Setting("GUARDSERVE_STEER_FEATURES", _int, 30, "SAE features selected per target"),
    Setting("GUARDSERVE_STEER_RETAIN_TEXTS", text, None, "a file of retain texts for feature selection",
            "the demo world's"),
    Setting("GUARDSERVE_ADAPTER_DIR", text, None, "where registered unlearning adapters are copied",
            "`$GUARDSERVE_HOME/adapters`"),
    Setting("GUARDSERVE_TARGET_RESOLVER", text, None, "`module:function` turning `guardserve_targets` into phrases "
            "in engine processes", "the policy store"),
    Setting("GUARDSERVE_RUN_TAG", text, None, "set by the test harness on every process it starts, to find "
            "leftovers; not a user setting"),
)}


def get(name: str) -> Any:
    """The value of a declared setting (its default when unset). Raises KeyError for an
    undeclared name and ValueError, naming the variable, for a value its parser refuses."""
    return SETTINGS[name].get()


def home() -> Path:
    """``$GUARDSERVE_HOME``: data, caches and the default policy store."""
    return Path(get("GUARDSERVE_HOME") or "~/.cache/guardserve").expanduser()


def db_url() -> str:
    """``$GUARDSERVE_DB``: a SQLite path (default) or a ``postgresql://`` URL."""
    return get("GUARDSERVE_DB") or str(home() / "policy.db")


README_BEGIN, README_END = "<!-- settings:begin -->", "<!-- settings:end -->"


def settings_table() -> str:
    """The README's table of settings."""
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for s in SETTINGS.values():
        if s.name == "GUARDSERVE_RUN_TAG":
            continue
        default = s.shown_default or ("unset" if s.default is None else
                                      ("on" if s.default is True else "off") if isinstance(s.default, bool)
                                      else f"`{s.default:g}`" if isinstance(s.default, float) else f"`{s.default}`")
        rows.append(f"| `{s.name}` | {default} | {s.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    # python -m guardserve.config --readme README.md: regenerate the README's settings table.
    if sys.argv[1:2] != ["--readme"] or len(sys.argv) != 3:
        print("usage: python -m guardserve.config --readme README.md", file=sys.stderr)
        sys.exit(2)
    from guardserve.readme import update_between_markers

    changed = update_between_markers(Path(sys.argv[2]), settings_table(), README_BEGIN, README_END)
    print(f"{sys.argv[2]}: settings table {'updated' if changed else 'already current'}")
