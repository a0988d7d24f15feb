"""Command line: ``python scripts/compress.py [--config FILE] [key=value ...]``.

With no argument it compresses the built-in SmolLM2-135M-Instruct on the built-in Wikipedia text
with the defaults of ``distill_lr.config.CompressConfig``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from distill_lr.config import load_config
from distill_lr.driver import compress
from distill_lr.errors import UserInputError


def summary_table(report: dict[str, Any]) -> str:
    """The closing table: parameters, perplexity and time, before and after."""
    p = report["params"]
    rows = [
        ("decoder-linear weights", f"{p['decoder_linear_before']:,}", f"{p['decoder_linear_after']:,}"),
        ("all model parameters", f"{p['model_before']:,}", f"{p['model_after']:,}"),
    ]
    if "perplexity" in report:
        ppl = report["perplexity"]
        rows.append((f"perplexity ({ppl['eval_tokens']:,} held-out tokens)", f"{ppl['dense']:.2f}", f"{ppl['compressed']:.2f}"))
    rows.append(("wall time", "", f"{report['seconds']:.1f} s"))
    width = max(len(r[0]) for r in rows)
    cols = [max(len(r[i]) for r in rows + [("", "before", "after")]) for i in (1, 2)]
    lines = [f"{'':{width}}  {'before':>{cols[0]}}  {'after':>{cols[1]}}"]
    lines += [f"{a:{width}}  {b:>{cols[0]}}  {c:>{cols[1]}}" for a, b, c in rows]
    lines.append(f"removed {p['removed_fraction']:.1%} of the {p['counted']}")
    lines.append(f"compressed checkpoint: {report['output']}  (report: {report['output']}/report.json)")
    return "\n".join(lines)


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
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_table(report))
    return 0
