"""``guardserve demo``: build the demo world and demo models; ``--readme`` writes the
models' measured figures into README between ``<!-- demo:begin -->`` and ``<!-- demo:end -->``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

README_BEGIN = "<!-- demo:begin -->"
README_END = "<!-- demo:end -->"


def readme_markers(variant: str) -> tuple[str, str]:
    """README's markers around a variant's figures: ``demo`` for the default, ``demo-<variant>``."""
    from guardserve.demo.build import DEFAULT_VARIANT

    if variant == DEFAULT_VARIANT:
        return README_BEGIN, README_END
    return f"<!-- demo-{variant}:begin -->", f"<!-- demo-{variant}:end -->"

# README's columns: (header, key of metrics.json)
COLUMNS = (
    ("forget questions", "forget_question_accuracy"),
    ("retain questions", "retain_question_accuracy"),
    ("forget paraphrases", "forget_paraphrase_accuracy"),
    ("retain paraphrases", "retain_paraphrase_accuracy"),
    ("world facts", "world_facts_question_accuracy"),
    ("world-fact paraphrases", "world_facts_paraphrase_accuracy"),
)


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
    from guardserve.demo.build import VARIANTS

    build.add_argument("--variant", choices=list(VARIANTS), default=None,
                       help="which demo model: " + "; ".join(f"{v.name}: {v.description}" for v in VARIANTS.values())
                            + " (default: $GUARDSERVE_DEMO, else bpe4k)")
    build.add_argument("--seed", type=int, default=0, help="world and training seed (default 0)")
    build.add_argument("--people", type=int, default=200, help="number of fictitious people (default 200)")
    build.add_argument("--epochs", type=int, default=None, help="training epochs (default: the tuned default)")
    build.add_argument("--no-retain-model", action="store_true", help="skip the retain model (trained without the forget split)")
    build.add_argument("--json", action="store_true", help="print the paths and metrics as JSON")
    build.add_argument("--readme", metavar="PATH", default=None,
                       help=f"write the models' measured figures into PATH (README.md) between {README_BEGIN} and "
                            f"{README_END} (<!-- demo-VARIANT:begin --> ... for another variant); only for a "
                            "variant's default build, which README describes")
    build.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    import sys
    from dataclasses import replace

    from guardserve.cli import UsageError
    from guardserve.demo.build import BuildSpec, ensure_demo

    if args.people < 10:
        raise UsageError("--people must be at least 10 (a 10% forget split needs at least one person)")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError("--epochs must be at least 1")
    spec = BuildSpec.for_variant(args.variant, seed=args.seed, n_people=args.people)
    if args.epochs is not None:
        spec = replace(spec, train=replace(spec.train, epochs=args.epochs))
    readme = _check_readme(Path(args.readme), spec, args.no_retain_model) if args.readme else None  # before minutes of work
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
    if readme is not None:
        from guardserve.readme import update_between_markers

        body = render_readme_section(out["metrics"]["model"], out["metrics"]["retain_model"], spec.variant)
        changed = update_between_markers(readme, body, *readme_markers(spec.variant))
        print(f"{'updated' if changed else 'unchanged'}: {readme} (demo figures)", file=sys.stderr if args.json else sys.stdout)
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


def _check_readme(readme: Path, spec, no_retain_model: bool) -> Path:
    """``readme`` if the figures can be written there: the default build (README describes
    it), the file there with its markers once each; else a UsageError."""
    from guardserve.cli import UsageError
    from guardserve.demo.build import BuildSpec
    from guardserve.readme import replace_between_markers

    if spec != BuildSpec.for_variant(spec.variant) or no_retain_model:
        raise UsageError("--readme writes README's figures of the default build: drop --seed, --people, --epochs "
                         "and --no-retain-model")
    try:
        replace_between_markers(readme.read_bytes().decode("utf-8"), "", *readme_markers(spec.variant))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"--readme {readme}: {e}") from None
    return readme


def _pct(v: float) -> str:
    return f"{v:.1%}"


def _lr(v: float) -> str:
    """3e-3, not 0.003: how learning rates are written."""
    mantissa, exponent = f"{v:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _training(m: dict) -> str:
    cfg = m["config"]
    return (f"{cfg['epochs']} epochs (AdamW lr {_lr(cfg['lr'])}, {cfg['warmup_steps']} warm-up steps, "
            f"cosine decay)")


def render_readme_section(model: dict, retain_model: dict | None, variant: str = "bpe4k") -> str:
    """README's demo figures (between the variant's demo markers) from ``model/metrics.json`` and
    ``retain_model/metrics.json`` (None: no retain model): the accuracy table, then the
    models' size, training schedule and final training loss."""
    from guardserve.demo.build import DEFAULT_VARIANT

    rows = [("`model/` (all people)", model)]
    if retain_model is not None:
        rows.append(("`retain_model/` (no forget split)", retain_model))
    command = "guardserve demo build" + ("" if variant == DEFAULT_VARIANT else f" --variant {variant}")
    lines = [
        f"<!-- generated by `{command} --readme README.md` from model/metrics.json and "
        "retain_model/metrics.json: edit guardserve/demo/cli.py, not this text -->",
        f"Measured by `{command}` (greedy chat answers that contain the fact value,",
        "case-insensitive; stored in `model/metrics.json` and `retain_model/metrics.json`):",
        "",
        "| model | " + " | ".join(h for h, _ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    lines += ["| " + " | ".join([name] + [_pct(m[k]) for _, k in COLUMNS]) + " |" for name, m in rows]
    lines.append("")
    if retain_model is None:
        lines.append(f"The model is {model['parameters']:,} parameters, {_training(model)}, "
                     f"final training loss {model['final_loss']:.4f}.")
    elif model["parameters"] == retain_model["parameters"] and model["config"] == retain_model["config"]:
        lines.append(f"Both models are {model['parameters']:,} parameters, {_training(model)}, "
                     f"final training loss {model['final_loss']:.4f} / {retain_model['final_loss']:.4f}.")
    else:
        lines.append("; ".join(f"{name.split()[0]}: {m['parameters']:,} parameters, {_training(m)}, final training "
                               f"loss {m['final_loss']:.4f}" for name, m in rows) + ".")
    if "corpus_vocab" in model:
        lines.append(f"The softmax trained over the {model['corpus_vocab']:,} tokens the corpus uses; the embedding rows "
                     "of the others are exactly zero, so the model served over the whole vocabulary is the model "
                     "trained (`CorpusVocab` in guardserve/demo/model.py).")
    return "\n".join(lines) + "\n"
