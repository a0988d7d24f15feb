"""Command line: ``python scripts/compress.py [--config FILE] [key=value ...]``.

With no argument it compresses the built-in SmolLM2-135M-Instruct on the built-in Wikipedia text
with the defaults of ``distill_lr.schema.CompressConfig``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from tqdm.contrib.logging import logging_redirect_tqdm

from distill_lr.config import load_config
from distill_lr.driver import compress
from distill_lr.errors import ONE_LINE, error_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="compress.py",
        description="Compress a Hugging Face causal LM by layer-wise low-rank feature distillation.",
        epilog="Overrides use dotted keys, e.g. ranks.target=0.4 method=whiten train.epochs=1 output=runs/x",
    )
    parser.add_argument("--config", help="YAML file with settings (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value settings applied after the config file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", module="transformers")
    try:
        cfg = load_config(args.config, args.overrides)
        with logging_redirect_tqdm():
            report = compress(cfg)
    except ONE_LINE as err:
        print(error_line(err), file=sys.stderr)
        return 2
    print(report.summary_table())
    return 0
