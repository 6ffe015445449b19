"""``guardserve eval``: every guard configuration on the demo world (or TOFU-format data and
a model you bring), written as results.json, report.md and plots; ``guardserve eval detect``
is the detection report."""

from __future__ import annotations

import argparse
from pathlib import Path

ADAPTER_PREFERENCE = ("SimNPO", "RMU", "GradDiff", "SHRED", "NPO", "GradAscent")


def register(subparsers) -> None:
    from guardserve.classifiers.cli import register_detect
    from guardserve.eval.runner import DEFAULT_CONFIGS
    from guardserve.guard.configs import ADAPTER_PREFIX, CONFIGS

    ev = subparsers.add_parser(
        "eval", help="evaluate every guard: forget efficacy, utility, attacks, latency (detect: detection only)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Scores guard configurations (guardserve/guard/configs.py) on one vLLM engine:\n"
                    + "".join(f"  {c.name:<16}{c.description}\n" for c in CONFIGS.values())
                    + f"  {ADAPTER_PREFIX + '<method>':<16}each unlearning adapter on every request\n"
                    + "By default: " + ", ".join(DEFAULT_CONFIGS) + ", every adapter:<method>, full.\n"
                    "Forget/paraphrase/retain/world accuracy, leak rate over attack probes (9 RWKU kinds,\n"
                    "multi-turn, many-shot, spelling/encodings, translation), ROUGE-L, truth ratio, forget quality\n"
                    "against the retain model, model utility, fluency, TTFT/TPOT; for adapters also training time\n"
                    "and the quantization attack (8- and 4-bit). Writes DIR/results.json, DIR/report.md,\n"
                    "DIR/pareto.png and DIR/latency.png.\n\n"
                    "Defaults: the demo model and world; its SAE is trained once (about a minute) and cached;\n"
                    "adapters are read from --adapters (train missing ones with --train-adapters, ~3 min each).\n"
                    "Bring your own: --model PATH --tofu DIR [--split forget01] [--targets targets.json]\n"
                    "[--retain-model PATH] [--sae DIR].",
        epilog="examples:\n  guardserve eval --out eval-demo\n  guardserve eval --quick --configs none,guard --out /tmp/e\n"
               "  guardserve eval --model ./my-llm --tofu ./TOFU --split forget05 --retain-model ./my-llm-retain")
    ev.add_argument("--out", default="guardserve-eval", help="output folder (default ./guardserve-eval)")
    ev.add_argument("--configs", default=None,
                    help="comma-separated configurations (default: all that can run here)")
    ev.add_argument("--model", default=None, help="Hugging Face model folder (default: the demo model)")
    ev.add_argument("--retain-model", default=None,
                    help="the same model trained without the forget set, for forget quality "
                         "(default: the demo retain model with the demo model; else none)")
    ev.add_argument("--tofu", default=None, metavar="DIR", help="TOFU-format data folder instead of the demo world")
    ev.add_argument("--split", default="forget01", help="TOFU forget split (forget01, forget05, forget10)")
    ev.add_argument("--targets", default=None, metavar="FILE",
                    help="with --tofu: targets as JSON [{name, aliases, facts}] (default: names read off the questions)")
    remote = ev.add_argument_group("a deployed server, as a black box over its OpenAI-compatible API "
                                   "(no model is loaded, no engine started)")
    remote.add_argument("--endpoint", metavar="URL", default=None,
                        help="evaluate the server at URL (e.g. http://127.0.0.1:8000): leaks of the data's forget "
                             "people (the demo's forget split, or --tofu), retain and world-fact accuracy, attack "
                             "probes, TTFT/TPOT; writes DIR/results.json (an \"endpoint\" section) and DIR/report.md")
    remote.add_argument("--api-key", metavar="KEY", default=None, help="with --endpoint: the server's inference API key")
    remote.add_argument("--model-name", metavar="NAME", default=None,
                        help="with --endpoint: the model name to request (default: the first the server lists)")
    remote.add_argument("--concurrency", type=int, default=8, help="with --endpoint: requests in flight (default 8)")
    remote.add_argument("--forget-limit", type=int, default=None,
                        help="with --endpoint: forget questions asked, spread over the people (default all; 40 with --quick)")
    ev.add_argument("--readme", metavar="PATH", default=None,
                    help="also write the results table into PATH (README.md) between <!-- eval:begin --> and "
                         "<!-- eval:end -->")
    ev.add_argument("--adapters", default=None, metavar="DIR",
                    help="folder of PEFT adapters, one subfolder per method (default $GUARDSERVE_HOME/eval/adapters, "
                         "or adapters-VARIANT with GUARDSERVE_DEMO=VARIANT)")
    ev.add_argument("--train-adapters", action="store_true",
                    help="train the missing adapters of the demo model first (all six methods)")
    ev.add_argument("--full-adapter", default=None, metavar="METHOD",
                    help="the adapter the `full` configuration uses (default: the first available of "
                         + ", ".join(ADAPTER_PREFERENCE) + "; 'none' for no adapter)")
    ev.add_argument("--sae", default=None, metavar="DIR",
                    help="SAE (SAELens folder) for `sae` and `full` (default with the demo: trained once and cached)")
    ev.add_argument("--clamp", type=float, default=100.0, help="steering clamp value (default 100)")
    ev.add_argument("--quant-bits", default="8,4", metavar="B,B",
                    help="the quantization attack on adapter:<method> rows: bit widths to round the merged "
                         "adapter to (default 8,4; 'none' skips it)")
    ev.add_argument("--relearn-steps", type=int, default=20, metavar="N",
                    help="the relearning attack on adapter:<method> rows: N steps of fine-tuning the merged adapter on "
                         "every 4th forget row, then the others asked again (default 20; 0 skips it)")
    ev.add_argument("--sequential", default=None, metavar="N,N,...",
                    help="sequential deletions: grow the policy to each count of targets in turn (the data's targets "
                         "first, then made-up ones), measuring forget/retain/world accuracy and TPOT through `guard` "
                         "after each step, e.g. 10,100,1000 (default: off)")
    ev.add_argument("--sequential-adapter", default=None, metavar="METHOD",
                    help="sequential deletions for training-based unlearning (demo model): the forget people as "
                         "--sequential-requests deletion requests; after each, a METHOD adapter trained on that request "
                         "alone on the model the earlier ones left, against one retrained on all so far (default: off; "
                         "about a minute of training per request and mode on 2 CPUs)")
    ev.add_argument("--sequential-requests", type=int, default=4, metavar="N",
                    help="with --sequential-adapter: how many deletion requests (default 4)")
    ev.add_argument("--probes-per-kind", type=int, default=None, help="forget probes per attack kind (default 20; 4 with --quick)")
    ev.add_argument("--retain-limit", type=int, default=None,
                    help="retain questions scored, spread over the split (default 240; 60 with --quick)")
    ev.add_argument("--quick", action="store_true", help="a small run: 4 probes per kind, 60 retain questions, "
                                                         "4 latency requests")
    ev.add_argument("--seed", type=int, default=0)
    from guardserve.unlearn.cli import DTYPE_HELP, add_device_args

    add_device_args(ev, "where the transformers model runs (teacher-forced metrics, --train-adapters): auto (default) "
                        "is cuda where CUDA is present, else cpu; the vLLM engine runs on the platform it was built for",
                    DTYPE_HELP + "; the vLLM engine runs in it too")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=_eval)
    sub = ev.add_subparsers(dest="eval_command", metavar="SUITE")
    register_detect(sub)


