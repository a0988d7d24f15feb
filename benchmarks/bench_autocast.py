"""Training speed of the distillation steps under each ``train.autocast`` mode, on this machine.

Writes a random-weight checkpoint with a real model's layer shapes (default: the built-in
SmolLM2-135M's), distils a few of its layers on the built-in text once per mode, and prints the
seconds each layer spends training, as a multiple of float32. Whether bfloat16 pays on a
CPU depends on its native bf16 matrix units (AVX512-BF16, AMX); on a GPU ``auto`` is bfloat16::

    python benchmarks/bench_autocast.py
    python benchmarks/bench_autocast.py --layers 2 --set data.num_sequences=64 train.epochs=1
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig

from distill_lr.analysis.tables import device_name, markdown_table
from distill_lr.builtin import resolve_model_dir
from distill_lr.config import load_config
from distill_lr.driver import compress
from distill_lr.schema import AUTOCASTS
from distill_lr.testing import write_random_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:SmolLM2-135M-Instruct", help="whose config gives the layer shapes")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=["float32", "bfloat16"], choices=AUTOCASTS)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model_dir = resolve_model_dir(args.model)
    config = AutoConfig.from_pretrained(model_dir)
    config.num_hidden_layers = args.layers
    base = ["method=distill", "init=whiten", "evaluate=false", "data.num_sequences=128", "data.seq_len=256"]
    base += ["train.inputs=student", "train.epochs=1", "train.patience=100", *args.set]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-autocast-") as tmp:
        folder = write_random_checkpoint(config, Path(tmp) / "model", tokenizer_from=model_dir, dtype=torch.float32)
        for mode in args.modes:
            overrides = [f"model={folder}", f"output={tmp}/out-{mode}", "overwrite=true", *base, f"train.autocast={mode}"]
            report = compress(load_config(None, overrides))
            layers = report.layers[1:] or report.layers  # the first layer also pays for warming up
            seconds = sum(layer.seconds["train"] for layer in layers) / len(layers)
            steps = sum(layer.train["steps"] for layer in layers) / len(layers)
            holdout = sum(layer.train["best_holdout"] for layer in layers) / len(layers)
            rows.append((mode, seconds, steps, holdout))
    print(f"\n{args.model} layer shapes, random weights, {device_name()}; {' '.join(base)}\n")
    reference = next((s for m, s, _, _ in rows if m == "float32"), rows[0][1])
    cells = [(m, f"{s:.2f}", f"{n / s:.2f}", f"{reference / s:.2f}×", f"{h:.6f}") for m, s, n, h in rows]
    print(markdown_table(("train.autocast", "train s / layer", "steps / s", "× float32 speed", "held-out loss"), cells))


if __name__ == "__main__":
    main()
