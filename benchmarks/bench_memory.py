"""Peak host memory of the driver does not grow with depth.

Builds two random checkpoints of the same width with 4 and with 24 decoder layers, compresses
each in a fresh process, and prints both peaks (max resident set size)::

    python benchmarks/bench_memory.py
    python benchmarks/bench_memory.py --hidden 2048 --layers 4 32 --set method=distill train.epochs=1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from distill_lr.analysis.tables import markdown_table

CHILD = """
import json, resource, sys
from distill_lr.config import load_config
from distill_lr.driver import compress
report = compress(load_config(None, sys.argv[1:]))
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": report.seconds}))
"""


def build(layers: int, hidden: int, folder: Path) -> Path:
    """In a separate process, so that building never counts towards the measured peak."""
    code = (
        "from pathlib import Path; from transformers import LlamaConfig; from distill_lr.builtin import builtin_model_dir;"
        "from distill_lr.testing import write_random_checkpoint;"
        f"cfg = LlamaConfig(hidden_size={hidden}, intermediate_size={hidden * 11 // 4}, num_hidden_layers={layers},"
        f" num_attention_heads={hidden // 64}, num_key_value_heads={hidden // 256}, vocab_size=49152, max_position_embeddings=2048);"
        f"write_random_checkpoint(cfg, Path('{folder}'), builtin_model_dir())"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, nargs=2, default=[4, 24])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for n in args.layers:
            model = build(n, args.hidden, Path(tmp) / f"model-{n}")
            overrides = [
                f"model={model}",
                f"output={Path(tmp) / f'out-{n}'}",
                "method=svd",
                "data.num_sequences=32",
                "data.seq_len=128",
                "data.eval_sequences=8",
                *args.set,
            ]
            done = subprocess.run([sys.executable, "-c", CHILD, *overrides], check=True, capture_output=True, text=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            weights_mb = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20
            rows.append((n, weights_mb, result["peak_rss_mb"], result["seconds"]))
    print(f"hidden {args.hidden}; settings: {' '.join(args.set) or 'method=svd, 32 x 128 calibration tokens'}")
    cells = [(n, f"{size:,.0f}", f"{peak:,.0f}", f"{secs:.0f}") for n, size, peak, secs in rows]
    print(markdown_table(("layers", "checkpoint size (MB)", "peak host memory (MB)", "time (s)"), cells, align="rrrr"))
    print(f"peak ratio {rows[1][0]} vs {rows[0][0]} layers: {rows[1][2] / rows[0][2]:.2f}")


if __name__ == "__main__":
    main()