def _adapters_dir(args) -> Path:
    """``--adapters``, else the demo model's own folder: each demo variant has its adapters
    (``$GUARDSERVE_HOME/eval/adapters``, ``adapters-sp32k``): one model's never load on another."""
    from guardserve import config
    from guardserve.demo.build import DEFAULT_VARIANT

    if args.adapters:
        return Path(args.adapters).expanduser()
    variant = config.get("GUARDSERVE_DEMO")
    return config.home() / "eval" / ("adapters" if variant == DEFAULT_VARIANT else f"adapters-{variant}")


def _sequential_steps(text: str | None) -> tuple[int, ...]:
    from guardserve.cli import UsageError

    if not text:
        return ()
    try:
        steps = tuple(int(x) for x in text.split(","))
    except ValueError:
        steps = ()
    if not steps or steps[0] < 1 or list(steps) != sorted(set(steps)):
        raise UsageError(f"--sequential {text}: give increasing target counts, e.g. 10,100,1000")
    return steps


def _demo_variant(demo, args) -> str | None:
    """The demo variant whose model is scored (``GUARDSERVE_DEMO``), None for a model of your own."""
    from guardserve import config

    return config.get("GUARDSERVE_DEMO") if demo is not None and not args.model else None


def _available_adapters(folder: Path) -> dict[str, str]:
    if not folder.is_dir():
        return {}
    return {p.name: str(p) for p in sorted(folder.iterdir()) if (p / "adapter_config.json").is_file()}


