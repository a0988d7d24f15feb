"""What a quantized checkpoint costs at inference: the time of a forward pass and of a decoding step, against dense.

``QuantLinear`` dequantises its whole weight for every matmul (no kernel), so on a CPU it is slower than the
dense model it replaces; this prints by how much, for folders written by ``bench_size.py``::

    python benchmarks/bench_size.py --workdir /tmp/bsize
    python benchmarks/bench_quant_forward.py /tmp/bsize/bf16 /tmp/bsize/int4-gptq-g128 /tmp/bsize/whiten-20+int4 /tmp/bsize/qlr3-r64
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import timed
from transformers import AutoModelForCausalLM

from distill_lr.analysis.tables import device_name, markdown_table
from distill_lr.builtin import resolve_model_dir
from distill_lr.checkpoint.compressed import load_compressed


def load(folder: str, dtype: torch.dtype) -> torch.nn.Module:
    if folder == "dense":
        return AutoModelForCausalLM.from_pretrained(resolve_model_dir("builtin:SmolLM2-135M-Instruct"), dtype=dtype).eval()
    return load_compressed(folder, dtype=dtype)


@torch.no_grad()
def measure(model: torch.nn.Module, batch: int, seq_len: int, steps: int, repeats: int) -> tuple[float, float]:
    """Seconds of one forward over ``batch x seq_len`` tokens, and of one decoding step (one new token, KV cache)."""
    ids = torch.randint(10, 1000, (batch, seq_len))
    forward, _ = timed(lambda: model(input_ids=ids), repeats=repeats)
    prompt = ids[:1, :32]
    generate, _ = timed(lambda: model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False), repeats=1)
    prefill, _ = timed(lambda: model(input_ids=prompt), repeats=repeats)
    return forward, max(generate - prefill, 0.0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="compressed folders; 'dense' is the built-in model itself")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32, help="decoding steps timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the table here (Markdown)")
    args = parser.parse_args()
    rows, base = [], None
    for folder in ["dense", *args.folders]:
        forward, step = measure(load(folder, torch.float32), args.batch, args.seq_len, args.steps, args.repeats)
        base = base or (forward, step)
        name = "dense (float32 input)" if folder == "dense" else Path(folder).name
        rows.append((name, f"{forward * 1e3:.0f} ms", f"{forward / base[0]:.2f}×", f"{step * 1e3:.1f} ms", f"{step / base[1]:.2f}×"))
        print(rows[-1], flush=True)
    header = ("checkpoint", f"forward {args.batch}×{args.seq_len}", "× dense", "decode step", "× dense")
    table = f"{device_name()}, float32 compute, torch {torch.__version__}\n\n" + markdown_table(header, rows) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
