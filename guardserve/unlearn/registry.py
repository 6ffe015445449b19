"""The adapter registry: which unlearning adapters exist, what they cover, where they live.

Records are kept in the policy store's settings (key ``unlearn.adapters``), so SQLite and
Postgres deployments share them and every change lands in the store's audit log. Each
registration copies the adapter folder to ``$GUARDSERVE_ADAPTER_DIR/<name>/v<version>`` (default
``$GUARDSERVE_HOME/adapters``):
a new path per version, because vLLM keeps prefix-cache blocks computed with an
adapter's old weights when it is reloaded from the same path.

A folder registered from a Hugging Face Hub repo (``hf://org/name[@revision]``) is not
copied: every replica fetches it from the Hub (or its local cache) by the pinned commit.

A record: ``name``, ``version``, ``path``, ``uri`` (what each replica loads: the copy's path,
on storage they all mount when there are several hosts, or the pinned ``hf://`` URI),
``sha256`` (the folder's digest, checked by each replica before loading; see
:mod:`guardserve.artifacts`), ``lora_name`` (what requests name as their
``model``: ``<name>-v<version>``), ``method``, ``base_model``, ``targets`` (target ids and
names it covers), ``route`` (``triggered``: only requests that trigger a covered target;
``all``: every request), ``rank``, ``metrics`` (at training time), ``status``
(``active`` | ``retired``), ``created_at``.

Every change is one atomic read-modify-write of that value (``PolicyStore.update_setting``),
so operators registering or retiring at the same instant, from any process or host, each
get their own version and no record is lost.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from guardserve import config

KEY = "unlearn.adapters"
ROUTES = ("triggered", "all")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class AdapterError(ValueError):
    """An adapter that cannot be registered or served (message says why)."""


def validate_adapter(path: str | Path, base_model: str | Path | None = None, max_rank: int | None = None) -> dict:
    """Check an adapter folder before anything loads it; returns its adapter_config.

    Catches what would otherwise fail deep inside vLLM: missing or unreadable files,
    weights whose shapes do not fit the base model (a different base), and a rank above
    what the server was started with (``--max-lora-rank``)."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: not a folder")
    cfg_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_file.is_file():
        raise AdapterError(f"{folder}: no adapter_config.json (not a PEFT LoRA adapter)")
    if not weights.is_file():
        raise AdapterError(f"{folder}: no adapter_model.safetensors")
    try:
        cfg = json.loads(cfg_file.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_file}: unreadable ({e})") from e
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"{folder}: peft_type {cfg.get('peft_type')!r}, only LORA adapters are served")
    rank = cfg.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"{cfg_file}: 'r' must be a positive integer, got {rank!r}")
    if max_rank is not None and rank > max_rank:
        raise AdapterError(f"{folder}: rank {rank} is above the server's --max-lora-rank {max_rank}")
    try:
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # a truncated or foreign file: safetensors raises its own types
        raise AdapterError(f"{weights}: unreadable safetensors file ({e})") from e
    if not shapes:
        raise AdapterError(f"{weights}: holds no tensors")
    if base_model is not None:
        _check_base(folder, shapes, Path(base_model))
    return cfg