def _quant_bits(text: str) -> tuple[int, ...]:
    from guardserve.cli import UsageError

    if text.strip().lower() in ("none", ""):
        return ()
    try:
        bits = tuple(int(b) for b in text.split(","))
    except ValueError:
        bits = ()
    if not bits or not all(2 <= b <= 16 for b in bits):
        raise UsageError(f"--quant-bits {text}: give bit widths between 2 and 16, e.g. 8,4 (or 'none')")
    return bits


def _train_missing(folder: Path, demo, have: dict[str, str], progress: bool = True, device: str = "cpu",
                   dtype: str = "float32") -> None:
    """Train the demo model's adapters that ``folder`` lacks, one per registered method, on
    ``device`` in ``dtype`` (resolved names, as ``guardserve unlearn --device/--dtype``)."""
    from guardserve.unlearn import METHODS, get_method, train_adapter

    world = demo.load_world()
    targets = sorted({p["entity"] for p in world["forget"]})
    for method in [m.name for m in METHODS.values()]:
        if method in have:
            continue
        print(f"[eval] training the {method} adapter (as `guardserve unlearn --method {method}`) ...", flush=True)
        result, _ = train_adapter(get_method(method), demo.model, world["forget"], world["retain"], folder / method,
                                  world_facts=world["world_facts"], targets=targets, progress=progress,
                                  overrides={"device": device, "dtype": dtype})
        print(f"[eval] {method}: {result.steps} steps, {result.seconds:.0f} s, stopped: {result.stop_reason}", flush=True)


def _sequential_adapters(method, demo, args, device: str, dtype: str, log) -> dict:
    """:func:`guardserve.eval.sequential.sequential_adapters` on the demo world."""
    from guardserve.eval.sequential import deletion_requests, sequential_adapters

    world = demo.load_world()
    requests = deletion_requests(world["forget"], args.sequential_requests)
    log(f"[eval] sequential deletions with {method.name} adapters: {len(requests)} requests, each trained alone "
        "and as the union so far")
    return sequential_adapters(method, demo.model, requests, world["retain"], world["world_facts"],
                               Path(args.out) / ".work" / "sequential-adapters", world_facts=world["world_facts"],
                               seed=args.seed, overrides={"device": device, "dtype": dtype},
                               progress=not args.no_progress, log=log)


def _dataset(args):
    """``(EvalData, the demo build or None, entities or None)`` that ``--tofu`` or the demo names."""
    from guardserve.cli import UsageError
    from guardserve.eval import data as eval_data

    if args.tofu:
        try:
            return eval_data.from_tofu(args.tofu, split=args.split, targets=args.targets), None, None
        except ValueError as e:
            raise UsageError(str(e)) from None
    from guardserve.demo import ensure_demo

    demo = ensure_demo()
    world = demo.load_world()
    return eval_data.from_demo(world), demo, world["entities"]


def _configs(args, requested, adapters: dict, folder: Path, demo, sae, log) -> tuple[list[str], Path | None]:
    """The configurations to score, and the SAE the steered ones use (the demo's, trained once,
    on the demo model; steered ones are left out, with a note, when no SAE was given)."""
    from guardserve.cli import UsageError
    from guardserve.eval.runner import DEFAULT_CONFIGS
    from guardserve.guard.configs import ADAPTER_PREFIX, get_config

    if requested:
        configs = requested
        missing = [c for c in configs if get_config(c).method is not None and get_config(c).method not in adapters]
        if missing:
            raise UsageError(f"no adapter for {', '.join(missing)} in {folder} after training")
    else:
        configs = list(DEFAULT_CONFIGS) + [f"{ADAPTER_PREFIX}{m}" for m in adapters] + ["full"]
    steered = [c for c in configs if get_config(c).steering]
    if steered and sae is None:
        if demo is not None and not args.model:
            from guardserve.demo.sae import ensure_demo_sae

            sae = ensure_demo_sae(demo, log)
        elif args.configs:
            raise UsageError(f"the {' and '.join(steered)} configuration(s) need --sae DIR "
                             "(train one with `guardserve sae train`)")
        else:
            configs = [c for c in configs if c not in steered]
            log(f"[eval] no --sae given: skipping the {' and '.join(steered)} configuration(s)")
    return configs, sae


