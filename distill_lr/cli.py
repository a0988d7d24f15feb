"""The ``distill-lr`` command: one entry point, a subcommand per job (``distill-lr <command> --help`` for each).

``python scripts/compress.py ...`` is ``distill-lr compress ...``. A command module has ``HELP`` (its line in the
listing), ``add_arguments(parser)`` and ``run(args) -> exit status``; bad input ends in one line, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import import_module

from distill_lr.errors import ONE_LINE, error_line

COMMANDS = ("compress", "evaluate", "laser", "spectra", "export", "plot")  # modules of distill_lr.commands


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="distill-lr", description="Compress Hugging Face causal LMs by low rank, layer by layer.")
    sub = top.add_subparsers(dest="command", required=True, metavar="command")
    for name in COMMANDS:
        module = import_module(f"distill_lr.commands.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(handler=module.run)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.captureWarnings(True)
    try:
        return args.handler(args)
    except ONE_LINE as err:
        print(error_line(err), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
