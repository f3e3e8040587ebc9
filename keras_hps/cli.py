"""The `keras-hps` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Subcommand -> (module, one-line help). Each module defines
#   add_arguments(parser: argparse.ArgumentParser) -> None
#   run(args: argparse.Namespace) -> int
# and is imported only when its subcommand runs, so `keras-hps --help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("keras_hps.convert", "convert tables between HPS directories and HDF5"),
    "plan": ("keras_hps.plan", "memory each tier needs for a config, before deploying"),
    "export": ("keras_hps.export.cli", "write a TF Serving model repository from a Keras model"),
    "inspect": ("keras_hps.export.inspect", "print what a model repository holds"),
    "serve": ("keras_hps.serving.cli", "serve a model repository over TF Serving's REST and gRPC"),
    "bench": ("keras_hps.serving.bench", "load-test a running server (throughput, latency)"),
    "demo": ("keras_hps.serving.demo", "end to end: train, export, serve, query"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand's arguments attached."""
    parser = argparse.ArgumentParser(prog="keras-hps", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `keras-hps` subcommand; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # prints usage / help and exits
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"keras-hps {name}", description=help_text)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
