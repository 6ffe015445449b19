"""Configurations in which the guard would not apply: the server refuses to start in them.

A guarded server that quietly serves unguarded is worse than one that does not start, so each
check says in one line what is wrong and how to fix it. ``guardserve serve`` runs
:func:`argv_problem` before it starts vLLM; the plugin runs :func:`engine_problem` on the
engine vLLM actually built (the same server started by hand is checked too).
"""

from __future__ import annotations

import os

PROCESSED = "processed_logprobs"


def _rust_frontend() -> bool:
    return os.environ.get("VLLM_USE_RUST_FRONTEND", "").strip().lower() in ("1", "true", "yes", "on")


def _logits_processor_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "guardserve" for ep in entry_points(group="vllm.logits_processors"))


def engine_problem(vllm_config, args) -> str | None:
    """Why the guard would not apply on this engine, or None."""
    model_config = getattr(vllm_config, "model_config", None)
    mode = str(getattr(model_config, "logprobs_mode", PROCESSED))
    if mode.rsplit(".", 1)[-1].lower() != PROCESSED:
        return (f"logprobs mode {mode!r} reports logprobs before the guard's logits processor ran, so banned tokens "
                f"would show in logprobs: start with --logprobs-mode {PROCESSED}")
    if getattr(vllm_config, "speculative_config", None) is not None:
        return ("speculative decoding is on: vLLM does not load entry-point logits processors with it, so the guard's "
                "filter would not run; start without --speculative-config")
    if not _logits_processor_installed():
        return ("the guard's logits processor is not installed (entry point group vllm.logits_processors); "
                "reinstall guardserve (pip install -e .)")
    if getattr(args, "grpc", False) or getattr(args, "grpc_port", None) or _rust_frontend():
        return ("a gRPC or Rust frontend serves requests without the guarded HTTP routes; start without --grpc, "
                "--grpc-port and VLLM_USE_RUST_FRONTEND")
    return None


def argv_problem(argv: list[str]) -> str | None:
    """The same checks on the vLLM command line ``guardserve serve`` is about to run."""
    modes = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--logprobs-mode"]
    modes += [a.split("=", 1)[1] for a in argv if a.startswith("--logprobs-mode=")]
    if modes and modes[-1] != PROCESSED:
        return (f"--logprobs-mode {modes[-1]} reports logprobs before the guard's logits processor ran, so banned "
                f"tokens would show in logprobs; guardserve serves with {PROCESSED}")
    if any(a.split("=", 1)[0] in ("--speculative-config", "--speculative_config", "-sc") for a in argv):
        return ("speculative decoding: vLLM does not load entry-point logits processors with it, so the guard's "
                "filter would not run; drop --speculative-config")
    if any(a.split("=", 1)[0] in ("--grpc", "--grpc-port") for a in argv) or _rust_frontend():
        return ("a gRPC or Rust frontend serves requests without the guarded HTTP routes; drop --grpc/--grpc-port "
                "and VLLM_USE_RUST_FRONTEND")
    return None
