"""``guardserve sae``: train an SAE, select per-target features, list what is stored."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from guardserve.demo import DemoPaths


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sae", help="SAE steering: train an SAE, select target features, list selections",
                       description="Sparse-autoencoder steering. `train` fits an SAE on a model's residual stream "
                                   "(SAELens format); `select` computes each registered target's features and gate "
                                   "for it (recomputed when the target's policy version or the SAE changes); `list` "
                                   "shows the stored selections. Serving applies them with `guardserve serve --steering`.")
    ssub = p.add_subparsers(dest="sae_command", metavar="ACTION")

    t = ssub.add_parser("train", help="train an SAE on a model's residual stream")
    t.add_argument("--model", default=None, help="Hugging Face model folder (default: the demo model)")
    t.add_argument("--texts", default=None, help="JSON list of strings or a text file, one document a line "
                                                 "(default: the demo world's biographies and QA turns)")
    t.add_argument("--layer", type=int, default=None, help="decoder layer whose output is read (default: the middle one)")
    t.add_argument("--architecture", default="jumprelu", choices=["relu", "topk", "jumprelu"])
    t.add_argument("--k", type=int, default=16, help="active features per token for topk (default 16)")
    t.add_argument("--d-sae", type=int, default=1024, help="number of features (default 1024)")
    t.add_argument("--epochs", type=int, default=6)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--sparsity", type=float, default=None,
                   help="L1 (relu) or L0 (jumprelu) coefficient (default: scaled to the activations)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="output folder (default: $GUARDSERVE_HOME/steering/sae, the one serving uses)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_train)

    s = ssub.add_parser("select", help="select each target's SAE features and gate α")
    s.add_argument("--targets", nargs="+", default=None, help="target ids or names (default: every registered target)")
    s.add_argument("--model", default=None, help="the served model's folder (default: the demo model)")
    s.add_argument("--sae", default=None, help="SAE folder or params.npz (default: $GUARDSERVE_SAE or $GUARDSERVE_HOME/steering/sae)")
    s.add_argument("--hook-layer", type=int, default=None, help="layer of a Gemma Scope params.npz (its file does not say)")
    s.add_argument("--retain-texts", default=None, help="JSON list of strings or a text file (default: the demo world's retain people)")
    s.add_argument("-n", "--num-features", type=int, default=30, help="features per target (default 30)")
    s.add_argument("--max-retain-rate", type=float, default=0.01,
                   help="skip features firing on more retain tokens than this (default 0.01)")
    s.add_argument("--force", action="store_true", help="recompute even where the stored selection is current")
    s.set_defaults(func=_select)

    ls = ssub.add_parser("list", help="stored selections and whether they are current")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def _usage(msg: str):
    from guardserve.cli import UsageError

    return UsageError(msg)


def _read_texts(path: str) -> list[str]:
    p = Path(path).expanduser()
    if not p.exists():
        raise _usage(f"no such file: {p}")
    raw = p.read_text()
    if p.suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise _usage(f"{p} is not valid JSON: {e}") from None
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise _usage(f"{p} must hold a JSON list of strings")
        return data
    return [line for line in raw.splitlines() if line.strip()]


def demo_of(model_path) -> DemoPaths | None:
    """The demo build a model folder belongs to (its ``model/`` or ``retain_model/``), or None."""
    from guardserve.demo import DemoPaths

    p = Path(model_path).expanduser()
    if p.name in ("model", "retain_model") and (p.parent / "world" / "entities.json").is_file():
        return DemoPaths(p.parent.resolve())
    return None


def _load_model(path: str | None, cap_threads: bool = True):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from guardserve.demo import ensure_demo

    demo = None
    if path is None:
        demo = ensure_demo()
        path = str(demo.model)
    elif not Path(path).expanduser().is_dir():
        raise _usage(f"--model must be a Hugging Face model folder: {path}")
    else:
        demo = demo_of(path)  # the demo model named by its folder (as `guardserve serve` passes it)
    if cap_threads:  # a command's own process; the server's upkeep leaves the process-wide setting alone
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    if not hasattr(getattr(model, "model", None), "layers"):
        raise _usage("steering needs a decoder with model.model.layers (Llama, Mistral, Qwen, Gemma, ...)")
    return model, tok, demo


def _train(args) -> int:
    import torch

    from guardserve.steering.flags import sae_path
    from guardserve.steering.train import default_layer, residual_activations, train_sae, world_corpus

    model, tok, demo = _load_model(args.model)
    if args.texts:
        texts = _read_texts(args.texts)
    elif demo is not None:
        texts = world_corpus(demo.load_world(), tok)
    else:
        raise _usage("--texts is required with --model (the demo world's texts only fit the demo model)")
    layer = default_layer(model) if args.layer is None else args.layer
    if not 0 <= layer < model.config.num_hidden_layers:
        raise _usage(f"--layer must be in 0..{model.config.num_hidden_layers - 1}")
    acts = torch.cat(residual_activations(model, tok, texts, layer, progress=not args.no_progress))
    print(f"{len(acts)} tokens from {len(texts)} texts, layer {layer}, d_in {acts.shape[1]}")
    sae, stats = train_sae(acts, d_sae=args.d_sae, architecture=args.architecture, k=args.k, layer=layer,
                           epochs=args.epochs, lr=args.lr, sparsity=args.sparsity, seed=args.seed,
                           progress=not args.no_progress,
                           metadata={"model_name": str(args.model or "guardserve-demo")})
    out = sae.save(Path(args.out).expanduser() if args.out else sae_path())
    print(f"saved {out}")
    print(f"reconstruction MSE {stats['mse']:.4f}  explained variance {stats['explained_variance']:.4f}  "
          f"mean L0 {stats['mean_l0']:.1f}  dead features {stats['dead_share']:.1%}  ({stats['tokens']} held-out tokens)")
    (out / "train_metrics.json").write_text(json.dumps(stats, indent=2) + "\n")
    return 0


def demo_retain_texts(world: dict, tokenizer) -> list[str]:
    """Retain texts for selection on the demo: the same templates ``target_texts`` uses, filled
    with every retain person, so that contrast isolates the person and not the template."""
    from guardserve.demo.world import biographies
    from guardserve.policy import ForgetTarget
    from guardserve.steering.features import target_texts

    out = []
    for e in world["entities"]:
        if e["split"] == "retain":
            out += target_texts(ForgetTarget(id="retain", name=e["name"], aliases=tuple(e["aliases"]),
                                             facts=e["facts"], texts=tuple(biographies(e))), tokenizer)
    return out


def load_sae(sae: str | Path | None = None, hook_layer: int | None = None):
    """The SAE at ``sae`` (default: the one serving uses, ``$GUARDSERVE_SAE`` or
    ``$GUARDSERVE_HOME/steering/sae``); UsageError when there is none."""
    from guardserve.steering.flags import sae_path
    from guardserve.steering.sae import SAE, hook_name_for_layer

    path = Path(sae).expanduser() if sae else sae_path()
    try:
        return SAE.load(path, hook_name=hook_name_for_layer(hook_layer) if hook_layer is not None else None)
    except FileNotFoundError as e:
        raise _usage(f"{e} (train one with `guardserve sae train`)") from None


def load_selector(model: str | None = None, sae=None, retain_texts: str | None = None, n: int = 30,
                  max_retain_rate: float = 0.01, cap_threads: bool = True):
    """The one way a :class:`FeatureSelector` is built, for ``guardserve sae select`` and for the
    server's selection upkeep (``guardserve.steering.upkeep``): the model with transformers on
    CPU (``None``: the demo model), the SAE (an :class:`SAE`, a path, or ``None`` for
    :func:`load_sae`'s default), and the retain corpus (a JSON list or a text file; by default,
    for the demo model, the demo world's retain people). Raises UsageError on a bad setting."""
    from guardserve.steering.features import FeatureSelector
    from guardserve.steering.sae import SAE

    if not isinstance(sae, SAE):
        sae = load_sae(sae)
    model_obj, tok, demo = _load_model(model, cap_threads)
    if sae.d_in != model_obj.config.hidden_size:
        raise _usage(f"the SAE reads {sae.d_in} dimensions, the model has {model_obj.config.hidden_size}")
    if not 0 <= sae.layer < model_obj.config.num_hidden_layers:
        raise _usage(f"the SAE reads layer {sae.layer}; the model has {model_obj.config.num_hidden_layers} layers")
    if retain_texts:
        retain = _read_texts(retain_texts)
    elif demo is not None:
        retain = demo_retain_texts(demo.load_world(), tok)
    else:
        raise _usage("retain texts are required for a model other than the demo model "
                     "(`--retain-texts`; for the server, GUARDSERVE_STEER_RETAIN_TEXTS)")
    return FeatureSelector(model_obj, tok, sae, retain, n=n, max_retain_rate=max_retain_rate)


def _select(args) -> int:
    from guardserve.policy import PolicyError, open_store
    from guardserve.steering.features import SteeringStore

    sae = load_sae(args.sae, args.hook_layer)
    with open_store() as store:
        try:
            targets = [store.find(t) for t in args.targets] if args.targets else store.list()
        except PolicyError as e:
            raise _usage(str(e)) from None
    if not targets:
        raise _usage("no targets registered (add some with `guardserve targets add`)")
    selector = load_selector(args.model, sae, args.retain_texts, n=args.num_features,
                             max_retain_rate=args.max_retain_rate)
    steering = SteeringStore()
    for t in targets:
        sel, fresh = selector.ensure(steering, t, force=args.force)
        print(f"{t.id}  {t.name!r} v{t.version}: {len(sel.features)} features, gate α {sel.alpha:.3f}"
              f"  ({'computed' if fresh else 'current'})")
    print(f"stored under {steering.dir}")
    return 0


def _list(args) -> int:
    from guardserve.policy import TargetNotFoundError, open_store
    from guardserve.steering.features import SteeringStore

    sels = SteeringStore().list()
    rows = []
    with open_store() as store:
        for s in sels:
            try:
                t = store.get(s.target_id)
                state = "current" if t.version == s.version else f"stale (target is v{t.version})"
                name = t.name
            except TargetNotFoundError:
                state, name = "target deleted", "?"
            rows.append({"target_id": s.target_id, "name": name, "version": s.version, "layer": s.layer,
                         "features": len(s.features), "alpha": s.alpha, "state": state})
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no selections stored (run `guardserve sae select`)")
    else:
        for r in rows:
            print(f"{r['target_id']}  {r['name']!r} v{r['version']}  layer {r['layer']}  "
                  f"{r['features']} features  α {r['alpha']:.3f}  {r['state']}")
    return 0