def _eval_endpoint(args) -> int:
    """``--endpoint URL``: the server as a black box (``guardserve.eval.endpoint``). The demo
    world is read from the cache, or generated (seconds): no demo model is built."""
    from guardserve.cli import UsageError
    from guardserve.eval import data as eval_data
    from guardserve.eval import endpoint

    local = {"--configs": args.configs, "--model": args.model, "--retain-model": args.retain_model,
             "--adapters": args.adapters, "--train-adapters": args.train_adapters, "--full-adapter": args.full_adapter,
             "--sae": args.sae, "--readme": args.readme}
    given = [flag for flag, value in local.items() if value]
    if given:
        raise UsageError(f"--endpoint evaluates a running server: {', '.join(given)} only appl"
                         f"{'ies' if len(given) == 1 else 'y'} to a local engine; drop {'it' if len(given) == 1 else 'them'} "
                         "or --endpoint")
    if args.targets and not args.tofu:
        raise UsageError("--targets goes with --tofu (the demo world brings its own targets)")
    if args.concurrency < 1:
        raise UsageError("--concurrency: give 1 or more")
    if args.tofu:
        try:
            data, entities = eval_data.from_tofu(args.tofu, split=args.split, targets=args.targets), None
        except ValueError as e:
            raise UsageError(str(e)) from None
    else:
        from guardserve.demo.build import BuildSpec, DemoPaths, demo_root
        from guardserve.demo.world import build_world

        spec = BuildSpec.for_variant()
        paths = DemoPaths(demo_root() / spec.key())
        world = (paths.load_world() if (paths.world / "entities.json").is_file()
                 else build_world(spec.seed, spec.n_people, spec.forget_fraction))
        data, entities = eval_data.from_demo(world), world["entities"]
    settings = endpoint.EndpointSettings(
        url=args.endpoint, data=data, api_key=args.api_key, model=args.model_name, entities=entities,
        probes_per_kind=args.probes_per_kind if args.probes_per_kind is not None else (4 if args.quick else 20),
        retain_limit=args.retain_limit if args.retain_limit is not None else (60 if args.quick else 240),
        forget_limit=args.forget_limit if args.forget_limit is not None else (40 if args.quick else 0),
        concurrency=args.concurrency, latency_requests=4 if args.quick else 8, latency_tokens=16 if args.quick else 32,
        seed=args.seed, progress=not args.no_progress)
    try:
        results = endpoint.run(settings, log=lambda m: print(m, flush=True))
    except endpoint.EndpointError as e:
        raise UsageError(str(e)) from None
    for path in endpoint.write(results, args.out):
        print(f"[eval] wrote {path}", flush=True)
    print(endpoint.markdown(results))
    return 0


