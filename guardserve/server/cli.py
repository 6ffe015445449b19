"""``guardserve serve``: the OpenAI-compatible server (vLLM) with guardserve's settings."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve a model through vLLM's OpenAI-compatible API (the demo model by default)",
        description=(
            "Start vLLM's OpenAI-compatible server. Without --model it serves the demo model "
            "(building it first if needed) as 'guardserve-demo'. Logprobs are always the processed "
            "ones (--logprobs-mode processed_logprobs). Arguments after '--' go to vLLM unchanged, "
            "e.g. guardserve serve -- --max-num-seqs 64. Ctrl-C stops the server."
        ),
    )
    serve.add_argument("--model", default=None, help="a Hugging Face model folder or name (default: the demo model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients use (default: 'guardserve-demo' for the demo model, else the --model value)")
    serve.add_argument("--lora", action="store_true",
                       help="serve unlearning adapters: vLLM runtime LoRA (--enable-lora --max-loras 4 --max-lora-rank 16); "
                            "adds about 15-30%% latency to base-model requests on CPU")
    serve.add_argument("--guard", default=None, metavar="CONFIG",
                       help="the guard configuration to serve (guardserve.guard.configs): guard (default: ICUL and the "
                            "token filter on triggered targets), guard+semantic (plus near-synonyms), guard+sae (plus "
                            "SAE steering), full (all of it, and registered adapters with --lora); default "
                            "$GUARDSERVE_GUARD or guard")
    serve.add_argument("--steering", action="store_true",
                       help="short for --guard guard+sae: clamp the SAE features of triggered targets in the workers "
                            "(SAE from `guardserve sae train`; features selected by the server as targets are added or "
                            "changed, or with `guardserve sae select`). Any configuration with steering runs vLLM in "
                            "eager mode (--enforce-eager): no CUDA graphs or torch.compile, which slows decoding on GPUs")
    serve.add_argument("--dry-run", action="store_true", help="print the vLLM command instead of running it")
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER, help="arguments for vLLM, after '--'")
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import shlex

    from guardserve.cli import UsageError
    from guardserve.server.launcher import DEMO_MODEL_NAME, api_servers, exec_server, plugin_env, vllm_command

    extra = list(args.vllm_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} is not a valid port (1-65535)")
    name = args.served_model_name
    if args.model is None:
        from guardserve.demo import ensure_demo

        model = str(ensure_demo().model)
        name = name or DEMO_MODEL_NAME
    else:
        from guardserve.hub import ModelNotFound, resolve_model

        try:
            model = resolve_model(args.model)
        except ModelNotFound as e:
            raise UsageError(f"--model {e}") from None
    env = plugin_env()
    if args.lora and api_servers(extra) > 1:
        raise UsageError("--lora loads unlearning adapters while the server runs, which vLLM allows with one API "
                         "server process only: leave out --api-server-count (or --data-parallel-size), or --lora")
    if args.lora:
        extra = ["--enable-lora", "--max-loras", "4", "--max-lora-rank", "16", *extra]
        # Adapters are loaded and unloaded while the server runs (guardserve/server/adapters.py).
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    from guardserve import config
    from guardserve.guard.configs import servable_config

    if args.steering and args.guard not in (None, "guard+sae"):
        raise UsageError(f"--steering is short for --guard guard+sae; with --guard {args.guard} leave it out")
    try:
        guard = servable_config("guard+sae" if args.steering else args.guard or config.get("GUARDSERVE_GUARD"))
    except ValueError as e:
        raise UsageError(f"--guard: {e}") from None
    env["GUARDSERVE_GUARD"] = guard.name
    if guard.adapter and not args.lora:
        print(f"guardserve: --guard {guard.name} serves registered unlearning adapters only with --lora", flush=True)
    if guard.steering:
        from guardserve.artifacts import ArtifactError
        from guardserve.steering.flags import check_sae, sae_path

        try:
            sae = sae_path()
            if not (sae / "cfg.json").is_file() and not (sae / "params.npz").is_file():
                raise UsageError(f"--guard {guard.name} steers: no SAE at {sae}; train one with `guardserve sae train` "
                                 "(or set GUARDSERVE_SAE to an SAELens folder or an hf:// URI)")
            check_sae(sae)
        except ArtifactError as e:
            raise UsageError(f"--guard {guard.name} steers, but the SAE cannot be used: {e}") from None
        if "--enforce-eager" not in extra:
            extra = ["--enforce-eager", *extra]
        print("guardserve: steering on (eager mode: hooks do not run under CUDA graphs or torch.compile)", flush=True)
    argv = vllm_command(model, host=args.host, port=args.port, served_model_name=name, extra=extra)
    from guardserve.server.preflight import argv_problem

    problem = argv_problem(argv)
    if problem:
        raise UsageError(f"the guard would not apply: {problem}")
    if args.dry_run:
        print(" ".join(f"{k}={v}" for k, v in env.items()), shlex.join(argv))
        return 0
    print(f"guardserve: serving {model} on http://{args.host}:{args.port}/v1", flush=True)
    exec_server(argv, env)
    return 0  # not reached: exec replaced the process
