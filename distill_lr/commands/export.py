"""Write a compressed checkpoint in a format other tools read: dense (the original architecture), compressed-tensors
(pack-quantized integers, read by transformers and vLLM without remote code) or a PEFT LoRA adapter (a qlr folder's
corrections). File by file: never the whole model in memory."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write a compressed checkpoint as a dense, compressed-tensors or LoRA-adapter folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="a finished distill_lr output folder")
    parser.add_argument("--output", type=Path, help="where the export goes (default: <run>-<format>)")
    parser.add_argument("--format", default="dense", help="dense (default), compressed-tensors or lora")


def run(args: argparse.Namespace) -> int:
    from distill_lr.checkpoint.export import export
    from distill_lr.run import dense_export_dir

    src = args.run.expanduser()
    output = args.output or (dense_export_dir(src) if args.format == "dense" else src.with_name(f"{src.name}-{args.format}"))
    print(export(src, output, args.format))
    return 0