def _eval(args) -> int:
    from guardserve.cli import UsageError
    from guardserve.eval import report
    from guardserve.eval.runner import Settings, known_config, run
    from guardserve.guard.configs import ADAPTER_PREFIX, CONFIGS, get_config

    if getattr(args, "eval_command", None):
        return 2  # a subcommand has its own func
    if args.endpoint:
        return _eval_endpoint(args)
    if args.api_key or args.model_name or args.forget_limit is not None:
        raise UsageError("--api-key, --model-name and --forget-limit go with --endpoint URL")
    log = lambda m: print(m, flush=True)  # noqa: E731
    # Mistakes that need no model are reported before anything is loaded or built.
    requested = [c.strip() for c in args.configs.split(",") if c.strip()] if args.configs else None
    bad = [c for c in requested or [] if not known_config(c)]
    if bad:
        raise UsageError(f"unknown configuration(s) {', '.join(bad)}; choose from "
                         f"{', '.join(CONFIGS)}, {ADAPTER_PREFIX}<method>")
    if args.tofu and not args.model:
        raise UsageError("--tofu needs --model (the model that learned that data)")
    if args.targets and not args.tofu:
        raise UsageError("--targets goes with --tofu (the demo world brings its own targets)")
    quant_bits = _quant_bits(args.quant_bits)
    sequential_steps = _sequential_steps(args.sequential)
    if args.relearn_steps < 0:
        raise UsageError(f"--relearn-steps {args.relearn_steps}: give a number of steps, or 0 to skip the attack")
    from guardserve.unlearn.cli import device_and_dtype

    device, dtype = device_and_dtype(args)
    sae = Path(args.sae).expanduser() if args.sae else None
    if sae is not None and not (sae / "cfg.json").is_file():
        raise UsageError(f"--sae {sae}: no cfg.json there (an SAELens folder, e.g. from `guardserve sae train`)")
    folder = _adapters_dir(args)
    adapters = _available_adapters(folder)
    missing = [c for c in requested or [] if get_config(c).method not in (None, *adapters)]
    if missing and not args.train_adapters:
        from guardserve.unlearn.methods import METHODS

        have = f" (it has {', '.join(adapters)})" if adapters else ""
        first = get_config(missing[0]).method
        if first in {m.name for m in METHODS.values()}:
            fix = f"run `guardserve unlearn --method {first} --out {folder / first}` or add --train-adapters"
        else:  # a folder name the user meant to provide, not a method guardserve can train
            fix = "name a PEFT adapter folder inside --adapters DIR"
        raise UsageError(f"no adapter for {', '.join(missing)} in {folder}{have}: {fix}")
    data, demo, entities = _dataset(args)
    from guardserve.hub import ModelNotFound, resolve_model

    retain_model = args.retain_model or (str(demo.retain_model) if demo and not args.model else None)
    try:
        model = resolve_model(args.model or str(demo.model))
        retain_model = resolve_model(retain_model) if retain_model else None
    except ModelNotFound as e:
        raise UsageError(f"--model / --retain-model {e}") from None

    sequential_method = None
    if args.sequential_adapter is not None:
        from guardserve.unlearn.methods import METHODS, get_method

        if demo is None or args.model:
            raise UsageError("--sequential-adapter trains on the demo model only")
        try:
            sequential_method = get_method(args.sequential_adapter)
        except (KeyError, ValueError):
            raise UsageError(f"--sequential-adapter {args.sequential_adapter}: not a method; one of "
                             f"{', '.join(m.name for m in METHODS.values())}") from None
        people = len({p["entity"] for p in demo.load_world()["forget"]})
        if not 1 <= args.sequential_requests <= people:
            raise UsageError(f"--sequential-requests {args.sequential_requests}: between 1 and {people} "
                             "(the demo's forget people)")

    if args.train_adapters:
        if demo is None or args.model:
            raise UsageError("--train-adapters trains on the demo model only; for your model run "
                             "`guardserve unlearn --model M --method X --out DIR/X` and pass --adapters DIR")
        _train_missing(folder, demo, adapters, progress=not args.no_progress, device=device, dtype=dtype)
        adapters = _available_adapters(folder)

    configs, sae = _configs(args, requested, adapters, folder, demo, sae, log)

    full_adapter = args.full_adapter
    if full_adapter is None:
        full_adapter = next((m for m in ADAPTER_PREFERENCE if m in adapters), None)
    elif full_adapter.lower() == "none":
        full_adapter = None
    elif full_adapter not in adapters:
        raise UsageError(f"--full-adapter {full_adapter}: no such adapter in {folder}")

    settings = Settings(
        model=model, data=data, configs=configs, retain_model=retain_model, adapters=adapters,
        full_adapter=full_adapter, sae=str(sae) if sae else None, steer_clamp=args.clamp,
        entities=entities,
        probes_per_kind=args.probes_per_kind if args.probes_per_kind is not None else (4 if args.quick else 20),
        retain_limit=args.retain_limit if args.retain_limit is not None else (60 if args.quick else 240),
        latency_requests=4 if args.quick else 8, latency_tokens=16 if args.quick else 32,
        quant_bits=quant_bits, relearn_steps=args.relearn_steps, sequential_steps=sequential_steps, seed=args.seed,
        workdir=str(Path(args.out) / ".work"), progress=not args.no_progress,
        device=device, dtype=dtype, demo_variant=_demo_variant(demo, args))
    try:
        results = run(settings, log=log)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if sequential_method is not None:
        results["sequential_adapters"] = _sequential_adapters(sequential_method, demo, args, device, dtype, log)
    for path in report.write(results, args.out):
        log(f"[eval] wrote {path}")
    if args.readme:
        changed = report.update_readme(args.readme, results, str(Path(args.out) / "results.json"))
        log(f"[eval] {'updated' if changed else 'unchanged'}: {args.readme} (evaluation table)")
    print(report.markdown(results))
    return 0
