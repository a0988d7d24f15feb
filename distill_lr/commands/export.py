"""Write a compressed checkpoint as a dense one of the original architecture: factors multiplied out, integers
dequantized, file by file (never the whole model in memory). Any loader of the base architecture reads the result."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "multiply a compressed checkpoint out into a dense one"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="a finished distill_lr output folder")
    parser.add_argument("--output", type=Path, help="where the dense checkpoint goes (default: <run>-dense)")


def run(args: argparse.Namespace) -> int:
    from distill_lr.checkpoint.compressed import export_dense
    from distill_lr.run import dense_export_dir

    output = args.output or dense_export_dir(args.run.expanduser())
    export_dense(args.run, output)
    print(f"dense checkpoint of {args.run} written to {output}")
    return 0
