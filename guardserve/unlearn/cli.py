"""``guardserve unlearn`` (train an adapter) and ``guardserve adapters`` (the registry)."""

from __future__ import annotations

import argparse
import json

DEVICE_HELP = "where the model runs: auto (default) is cuda where CUDA is present, else cpu"
DTYPE_HELP = ("the model's weights: auto (default) is bfloat16 on cuda, float32 on cpu; "
              "float16 is refused on cpu")


def add_device_args(p: argparse.ArgumentParser, device_help: str = DEVICE_HELP, dtype_help: str = DTYPE_HELP) -> None:
    """``--device`` and ``--dtype`` (resolved by :func:`device_and_dtype`)."""
    from guardserve.unlearn.trainer import DEVICES, DTYPES

    p.add_argument("--device", default="auto", choices=DEVICES, help=device_help)
    p.add_argument("--dtype", default="auto", choices=DTYPES, help=dtype_help)


def device_and_dtype(args) -> tuple[str, str]:
    """The resolved ``(device, dtype)`` of ``--device`` / ``--dtype``; a choice this machine
    cannot run is a usage error."""
    from guardserve.cli import UsageError
    from guardserve.unlearn.trainer import resolve_device_dtype

    try:
        return resolve_device_dtype(args.device, args.dtype)
    except ValueError as e:
        raise UsageError(str(e)) from None


def register(sub: argparse._SubParsersAction) -> None:
    from guardserve.unlearn.methods import METHODS

    names = [m.name for m in METHODS.values()]
    p = sub.add_parser(
        "unlearn",
        help=f"unlearn targets into a LoRA adapter ({', '.join(names)})",
        description=(
            "Train a PEFT LoRA adapter that makes the model forget targets. Without --targets the "
            "demo world's forget split is forgotten on the demo model; --targets names targets "
            "registered in the policy store (ids or names). --gu projects the forget gradient "
            "orthogonally to recent retain gradients (GU). Training stops once forget accuracy falls "
            "to --stop-ratio of the base model's, or rolls back when retain accuracy falls below "
            "--min-retain of the base's. --register NAME adds the adapter to the registry, from "
            "which a running server loads it (POST /v1/unlearning/adapters/sync)."
        ),
    )
    p.add_argument("--method", required=True, help=" | ".join(names))
    p.add_argument("--out", required=True, help="folder for adapter_config.json + adapter_model.safetensors")
    p.add_argument("--model", default=None, help="base Hugging Face model folder (default: the demo model)")
    p.add_argument("--targets", nargs="+", default=None, help="registered target ids or names (default: the demo forget split)")
    p.add_argument("--retain-file", default=None, help="TOFU-format JSON list of QA pairs to keep (default: the demo retain split)")
    p.add_argument("--steps", type=int, default=None, help="most training steps (default 200)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lora-targets", default="all-linear", metavar="NAMES",
                   help="layers that get LoRA: all-linear (default: every linear layer but the output head, "
                        "whatever the architecture calls them) or comma-separated module names, e.g. q_proj,v_proj")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gu", action="store_true", help="GU: project forget updates orthogonally to the retain-gradient subspace")
    p.add_argument("--stop-ratio", type=float, default=None, help="stop when forget accuracy <= this share of the base's")
    p.add_argument("--min-retain", type=float, default=None, help="keep retain accuracy >= this share of the base's")
    p.add_argument("--param", action="append", default=[], metavar="K=V", help="a method parameter, e.g. beta=0.1 (repeatable)")
    p.add_argument("--register", default=None, metavar="NAME", help="also register the adapter under NAME")
    p.add_argument("--route", default="triggered", choices=["triggered", "all"],
                   help="registered adapter serves requests that trigger its targets (default) or all requests")
    add_device_args(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_unlearn)

    a = sub.add_parser("adapters", help="the unlearning-adapter registry (list, add, retire, quantization check)",
                       description="Adapters recorded in the policy store ($GUARDSERVE_DB). A running server picks "
                                   "changes up on POST /v1/unlearning/adapters/sync or loads directly through the admin API.")
    asub = a.add_subparsers(dest="adapters_command", metavar="ACTION")
    ls = asub.add_parser("list", help="registered adapters")
    ls.add_argument("--all", action="store_true", help="include retired ones")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)
    add = asub.add_parser("add", help="register an adapter folder (copied to a new versioned path)")
    add.add_argument("path")
    add.add_argument("--name", default=None)
    add.add_argument("--targets", nargs="+", default=None, help="registered target ids or names it covers")
    add.add_argument("--model", default=None, help="base model folder to check the adapter's shapes against")
    add.add_argument("--route", default="triggered", choices=["triggered", "all"])
    add.set_defaults(func=_add)
    rm = asub.add_parser("retire", help="retire an adapter (servers unload it on their next sync)")
    rm.add_argument("name")
    rm.set_defaults(func=_retire)
    q = asub.add_parser("quantize", help="quantization attack: merge, quantize to 8 and 4 bits, measure recovered knowledge",
                        description="Merge the adapter into its base model, quantize to each of --bits, and measure how "
                                    "much of what the adapter forgot comes back. Scored on the QA pairs of the targets "
                                    "the adapter was trained to forget (named in its guardserve_adapter.json, which "
                                    "`guardserve unlearn` writes; --targets overrides), with the demo world's retain "
                                    "pairs about other people when the base is a demo model.")
    q.add_argument("path", help="adapter folder")
    q.add_argument("--model", default=None, help="base model folder (default: the adapter's base model)")
    q.add_argument("--targets", nargs="+", default=None,
                   help="what the adapter forgets: registered target ids or names, or demo-world people "
                        "(default: the targets in the adapter's guardserve_adapter.json)")
    q.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    q.set_defaults(func=_quantize)
    a.set_defaults(func=lambda args: (a.print_help(), 2)[1])


