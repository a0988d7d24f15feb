"""Compress a Hugging Face causal LM by layer-wise low-rank feature distillation.

With no argument it compresses the built-in SmolLM2-135M-Instruct on the built-in Wikipedia text with the
defaults of ``distill_lr.schema.CompressConfig``. Settings come from ``--config FILE`` (YAML, see configs/)
then ``key=value`` overrides with dotted keys, e.g. ``ranks.target=0.4 method=whiten train.epochs=1 output=runs/x``.
"""

from __future__ import annotations

import argparse
import warnings

from tqdm.contrib.logging import logging_redirect_tqdm

HELP = "compress a checkpoint layer by layer (the main job)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with settings (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value settings applied after the config file")


def run(args: argparse.Namespace) -> int:
    from distill_lr.config import load_config
    from distill_lr.distributed import launched_rank
    from distill_lr.driver import compress

    warnings.filterwarnings("ignore", module="transformers")
    cfg = load_config(args.config, args.overrides)
    with logging_redirect_tqdm():
        report = compress(cfg)
    if launched_rank() == 0:  # one table for a launch of several processes
        print(report.summary_table())
    return 0
