"""``guardserve demo``: build the demo world and demo models."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="the demo world and demo models", description=__doc__)
    demo_sub = demo.add_subparsers(dest="demo_command", metavar="COMMAND", required=True)
    build = demo_sub.add_parser(
        "build",
        help="build (or find in the cache) the demo world, tokenizer, model and retain model",
        description=(
            "Generate the demo world from a seed and train the demo models on it. Results are cached "
            "under $GUARDSERVE_HOME/demo/<key> (key = hash of generator version, seed and settings): "
            "a second call returns at once. The default build takes a few minutes on 2 CPU cores."
        ),
    )
    build.add_argument("--seed", type=int, default=0, help="world and training seed (default 0)")
    build.add_argument("--people", type=int, default=200, help="number of fictitious people (default 200)")
    build.add_argument("--epochs", type=int, default=None, help="training epochs (default: the tuned default)")
    build.add_argument("--no-retain-model", action="store_true", help="skip the retain model (trained without the forget split)")
    build.add_argument("--json", action="store_true", help="print the paths and metrics as JSON")
    build.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from guardserve.cli import UsageError
    from guardserve.demo.build import BuildSpec, ensure_demo

    if args.people < 10:
        raise UsageError("--people must be at least 10 (a 10% forget split needs at least one person)")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError("--epochs must be at least 1")
    spec = BuildSpec(seed=args.seed, n_people=args.people)
    if args.epochs is not None:
        spec = replace(spec, train=replace(spec.train, epochs=args.epochs))
    paths = ensure_demo(spec, with_retain_model=not args.no_retain_model)
    out = {
        "root": str(paths.root),
        "world": {name: str(paths.world / f"{name}.json") for name in ("entities", "forget", "retain", "world_facts")},
        "model": str(paths.model),
        "retain_model": str(paths.retain_model) if paths.retain_model.is_dir() else None,
        "metrics": {
            "model": json.loads((paths.model / "metrics.json").read_text()),
            "retain_model": json.loads((paths.retain_model / "metrics.json").read_text()) if paths.retain_model.is_dir() else None,
        },
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"demo world:   {paths.world}")
    for name, p in out["world"].items():
        print(f"  {name:12s} {p}")
    print(f"model:        {paths.model}")
    if out["retain_model"]:
        print(f"retain model: {paths.retain_model}")
    m = out["metrics"]["model"]
    print(
        "memorisation (greedy chat answers containing the fact): "
        f"forget {m['forget_question_accuracy']:.1%}, retain {m['retain_question_accuracy']:.1%}, "
        f"paraphrases {m['forget_paraphrase_accuracy']:.1%}/{m['retain_paraphrase_accuracy']:.1%} (forget/retain), "
        f"world facts {m['world_facts_question_accuracy']:.1%}"
    )
    return 0
