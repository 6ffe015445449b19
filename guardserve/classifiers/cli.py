"""``guardserve eval detect``: the detection report on the demo world (a subcommand of
``guardserve eval``, which guardserve.eval.cli creates)."""

from __future__ import annotations

import json
from pathlib import Path


def register_detect(sub) -> None:
    """Adds ``detect`` under ``guardserve eval`` (the command is created by guardserve.eval.cli)."""
    det = sub.add_parser(
        "detect", help="recall, false positives and latency of detection on the demo world",
        description="Registers the demo world's forget people as targets, calibrates the embedding threshold, "
                    "and measures recall on forget questions, held-out paraphrases and adversarial probes "
                    "(RWKU's 9 types and obfuscations), false positives on retain questions and world facts, "
                    "and latency per conversation.")
    det.add_argument("--seed", type=int, default=0, help="demo world seed (default 0)")
    det.add_argument("--targets", type=int, default=None,
                     help="registered targets in all: the world's forget people plus synthetic ones up to N")
    det.add_argument("--no-embeddings", action="store_true", help="lexical matcher only")
    det.add_argument("--hidden-state", metavar="MODEL", nargs="?", const="demo",
                     help="also train and use GUARD's hidden-state MLP on MODEL (a Hugging Face model directory; "
                          "'demo' or no value: the demo model, built if missing)")
    det.add_argument("--save-classifier", metavar="FILE", default=None,
                     help="with --hidden-state: keep the trained MLP in FILE, for serving "
                          "(GUARDSERVE_HIDDEN_STATE_MODEL=FILE)")
    det.add_argument("--out", help="directory for detect.json and detect.md")
    det.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    det.set_defaults(func=_detect)


def _detect(args) -> int:
    from guardserve.classifiers.detector import DetectorConfig
    from guardserve.classifiers.evaluation import detection_report, markdown
    from guardserve.cli import UsageError
    from guardserve.demo.world import build_world

    if args.targets is not None and args.targets < 1:
        raise UsageError("--targets must be at least 1")
    cfg = DetectorConfig(use_embeddings=not args.no_embeddings)
    model = args.hidden_state
    if model == "demo":
        from guardserve.demo import ensure_demo

        model = ensure_demo(with_retain_model=False).model
    elif model is not None:
        from guardserve.hub import ModelNotFound, resolve_model

        try:
            model = resolve_model(model)
        except ModelNotFound as e:
            raise UsageError(f"--hidden-state {e}") from None
    if args.save_classifier and model is None:
        raise UsageError("--save-classifier saves the MLP that --hidden-state trains; add --hidden-state")
    if model is not None and args.no_embeddings:
        raise UsageError("--hidden-state needs the embedding retriever (it names the target); drop --no-embeddings")
    report = detection_report(build_world(seed=args.seed), n_targets=args.targets, config=cfg, hidden_state_model=model,
                              progress=lambda m: print(f"[eval detect] {m}", flush=True))
    if args.save_classifier:
        path = cfg.hidden_state.save(Path(args.save_classifier).expanduser())
        print(f"[eval detect] saved the hidden-state classifier to {path}; serve it with "
              f"GUARDSERVE_HIDDEN_STATE_MODEL={path}")
    md = markdown(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "detect.json").write_text(json.dumps(report, indent=2))
        (out / "detect.md").write_text(md + "\n")
        print(f"[eval detect] wrote {out / 'detect.json'} and {out / 'detect.md'}")
    print(json.dumps(report, indent=2) if args.json else md)
    return 0
