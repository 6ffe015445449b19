"""The ``guardserve`` command.

Each component owns its subcommands in a ``cli`` module exposing
``register(subparsers)``; this file only lists those modules, so that ``--help`` stays
fast (a module imports its heavy dependencies inside the command, not at import time).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# One line per component that has commands.
COMMAND_MODULES = [
    "guardserve.server.cli",
    "guardserve.demo.cli",
    "guardserve.policy.cli",
    "guardserve.eval.cli",
    "guardserve.unlearn.cli",
    "guardserve.steering.cli",
    "guardserve.benchmarks.cli",
]


class UsageError(Exception):
    """A mistake the user can fix; printed as one line, never as a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guardserve",
        description="Make a model served by vLLM forget registered targets, without retraining or restarting.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"guardserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
