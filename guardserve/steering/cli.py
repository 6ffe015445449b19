"""``guardserve sae``: train an SAE, select per-target features, list what is stored."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from guardserve.unlearn.cli import add_device_args  # the same --device / --dtype as `guardserve unlearn`

    p = sub.add_parser("sae", help="SAE steering: train an SAE, select target features, list selections",
                       description="Sparse-autoencoder steering. `train` fits an SAE on a model's residual stream "
                                   "(SAELens format); `select` computes each registered target's features and gate "
                                   "for it (recomputed when the target's policy version or the SAE changes); `list` "
                                   "shows the stored selections. Serving applies them with `guardserve serve --steering`.")
    ssub = p.add_subparsers(dest="sae_command", metavar="ACTION")

    t = ssub.add_parser("train", help="train an SAE on a model's residual stream")
    t.add_argument("--model", default=None, help="Hugging Face model folder (default: the demo model)")
    t.add_argument("--texts", default=None, help="JSON list of strings or a text file, one document a line "
                                                 "(default: the model folder's guardserve/sae_corpus.json; the demo models have one)")
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
    add_device_args(t)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_as_usage_errors(_train))

    s = ssub.add_parser("select", help="select each target's SAE features and gate α")
    s.add_argument("--targets", nargs="+", default=None, help="target ids or names (default: every registered target)")
    s.add_argument("--model", default=None, help="the served model's folder (default: the demo model)")
    s.add_argument("--sae", default=None, help="SAE folder or params.npz (default: $GUARDSERVE_SAE or $GUARDSERVE_HOME/steering/sae)")
    s.add_argument("--hook-layer", type=int, default=None, help="layer of a Gemma Scope params.npz (its file does not say)")
    s.add_argument("--retain-texts", default=None, help="JSON list of strings or a text file (default: the model folder's "
                        "guardserve/steering_retain.json; the demo models have one)")
    s.add_argument("-n", "--num-features", type=int, default=30, help="features per target (default 30)")
    s.add_argument("--max-retain-rate", type=float, default=0.01,
                   help="skip features firing on more retain tokens than this (default 0.01)")
    s.add_argument("--force", action="store_true", help="recompute even where the stored selection is current")
    add_device_args(s)
    s.set_defaults(func=_as_usage_errors(_select))

    ls = ssub.add_parser("list", help="stored selections and whether they are current")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def _usage(msg: str):
    from guardserve.cli import UsageError

    return UsageError(msg)


def _as_usage_errors(command):
    """Run ``command``; a steering setup error is the user's to fix: say it in one line."""
    def run(args) -> int:
        from guardserve.steering.loading import SteeringSetupError

        try:
            return command(args)
        except SteeringSetupError as e:
            raise _usage(str(e)) from None
    return run


def _model_path(path: str | None) -> str:
    """The model folder a command works on: ``--model``, else the demo model (built on first use)."""
    if path is not None:
        return path
    from guardserve.demo import ensure_demo

    return str(ensure_demo().model)


def _train(args) -> int:
    import torch

    from guardserve import config
    from guardserve.artifacts import digest, is_hub_uri
    from guardserve.steering.flags import sae_path
    from guardserve.steering.loading import CORPUS_FILES, load_model, model_corpus, read_texts
    from guardserve.steering.train import default_layer, residual_activations, train_sae
    from guardserve.unlearn.cli import device_and_dtype

    device, dtype = device_and_dtype(args)
    path = _model_path(args.model)
    model, tok = load_model(path, device=device, dtype=dtype)
    texts = read_texts(args.texts) if args.texts else model_corpus(path, "sae_corpus")
    if texts is None:
        raise _usage(f"--texts is required: {path} has no {CORPUS_FILES['sae_corpus']}")
    layer = default_layer(model) if args.layer is None else args.layer
    if not 0 <= layer < model.config.num_hidden_layers:
        raise _usage(f"--layer must be in 0..{model.config.num_hidden_layers - 1}")
    acts = torch.cat(residual_activations(model, tok, texts, layer, progress=not args.no_progress))
    print(f"{len(acts)} tokens from {len(texts)} texts, layer {layer}, d_in {acts.shape[1]}")
    sae, stats = train_sae(acts, d_sae=args.d_sae, architecture=args.architecture, k=args.k, layer=layer,
                           epochs=args.epochs, lr=args.lr, sparsity=args.sparsity, seed=args.seed,
                           progress=not args.no_progress,
                           metadata={"model_name": str(args.model or "guardserve-demo")})
    if not args.out and is_hub_uri(config.get("GUARDSERVE_SAE") or ""):
        raise _usage("GUARDSERVE_SAE names a Hugging Face repo, which this command cannot write to: give --out")
    out = sae.save(Path(args.out).expanduser() if args.out else sae_path())
    print(f"saved {out}")
    print(f"reconstruction MSE {stats['mse']:.4f}  explained variance {stats['explained_variance']:.4f}  "
          f"mean L0 {stats['mean_l0']:.1f}  dead features {stats['dead_share']:.1%}  ({stats['tokens']} held-out tokens)")
    (out / "train_metrics.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"digest {digest(out)} (set GUARDSERVE_SAE_SHA256 to it where several replicas serve this SAE)")
    return 0


def _select(args) -> int:
    from guardserve.policy import PolicyError, open_store
    from guardserve.steering.features import SteeringStore
    from guardserve.steering.loading import load_sae, load_selector
    from guardserve.unlearn.cli import device_and_dtype

    device, dtype = device_and_dtype(args)
    sae = load_sae(args.sae, args.hook_layer)
    with open_store() as store:
        try:
            targets = [store.find(t) for t in args.targets] if args.targets else store.list()
        except PolicyError as e:
            raise _usage(str(e)) from None
    if not targets:
        raise _usage("no targets registered (add some with `guardserve targets add`)")
    selector = load_selector(_model_path(args.model), sae, args.retain_texts, n=args.num_features,
                             max_retain_rate=args.max_retain_rate, device=device, dtype=dtype)
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