def _method_params(items: list[str]) -> dict:
    from guardserve.cli import UsageError

    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--param {item!r}: expected K=V")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _unlearn(args) -> int:
    from pathlib import Path

    from guardserve.cli import UsageError
    from guardserve.unlearn import get_method, train_adapter
    from guardserve.unlearn.data import qa_pairs_for_targets

    try:
        method = get_method(args.method, **_method_params(args.param))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.rank < 1:
        raise UsageError(f"--rank {args.rank}: must be at least 1")
    from guardserve.unlearn.trainer import LoraTargetError, parse_lora_targets

    try:
        lora_targets = parse_lora_targets(args.lora_targets)
    except ValueError as e:
        raise UsageError(str(e)) from None
    device, dtype = device_and_dtype(args)
    world = None
    if args.model is None:
        from guardserve.demo import ensure_demo

        demo = ensure_demo()
        model_dir, world = demo.model, demo.load_world()
    else:
        from guardserve.hub import ModelNotFound, resolve_model

        try:
            model_dir = resolve_model(args.model)
        except ModelNotFound as e:
            raise UsageError(f"--model {e}") from None
    target_names: list[str] = []
    if args.targets:
        from guardserve.policy import TargetNotFoundError, open_store

        store = open_store()
        try:
            targets = [store.find(t) for t in args.targets]
        except TargetNotFoundError as e:
            raise UsageError(f"{e}; see 'guardserve targets list'") from None
        try:
            forget = qa_pairs_for_targets(targets, world)
        except ValueError as e:
            raise UsageError(str(e)) from None
        target_names = [x for t in targets for x in (t.id, t.name)]
        covered = {p["entity"].casefold() for p in forget}
        retain = [p for p in (world or {}).get("retain", []) if p["entity"].casefold() not in covered]
    elif world is not None:
        forget, retain = world["forget"], world["retain"]
        target_names = sorted({p["entity"] for p in forget})
    else:
        raise UsageError("--targets is required with --model (the demo forget split belongs to the demo model)")
    if args.retain_file:
        try:
            retain = json.loads(Path(args.retain_file).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"--retain-file {args.retain_file}: {e}") from None
    if method.uses_retain and not retain:
        raise UsageError(f"{method.name} needs retain data: pass --retain-file, or use GradAscent or SHRED")
    try:
        result, out = train_adapter(
            method, model_dir, forget, retain, args.out, world_facts=(world or {}).get("world_facts"), targets=target_names,
            rank=args.rank, seed=args.seed, gu=args.gu, progress=not args.no_progress,
            overrides={"max_steps": args.steps, "lr": args.lr, "stop_ratio": args.stop_ratio, "min_retain": args.min_retain,
                       "device": device, "dtype": dtype, "target_modules": lora_targets})
    except LoraTargetError as e:
        raise UsageError(f"--lora-targets {e}") from None
    print(f"{method.name}: {result.steps} steps, {result.seconds:.1f}s, stopped: {result.stop_reason}; "
          f"forget accuracy {result.base_probe['forget']} -> {result.probe['forget']}, "
          f"retain probe {result.base_probe['retain']} -> {result.probe['retain']}")
    print(f"LoRA on {', '.join(result.lora_modules)}")
    print(f"adapter written to {out}")
    if args.register:
        rec = _registry().register(out, name=args.register, route=args.route, actor="cli")
        print(f"registered as {rec['lora_name']} at {rec['path']}")
    return 0


def _registry():
    from guardserve.policy import open_store
    from guardserve.unlearn.registry import AdapterRegistry

    return AdapterRegistry(open_store())


def _list(args) -> int:
    recs = _registry().list(include_retired=args.all)
    if args.json:
        print(json.dumps(recs, indent=2))
        return 0
    if not recs:
        print("no adapters registered")
    for r in recs:
        print(f"{r['lora_name']:<28} {r['status']:<8} {str(r.get('method')):<10} route={r['route']:<9} "
              f"rank={r.get('rank')} targets={len(r.get('targets', []))} {r['path']}")
    return 0


def _add(args) -> int:
    from guardserve.cli import UsageError
    from guardserve.policy import TargetNotFoundError
    from guardserve.unlearn.registry import AdapterError

    reg = _registry()
    targets = None
    if args.targets:
        try:
            found = [reg.store.find(t) for t in args.targets]
        except TargetNotFoundError as e:
            raise UsageError(str(e)) from None
        targets = [x for t in found for x in (t.id, t.name)]
    try:
        rec = reg.register(args.path, name=args.name, targets=targets, route=args.route, base_model=args.model)
    except AdapterError as e:
        raise UsageError(str(e)) from None
    print(f"registered {rec['lora_name']} at {rec['path']}")
    return 0