def _check_base(folder: Path, shapes: dict, base: Path) -> None:
    """Every LoRA matrix must fit the base model's linear layer it patches, whatever the
    architecture calls its layers: the shapes come from the base's safetensors headers
    (nothing is loaded), or, for a folder without them, from config.json for the usual
    decoder names (``q_proj`` ... ``down_proj``; others are left to vLLM's own check)."""
    cfg_file = base / "config.json"
    if not cfg_file.is_file():
        return  # a hub name: vLLM checks the shapes when it loads
    mc = json.loads(cfg_file.read_text())
    # A multimodal config's sizes are its language model's; its vision tower has layers of its
    # own, so the layer count is only checked on a plain decoder's config.
    layers = None if mc.get("text_config") else mc.get("num_hidden_layers")
    weights = _base_weight_shapes(base)
    dims = _config_dims({**mc, **(mc.get("text_config") or {})}) if weights is None else {}
    modules: dict[str, dict[str, tuple[str, tuple]]] = {}  # module path -> side -> (key, shape)
    for key, shape in shapes.items():
        m = re.match(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if m and len(shape) == 2:
            modules.setdefault(m.group(1), {})[m.group(2)] = (key, shape)
    for module, sides in modules.items():
        found = _find_weight(weights, module) if weights is not None else None
        layer = re.search(r"(?:^|\.)layers\.(\d+)\.", module)
        if found is None and layer and layers is not None and int(layer.group(1)) >= layers:
            raise AdapterError(f"{folder}: adapter patches layer {layer.group(1)}, base model {base} has {layers} layers "
                               "(different base model)")
        if found is not None:
            # (in, out): a Linear stores its weight [out, in], GPT-2's Conv1D [in, out].
            fits = [(found[1], found[0]), (found[0], found[1])]
        elif weights is not None or re.search(r"\.(experts|shared_experts?)\.", module):
            # Named differently on disk than in transformers' module tree, or an expert (whose
            # size is not the config's intermediate_size): vLLM checks it when it loads.
            continue
        else:
            fits = [dims.get(module.rsplit(".", 1)[-1], (None, None))]
        got = (sides["A"][1][1] if "A" in sides else None, sides["B"][1][0] if "B" in sides else None)
        if any(all(w is None or g is None or g == w for g, w in zip(got, fit)) for fit in fits):
            continue
        d_in, d_out = fits[0]
        side = "A" if "A" in sides and d_in is not None and got[0] != d_in else "B"
        key, shape = sides[side]
        want = d_in if side == "A" else d_out
        raise AdapterError(f"{folder}: {key} has shape {list(shape)}, base model {base} needs {want} there "
                           "(different base model)")


def _base_weight_shapes(base: Path) -> dict[str, tuple[int, int]] | None:
    """``module path -> (out, in)`` of every 2-D ``.weight`` in the base's safetensors files
    (headers only); None where it has none or they cannot be read."""
    files = sorted(base.glob("*.safetensors"))
    if not files:
        return None
    out: dict[str, tuple[int, int]] = {}
    try:
        from safetensors import safe_open

        for file in files:
            with safe_open(str(file), "pt") as f:
                for k in f.keys():
                    shape = tuple(f.get_slice(k).get_shape())
                    if k.endswith(".weight") and len(shape) == 2:
                        out[k[: -len(".weight")]] = (int(shape[0]), int(shape[1]))
    except Exception:  # a damaged base is not the adapter's fault: vLLM reports it when it loads
        return None
    return out


def _find_weight(weights: dict[str, tuple[int, int]], module: str) -> tuple[int, int] | None:
    """The base weight's shape for an adapter's module path: the same path, or the one path
    that differs only by a leading prefix (``model.`` / ``language_model.`` wrappers)."""
    if module in weights:
        return weights[module]
    found = [v for k, v in weights.items() if k.endswith("." + module) or module.endswith("." + k)]
    return found[0] if len(found) == 1 else None


def _config_dims(mc: dict) -> dict[str, tuple]:
    """``module -> (in, out)`` of the usual decoder layers, from a config.json alone."""
    hidden, inter = mc.get("hidden_size"), mc.get("intermediate_size")
    heads, kv = mc.get("num_attention_heads"), mc.get("num_key_value_heads") or mc.get("num_attention_heads")
    head_dim = mc.get("head_dim") or (hidden // heads if hidden and heads else None)
    q = heads * head_dim if heads and head_dim else None
    kv_out = kv * head_dim if kv and head_dim else None
    if mc.get("kv_lora_rank") or mc.get("q_lora_rank"):  # multi-head latent attention: other shapes
        q = kv_out = None
    return {
        "q_proj": (hidden, q), "k_proj": (hidden, kv_out), "v_proj": (hidden, kv_out), "o_proj": (q, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }


class AdapterRegistry:
    """Adapters in the policy store; see the module docstring for a record's fields."""

    def __init__(self, store, root: str | Path | None = None):
        self.store = store
        self.root = Path(root or config.get("GUARDSERVE_ADAPTER_DIR") or config.home() / "adapters")

    def _all(self) -> dict:
        return dict(self.store.get_setting(KEY, {}) or {})

    def list(self, include_retired: bool = False) -> list[dict]:
        recs = sorted(self._all().values(), key=lambda r: (r["name"], r["version"]))
        return [r for r in recs if include_retired or r["status"] == "active"]

    def get(self, name: str) -> dict:
        rec = self._all().get(name)
        if rec is None:
            raise AdapterError(f"no adapter named {name!r}")
        return rec

    def register(self, src: str | Path, name: str | None = None, targets: list | None = None, route: str = "triggered",
                 base_model: str | None = None, actor: str = "cli") -> dict:
        """Validate, copy to a fresh versioned folder (a Hub repo is pinned, not copied), and
        record the adapter (active) with its checksum. Registering an existing name makes a new
        version that replaces the old one."""
        from guardserve.artifacts import digest, is_hub_uri, pin

        hub = is_hub_uri(str(src))
        if hub:
            src, uri = pin(str(src))
        src = Path(src)
        meta = {}
        if (src / "guardserve_adapter.json").is_file():
            meta = json.loads((src / "guardserve_adapter.json").read_text())
        base_model = base_model or meta.get("base_model")
        cfg = validate_adapter(src, base_model)
        name = name or f"unlearn-{str(meta.get('method', 'adapter')).lower()}"
        if not _NAME.match(name):
            raise AdapterError(f"adapter name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        if route not in ROUTES:
            raise AdapterError(f"route must be one of {ROUTES}, got {route!r}")
        staging = None
        if not hub:
            # Copied before the transaction (a copy can take seconds), moved into place inside it.
            staging = self.root / name / f".staging-{os.getpid()}-{time.time_ns()}"
            staging.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, staging)
        checksum = digest(staging or src)

        def add(records):
            records = dict(records or {})
            version = records[name]["version"] + 1 if name in records else 1
            if staging is None:
                path, where = str(src), uri
            else:
                dest = self.root / name / f"v{version}"
                if dest.exists():  # left over from a registration whose record was lost: never reuse a path
                    dest = self.root / name / f"v{version}-{time.time_ns()}"
                staging.rename(dest)
                path = where = str(dest.resolve())
            rec = {
                "name": name, "version": version, "lora_name": f"{name}-v{version}", "path": path, "uri": where,
                "sha256": checksum,
                "method": meta.get("method"), "base_model": base_model or cfg.get("base_model_name_or_path"),
                "targets": list(targets if targets is not None else meta.get("targets", [])),
                "route": route, "rank": cfg.get("r"),
                "metrics": {k: meta.get(k) for k in ("probe", "base_probe", "train_seconds", "steps")},
                "status": "active", "created_at": time.time(),
            }
            records[name] = rec
            return records, rec

        try:
            return self.store.update_setting(KEY, add, actor=actor)
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)  # gone already unless the registration failed

    def retire(self, name: str, actor: str = "cli") -> dict:
        def mark(records):
            records = dict(records or {})
            if name not in records:
                raise AdapterError(f"no adapter named {name!r}")
            records[name] = {**records[name], "status": "retired"}
            return records, records[name]

        return self.store.update_setting(KEY, mark, actor=actor)


def covers(record: dict, target) -> bool:
    """Does the adapter cover this ForgetTarget (by id, or by name or alias)?"""
    from guardserve.policy import name_key

    keys = {name_key(str(t)) for t in record.get("targets", [])}
    return target.id in record.get("targets", []) or any(name_key(n) in keys for n in target.all_names)


def choose_adapter(records: list[dict], triggered_targets: list) -> str | None:
    """The ``lora_name`` to serve a request with: the active adapter covering the most of
    the triggered targets (ties: the newest); failing that, an ``all``-route adapter;
    None when no adapter applies."""
    best, best_key = None, None
    for rec in records:
        if rec.get("status") != "active":
            continue
        n = sum(covers(rec, t) for t in triggered_targets)
        if n == 0 and rec.get("route") != "all":
            continue
        key = (n, rec.get("created_at", 0))
        if best_key is None or key > best_key:
            best, best_key = rec["lora_name"], key
    return best
