"""The ``icot`` command line: argument parsing and ``main`` only (the commands are in
:mod:`icot_jax.commands`, one module per subcommand). Command modules import jax, orbax and
transformers inside their handlers, so building the parser (``icot --help``) loads none of them."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from icot_jax.commands import aot, data, demo, eval, export_hf, generate, tradeoff, train
from icot_jax.errors import UserError

COMMANDS = (data, train, demo, export_hf, eval, generate, tradeoff, aot)
"""The subcommand modules, in the order ``icot --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The ``icot`` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="icot", description="Stepwise Internalization of CoT in JAX")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``icot`` script. A :class:`~icot_jax.errors.UserError` ends the command with one
    line naming what to fix (``SystemExit``, status 1); anything else is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0  # handlers may return an exit status
    except UserError as error:
        raise SystemExit(f"icot {args.command}: error: {error}") from error


if __name__ == "__main__":
    raise SystemExit(main())