def _retire(args) -> int:
    from guardserve.cli import UsageError
    from guardserve.unlearn.registry import AdapterError

    try:
        rec = _registry().retire(args.name)
    except AdapterError as e:
        raise UsageError(str(e)) from None
    print(f"retired {rec['lora_name']}")
    return 0


def _adapter_targets(path) -> list[str]:
    """The target names and ids an adapter folder's guardserve_adapter.json says it forgets."""
    from pathlib import Path

    from guardserve.cli import UsageError
    from guardserve.unlearn.trainer import META_FILE

    meta_file = Path(path) / META_FILE
    hint = "pass --targets with the target ids or names it forgets"
    if not meta_file.is_file():
        raise UsageError(f"{path} was not written by `guardserve unlearn` (no {META_FILE}, so what it forgets "
                         f"is unknown); {hint}")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{meta_file}: unreadable ({e}); {hint}") from None
    targets = meta.get("targets") if isinstance(meta, dict) else None
    if not targets or not all(isinstance(t, str) for t in targets):
        raise UsageError(f"{path} was not written by `guardserve unlearn` with targets ({META_FILE} names none); {hint}")
    return list(targets)


def _demo_world_of(model_dir) -> dict | None:
    """The demo world when ``model_dir`` is one of a demo build's models, else None."""
    from pathlib import Path

    from guardserve.demo import DemoPaths

    model = Path(model_dir).expanduser().resolve()
    paths = DemoPaths(model.parent)
    if model not in (paths.model, paths.retain_model) or not (paths.world / "forget.json").is_file():
        return None
    return paths.load_world()


def _quantize_pairs(names: list[str], world: dict | None) -> tuple[list[dict], list[dict]]:
    """``(forget, retain)`` QA pairs for the quantization check: the pairs about ``names``
    (demo-world people by name, or targets registered in the policy store by id or name,
    as ``guardserve unlearn --targets`` finds them), and the world's retain pairs about
    everyone else."""
    from guardserve.cli import UsageError
    from guardserve.policy import TargetNotFoundError, open_store
    from guardserve.unlearn.data import qa_pairs_for_targets

    people = {p["entity"].casefold() for split in ("forget", "retain") for p in (world or {}).get(split, [])}
    entities: set[str] = set()
    registered: dict = {}
    missing: list[str] = []
    store = None
    try:
        for name in names:
            if name.casefold() in people:
                entities.add(name.casefold())
                continue
            if store is None:
                store = open_store()
            try:
                target = store.find(name)
            except TargetNotFoundError:
                missing.append(name)
                continue
            registered.setdefault(target.id, target)
    finally:
        if store is not None:
            store.close()
    if missing:
        where = "registered in the policy store ($GUARDSERVE_DB)" + (" nor people of the demo world" if world else "")
        raise UsageError(f"targets not {where}: {', '.join(map(repr, missing))}; see 'guardserve targets list', "
                         "or pass --targets")
    try:
        found = qa_pairs_for_targets(list(registered.values()), world)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if world:
        found += [p for split in ("forget", "retain") for p in world[split] if p["entity"].casefold() in entities]
    forget = list({id(p): p for p in found if "value" in p and "question" in p}.values())
    if not forget:
        raise UsageError(f"no questions to score: the targets {', '.join(map(repr, names))} have no facts "
                         "(texts alone cannot be scored)")
    covered = {p["entity"].casefold() for p in found} | {n.casefold() for t in registered.values() for n in t.all_names}
    retain = [p for p in (world or {}).get("retain", []) if p["entity"].casefold() not in covered]
    return forget, retain


def _quantize(args) -> int:

    from guardserve.cli import UsageError
    from guardserve.unlearn.quantize import quantization_recovery
    from guardserve.unlearn.registry import AdapterError, validate_adapter

    try:
        cfg = validate_adapter(args.path, args.model)
    except AdapterError as e:
        raise UsageError(str(e)) from None
    if any(not 2 <= b <= 16 for b in args.bits):
        raise UsageError(f"--bits {' '.join(map(str, args.bits))}: each must be between 2 and 16")
    names = args.targets or _adapter_targets(args.path)
    base = args.model or cfg.get("base_model_name_or_path")
    if base is None:
        from guardserve.demo import ensure_demo

        base = str(ensure_demo().model)
    from guardserve.hub import ModelNotFound, resolve_model

    try:
        base = resolve_model(base)
    except ModelNotFound as e:
        raise UsageError(f"base model {e}; pass --model") from None
    forget, retain = _quantize_pairs(names, _demo_world_of(base))
    out = quantization_recovery(base, args.path, bits=tuple(args.bits), forget_pairs=forget, retain_pairs=retain)
    print(json.dumps({"targets": names, "forget_questions": len(forget), "retain_questions": len(retain), **out},
                     indent=2))
    return 0
