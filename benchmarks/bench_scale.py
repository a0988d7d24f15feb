"""Memory and speed at Mixtral-8x7B scale, on one GPU.

Builds a random-weight checkpoint with Mixtral-8x7B's real layer dimensions (hidden 4096, 8 experts
of 14336, 32 query / 8 key-value heads) and a few of its 32 layers, compresses it with distillation
on 128 sequences x 2048 tokens, and prints per layer the seconds spent loading, in the teacher pass,
in init, in training and in writing; the peak GPU and host memory; the training throughput against
the GPU's measured bf16 matrix peak; and the projected time for all 32 layers::

    python benchmarks/bench_scale.py --data corpus.jsonl --tokenizer /path/to/tokenizer-folder
    python benchmarks/bench_scale.py --layers 2 --num-sequences 32 --set train.epochs=1 ranks.target=0.3

The vocabulary is sized to the given tokenizer (it only changes the embedding and the head, not the
layers being timed). Weights are random, so perplexity means nothing here and is not computed.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

import torch
from common import timed
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer, MixtralConfig

from distill_lr.analysis.tables import device_name, save_results
from distill_lr.checkpoint.compressed import load_compressed
from distill_lr.config import load_config
from distill_lr.driver import compress
from distill_lr.testing import write_random_checkpoint
from distill_lr.train import factor_modules

FULL_LAYERS = 32


def bf16_peak_tflops(size: int = 8192, repeats: int = 20) -> float:
    """Measured bf16 matrix-multiply throughput of this GPU (the denominator of the utilisation)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    seconds, _ = timed(lambda: a @ b, "cuda", repeats)
    return 2 * size**3 / seconds / 1e12


def training_flops_per_step(output: Path, batch: int, seq_len: int, vocab: int) -> float:
    """FLOPs of one forward + backward of the compressed layer 0 on one batch, counted by torch."""
    model = load_compressed(output, device="cuda", dtype=torch.bfloat16)
    model.config._attn_implementation = "eager"  # torch's FLOP counter cannot count grouped-query SDPA
    layer = model.model.layers[0].requires_grad_(False)
    for module in factor_modules(layer).values():
        module.requires_grad_(True)
    ids = torch.randint(0, vocab, (batch, seq_len), device="cuda")
    hidden = model.model.embed_tokens(ids).detach()
    position_ids = torch.arange(seq_len, device="cuda")[None]
    cos_sin = model.model.rotary_emb(hidden, position_ids)
    with FlopCounterMode(display=False) as counter, torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(hidden, attention_mask=None, position_embeddings=cos_sin, position_ids=position_ids)
        (out[0] if isinstance(out, tuple) else out).float().abs().mean().backward()
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--num-sequences", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--data", required=True, help="calibration text (.jsonl/.txt/.parquet or folder)")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a folder with tokenizer files")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-scale"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_scale.py needs a CUDA GPU")

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    peak = bf16_peak_tflops()
    vocab = len(AutoTokenizer.from_pretrained(args.tokenizer))
    config = MixtralConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=32768,
        rope_theta=1e6,
        vocab_size=vocab,
        architectures=["MixtralForCausalLM"],
    )
    model_dir = args.workdir / "mixtral-random"
    start = time.perf_counter()
    write_random_checkpoint(config, model_dir, args.tokenizer, device="cuda")
    build_s = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()

    output = args.workdir / "out"
    overrides = [
        f"model={model_dir}",
        f"output={output}",
        "overwrite=true",
        "method=distill",
        "init=whiten",
        f"data.source={args.data}",
        f"data.num_sequences={args.num_sequences}",
        f"data.seq_len={args.seq_len}",
        "evaluate=false",
        "train.epochs=1",
        *args.set,
    ]
    cfg = load_config(None, overrides)
    report = compress(cfg)
    gpu_peak = torch.cuda.max_memory_allocated() / 2**30
    host_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    flops_step = training_flops_per_step(output, cfg.train.batch_size, cfg.data.seq_len, vocab)
    n_inputs = 1 if cfg.train.inputs != "teacher+student" else 2
    print(f"\nGPU: {device_name()}; measured bf16 matmul peak {peak:.0f} TFLOP/s")
    print(f"random Mixtral-8x7B-shaped checkpoint, {args.layers} of {FULL_LAYERS} layers, built in {build_s:.0f} s")
    print(f"calibration {args.num_sequences} x {args.seq_len} tokens; {' '.join(overrides[3:])}\n")
    keys = ("load", "teacher", "init", "train", "save", "student")
    print("| layer | " + " | ".join(f"{k} (s)" for k in keys) + " | train steps | train TFLOP/s | % of peak |")
    print("| ---: |" + " ---: |" * (len(keys) + 3))
    per_layer, rates = [], []
    for layer in report.layers:
        sec = layer.seconds or {}
        steps = layer.train["steps"] if layer.train else 0
        rate = flops_step * n_inputs * steps / sec["train"] / 1e12 if sec.get("train") else 0.0
        rates.append(rate)
        per_layer.append(sum(sec.get(k, 0.0) for k in keys))
        cells = " | ".join(f"{sec.get(k, 0.0):.1f}" for k in keys)
        print(f"| {layer.layer} | {cells} | {steps} | {rate:.0f} | {rate / peak:.0%} |")
    steady = per_layer[1:] or per_layer
    fixed = report.seconds - sum(per_layer)
    projected = fixed + FULL_LAYERS * sum(steady) / len(steady)
    print(f"\npeak GPU memory {gpu_peak:.1f} GiB; peak host memory {host_peak:.1f} GiB")
    mean_rate = sum(rates) / len(rates)
    print(f"training throughput {mean_rate:.0f} TFLOP/s = {mean_rate / peak:.0%} of the measured bf16 peak")
    mean_layer = sum(steady) / len(steady)
    print(f"projected Mixtral-8x7B ({FULL_LAYERS} layers): {projected / 60:.1f} min", end=" ")
    print(f"({fixed:.0f} s fixed + {FULL_LAYERS} x {mean_layer:.1f} s)")
    summary = {"gpu": device_name(), "peak_tflops": peak, "gpu_peak_gib": gpu_peak, "host_peak_gib": host_peak}
    summary.update({"projected_min": projected / 60, "layers": [layer.to_dict() for layer in report.layers], "train_tflops": rates})
    save_results(summary, args.workdir / "bench_scale.json")


if __name__ == "__main__":
    main()
