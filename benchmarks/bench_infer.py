"""What a compressed checkpoint costs where it runs: prefill time, decoding time per token and peak memory against dense.

Each folder is loaded as a new user would, with plain transformers (``trust_remote_code=True`` for a distill_lr
folder, nothing for a dense one), in a fresh process per (folder, threads, dtype) so that its peak memory is its
own. It times a prefill of 1 × ``--prompt`` tokens and ``--new-tokens`` greedy decoding steps with the KV cache
(the median of ``--repeats`` runs) and prints ratios to the dense model at the same threads and dtype::

    python benchmarks/bench_infer.py dense /tmp/inf/lowrank-20 /tmp/inf/int4 --threads 1 2 --dtype bfloat16 float32

``dense`` is the built-in model; rows go to ``--out`` (``docs/infer.json``, ``.md``, ``.png``). ``--rows`` instead
times one quantized linear's integer kernel against dequantise-and-matmul over a range of rows: the crossover behind
``lowrank.KERNEL_ROWS``; ``--forms RUN`` times one layer's factor pairs as two linears and as their dense product.
Run it alone: timings beside other jobs are not comparable.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from distill_lr.analysis.tables import device_name, markdown_table, save_results
from distill_lr.builtin import resolve_model_dir

DENSE = "dense"


def load(folder: str, dtype: torch.dtype, device: str, dense_above: float | None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = resolve_model_dir("builtin:SmolLM2-135M-Instruct") if folder == DENSE else Path(folder)
    options = {"distill_lr_dense_above": dense_above} if dense_above is not None and folder != DENSE else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=True, **options)
    return model.to(device).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def measure(model: torch.nn.Module, prompt: int, new_tokens: int, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of a prefill of ``prompt`` tokens and of one greedy decoding step after it (KV cache)."""
    ids = torch.randint(100, 10_000, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    prefills, steps = [], []
    for _ in range(repeats + 1):  # the first run warms up
        sync(device)
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        sync(device)
        prefills.append(time.perf_counter() - start)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(device)
        steps.append((time.perf_counter() - start) / new_tokens)
    return {"prefill_s": statistics.median(prefills[1:]), "decode_s": statistics.median(steps[1:])}


def measure_one(args: argparse.Namespace) -> None:
    """One (folder, threads, dtype) cell, in this process; prints its JSON line."""
    torch.set_num_threads(args.threads[0])
    dtype = getattr(torch, args.dtype[0])
    model = load(args.folders[0], dtype, args.device, args.dense_above)
    row = measure(model, args.prompt, args.new_tokens, args.repeats, args.device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    print(json.dumps({**row, "peak_bytes": peak, "device": device_name(args.device)}))


def cell(folder: str, threads: int, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, folder, "--one", "--threads", str(threads), "--dtype", dtype, "--device", args.device]
    command += ["--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    command += [] if args.dense_above is None else ["--dense-above", str(args.dense_above)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"measuring {folder} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_grid(args: argparse.Namespace) -> None:
    folders = [DENSE, *[f for f in args.folders if f != DENSE]]
    rows, table = [], []
    for dtype in args.dtype:
        for threads in args.threads:
            base = None
            for folder in folders:
                r = cell(folder, threads, dtype, args)
                base = base or r
                suffix = "" if args.dense_above is None else f" (dense ≥ {args.dense_above})"
                name = DENSE if folder == DENSE else Path(folder).name + suffix
                row = {
                    "name": name,
                    "threads": threads,
                    "dtype": dtype,
                    "prefill_ms": round(r["prefill_s"] * 1e3, 2),
                    "decode_ms": round(r["decode_s"] * 1e3, 3),
                    "prefill_ratio": round(r["prefill_s"] / base["prefill_s"], 3),
                    "decode_ratio": round(r["decode_s"] / base["decode_s"], 3),
                    "peak_mib": round(r["peak_bytes"] / 2**20),
                    "device": r["device"],
                    "command": " ".join(["python benchmarks/bench_infer.py", folder, "--threads", str(threads), "--dtype", dtype])
                    + ("" if args.dense_above is None else f" --dense-above {args.dense_above}"),
                }
                rows.append(row)
                keys = ("prefill_ms", "prefill_ratio", "decode_ms", "decode_ratio", "peak_mib")
                table.append((name, dtype, threads, *(row[k] for k in keys)))
                print(table[-1], flush=True)
    header = ("checkpoint", "dtype", "threads", f"prefill 1×{args.prompt} ms", "× dense", "decode ms/token", "× dense", "peak MiB")
    text = (
        f"{args.device}, torch {torch.__version__}; prefill of 1 × {args.prompt} tokens, {args.new_tokens} greedy decoding steps "
        f"with the KV cache, median of {args.repeats}; ratios to dense at the same dtype and threads\n\n"
        + markdown_table(header, table)
        + "\n"
    )
    print("\n" + text)
    if args.out:
        save_results(rows, args.out.with_suffix(".json"))
        args.out.with_suffix(".md").write_text(text)
        plot(rows, args.out.with_suffix(".png"))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(r["dtype"], r["threads"]) for r in rows})
    names = list(dict.fromkeys(r["name"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    width = 0.8 / len(settings)
    for ax, key, title in zip(axes, ("prefill_ratio", "decode_ratio"), ("prefill", "decoding step"), strict=True):
        for i, (dtype, threads) in enumerate(settings):
            by_name = {r["name"]: r[key] for r in rows if (r["dtype"], r["threads"]) == (dtype, threads)}
            xs = [j + i * width for j in range(len(names))]
            ax.bar(xs, [by_name.get(n, float("nan")) for n in names], width, label=f"{dtype}, {threads} thread(s)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=30, ha="right")
        ax.set_title(f"{title} time, × dense")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def dense_path(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, module.dequantized(x.dtype))


def microseconds(fn: Any, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def kernel_rows(args: argparse.Namespace) -> None:
    """Time an int4 / int8 linear of the built-in model's MLP shape through its kernel and through dequantise-and-matmul."""
    from distill_lr import quant

    torch.set_num_threads(args.threads[0])
    table = []
    for bits in (4, 8):
        q = quant.rtn(torch.randn(1536, 576), quant.QuantSpec(bits, 128))
        module = q.module(None, torch.bfloat16)
        kernel = module.int_kernel()
        for rows in (1, 4, 16, 32, 64, 128, 512):
            x = torch.randn(rows, 576, dtype=torch.bfloat16)
            paths = (partial(kernel, x), partial(dense_path, module, x))
            table.append((f"int{bits}", rows, *(f"{microseconds(fn, args.repeats):.0f}" for fn in paths)))
    print(f"\n{device_name()}, bfloat16, a 1536×576 linear (g128)\n")
    print(markdown_table(("grid", "rows", "kernel µs", "dequantize + matmul µs"), table))


def factor_forms(args: argparse.Namespace) -> None:
    """Time each low-rank module of one layer of ``--forms RUN`` as two linears ``B(A x)`` and as its dense product."""
    from safetensors import safe_open

    torch.set_num_threads(args.threads[0])
    folder = Path(args.forms)
    ranks = json.loads((folder / "config.json").read_text())["distill_lr"]["ranks"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    layers = sorted({".".join(m.split(".")[:3]) for m in ranks})  # model.layers.<i>
    layer = layers[len(layers) // 2]
    table = []
    for module in sorted(m for m in ranks if m.startswith(layer + ".")):
        with safe_open(folder / index[f"{module}.A.weight"], framework="pt") as fh:
            a, b = fh.get_tensor(f"{module}.A.weight"), fh.get_tensor(f"{module}.B.weight")
        for dtype in args.dtype:
            A, B = a.to(getattr(torch, dtype)), b.to(getattr(torch, dtype))
            W = B @ A
            for rows in (1, args.prompt):
                x = torch.randn(rows, A.shape[1], dtype=A.dtype)
                dense = microseconds(partial(torch.nn.functional.linear, x, W), args.repeats)
                two = microseconds(partial(two_linears, x, A, B), args.repeats)
                kept = A.shape[0] * (A.shape[1] + B.shape[0]) / W.numel()
                name, shape = module.removeprefix(layer + "."), f"{W.shape[0]}×{W.shape[1]}"
                table.append((name, shape, A.shape[0], f"{kept:.2f}", dtype, rows, f"{dense:.0f}", f"{two:.0f}", f"{two / dense:.2f}"))
    header = ("module", "shape", "rank", "params kept", "dtype", "rows", "dense µs", "B(A x) µs", "ratio")
    print(f"\n{device_name()}, {layer} of {folder.name}\n\n" + markdown_table(header, table))


def two_linears(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(torch.nn.functional.linear(x, A), B)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", default=[DENSE], help="checkpoint folders; 'dense' is the built-in model")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write <out>.json, .md and .png (e.g. docs/infer)")
    parser.add_argument("--rows", action="store_true", help="time the integer kernels against dequantize-and-matmul by rows")
    parser.add_argument("--dense-above", type=float, help="load with distill_lr_dense_above: pairs keeping this share run dense")
    parser.add_argument("--forms", metavar="RUN", help="time one layer's factor pairs as B(A x) and as their dense product")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # one cell, in a fresh process
    args = parser.parse_args()
    if args.rows:
        kernel_rows(args)
    elif args.forms:
        factor_forms(args)
    elif args.one:
        measure_one(args)
    else:
        run_grid(args)


if __name__ == "__main__":
    main()
