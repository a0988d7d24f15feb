"""What the input fingerprint (names, shapes, sizes and sampled bytes of every tensor) costs, against a full hash.

Writes a random-weight checkpoint with a real model's layer shapes (default: the built-in
SmolLM2-135M's, with ``--layers`` decoder layers), then times ``CheckpointReader.fingerprint`` and a
full sha256 of every shard, each from a cold page cache when this process may drop it (root on
Linux), else from whatever the cache holds (the table says which)::

    python benchmarks/bench_fingerprint.py
    python benchmarks/bench_fingerprint.py --layers 60 --set hidden_size=2048 intermediate_size=5632
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from distill_lr.analysis.tables import markdown_table
from distill_lr.builtin import resolve_model_dir
from distill_lr.checkpoint.files import file_sha256, human_bytes
from distill_lr.checkpoint.reader import FINGERPRINT_BLOCK, FINGERPRINT_SAMPLES, CheckpointReader
from distill_lr.testing import write_random_checkpoint


def drop_page_cache() -> bool:
    """Empty the kernel's page cache, so the next reads come from the disk; False where that is not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def cold(fn) -> tuple[float, bool]:
    dropped = drop_page_cache()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:SmolLM2-135M-Instruct", help="whose config gives the layer shapes")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config fields to change (integers)")
    args = parser.parse_args()
    config = AutoConfig.from_pretrained(resolve_model_dir(args.model))
    config.num_hidden_layers = args.layers
    for item in args.set:
        key, value = item.split("=", 1)
        setattr(config, key, int(value))
    with tempfile.TemporaryDirectory(prefix="bench-fingerprint-") as tmp:
        folder = write_random_checkpoint(config, Path(tmp) / "model", dtype=torch.bfloat16)
        reader = CheckpointReader(folder)
        shards = sorted(folder.glob("*.safetensors"))
        size = sum(p.stat().st_size for p in shards)
        sampled = sum(min(FINGERPRINT_SAMPLES * FINGERPRINT_BLOCK, info.end - info.start) for info in reader.tensors.values())
        t_print, dropped = cold(reader.fingerprint)
        t_full, _ = cold(lambda: [file_sha256(p) for p in shards])
    cache = "cold page cache" if dropped else "page cache not dropped (not root): warm reads"
    print(f"\n{args.model} shapes, {args.layers} layers, bfloat16: {len(reader.tensors)} tensors, {human_bytes(size)}; {cache}\n")
    rows = [
        ("fingerprint (sampled blocks)", human_bytes(sampled), f"{t_print:.3f}", "1"),
        ("sha256 of every shard", human_bytes(size), f"{t_full:.3f}", f"{t_full / t_print:.0f}"),
    ]
    print(markdown_table(("hash", "bytes read", "seconds", "× fingerprint time"), rows))


if __name__ == "__main__":
    main()
