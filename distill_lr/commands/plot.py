"""Redraw a run's ``report.png`` (per-layer error, training curves, rank plan, perplexity) from its ``report.json``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distill_lr.errors import check

HELP = "redraw a run's report.png from its report.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="the output folder of a finished run")


def run(args: argparse.Namespace) -> int:
    from distill_lr import plots

    source = args.run / "report.json"
    check(source.is_file(), f"{args.run} has no report.json: give the output folder of a finished run")
    return 0 if plots.draw_run(json.loads(source.read_text()), args.run / plots.REPORT_PNG) else 1
