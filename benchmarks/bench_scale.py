"""Memory, time and counted work at Mixtral-8x7B scale, on a CPU or a GPU.

Builds a random-weight checkpoint with Mixtral-8x7B's real layer shapes (hidden 4096, 8 experts of 14336,
32 query / 8 key-value heads) and a few of its 32 layers, compresses it once per run (each in a fresh
process), and prints per phase (loss-aware pre-pass, load, teacher pass, init, training, quantization,
write, student pass) the seconds, the peak host and GPU memory against a stated bound, and the work
counted while it ran (``work_count.PhaseWork``: FLOPs of products and of solvers, bytes an unfused
execution moves) with the rate reached against this machine's measured matrix-multiply peak; then the
projected time for all 32 layers::

    python benchmarks/bench_scale.py --device cpu                    # 1 layer, 8 x 256 tokens, runs: default qlr
    python benchmarks/bench_scale.py --device cuda --layers 3        # 128 x 2048 tokens
    python benchmarks/bench_scale.py --device cpu --runs default --set train.epochs=2

Runs: ``default`` is the default pipeline (loss-aware allocation pre-pass, whitened-SVD init, distillation);
``qlr`` is 4-bit GPTQ of every projection with trained rank-32 corrections. On a CPU the default run removes
half of the weights (``ranks.target=0.5``) so that its training state fits a 24 GB machine; on a GPU it is
the flagship's 20%. Weights are random, so losses and perplexity mean nothing here.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import synchronize, timed
from transformers import MixtralConfig

from distill_lr.analysis.tables import device_name, markdown_table, save_results
from distill_lr.builtin import BUILTIN_TEXT, builtin_model_dir

FULL_LAYERS = 32
MIXTRAL = {"hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2}  # Mixtral-8x7B
MIXTRAL |= {"num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768, "rope_theta": 1e6}
TINY = {**MIXTRAL, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}  # smoke test
RUNS = {
    "default": ["method=distill", "init=whiten"],
    "qlr": ["method=qlr", "quant.bits=4", "quant.correction_rank=32", "quant.correction_train=true"],
}
SCALE = {  # per device: layers, calibration sequences x tokens, the default run's fraction removed
    "cpu": {"layers": 1, "num_sequences": 8, "seq_len": 256, "target": 0.5},
    "cuda": {"layers": 3, "num_sequences": 128, "seq_len": 2048, "target": 0.2},
}
TRAIN_STATE_BYTES = 20  # per trainable float32 parameter: itself, its gradient, two AdamW moments, the best-so-far copy
PHASES = ("prepass", "load", "teacher", "init", "quant", "correct", "train", "save", "student")


def matmul_peak_tflops(device: str) -> tuple[float, str]:
    """This machine's measured matrix-multiply rate in the dtype the run trains in (bf16 on a GPU, float32 on a CPU)."""
    size, dtype = (8192, torch.bfloat16) if device == "cuda" else (2048, torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    seconds, _ = timed(lambda: a @ b, device, 10)
    return 2 * size**3 / seconds / 1e12, str(dtype).removeprefix("torch.")


def child(spec_path: Path) -> None:
    """One compression in this process, its work counted per phase; the report and the counts go to ``spec['result']``."""
    from work_count import PhaseWork

    from distill_lr.config import load_config
    from distill_lr.driver import compress
    from distill_lr.runtime import peak_memory_gib, resolve_device

    spec = json.loads(spec_path.read_text())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(None, spec["overrides"])
    baseline = peak_memory_gib(resolve_device(cfg.device))["host"]  # the interpreter and its libraries, before any work
    with PhaseWork() as work:
        report = compress(cfg)
    result = {"report": report.to_dict(), "work": dict(work.totals), "ops": dict(work.ops), "baseline_gib": baseline}
    result["file_bytes"] = {p.name: p.stat().st_size for p in (Path(cfg.output) / "layers").glob("*.safetensors")}
    save_results(result, Path(spec["result"]))


def profile_step(output: Path, device: str, batch: int, seq_len: int, trace: Path) -> str:
    """One training step (forward + backward of the compressed top layer's factors, as ``train`` runs it) under
    ``torch.profiler``: the Chrome trace to ``trace``, the top operations as a Markdown table, and on a GPU the host
    synchronisations the step made (``torch.cuda.set_sync_debug_mode``)."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    from distill_lr.checkpoint.compressed import load_compressed
    from distill_lr.layerwise import capture_inputs, embed, run_layer
    from distill_lr.schema import TrainConfig
    from distill_lr.train import factor_modules, layer_objective

    model = load_compressed(output, device=device, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    layers = model.model.layers
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    _, kwargs = capture_inputs(model, layers, ids[:1])
    x = embed(model, layers, ids, batch)
    for layer, layer_kwargs in zip(layers[:-1], kwargs, strict=False):
        x = run_layer(layer, x, layer_kwargs, batch)
    layer = layers[-1].requires_grad_(False)
    for module in factor_modules(layer).values():
        module.float().requires_grad_(True)
    y = run_layer(layer, x, kwargs[-1], batch)
    objective = layer_objective(layer, (x, x, y), kwargs[-1], TrainConfig(batch_size=batch))
    idx = torch.arange(batch)
    objective.loss(idx, backward=True)  # warm-up: kernels chosen, workspaces allocated
    layer.zero_grad(set_to_none=True)  # as every optimizer step starts: no accumulation into the warm-up's gradients
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with warnings.catch_warnings(record=True) as syncs:
        warnings.simplefilter("always")
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        with profile(activities=activities) as prof:
            objective.loss(idx, backward=True)
            synchronize(device)
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    prof.export_chrome_trace(str(trace))
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:15]
    total = sum(getattr(e, key) for e in prof.key_averages()) or 1
    rows = [[e.key, e.count, f"{getattr(e, key) / 1e3:.1f}", f"{getattr(e, key) / total:.0%}"] for e in events]
    lines = [f"One training step of layer {len(layers) - 1} on {batch} x {seq_len} tokens (trace: {trace.name}):", ""]
    lines.append(markdown_table(["operation", "calls", "self ms", "share"], rows))
    if device == "cuda":
        found = [str(w.message).splitlines()[0] for w in syncs if "synchroniz" in str(w.message)]
        lines += ["", f"Host synchronisations inside the step: {len(found)}" + (f" (first: {found[0]})" if found else "")]
    return "\n".join(lines)


def linear_shapes(config: MixtralConfig) -> list[tuple[int, int]]:
    """(out, in) of every linear of one decoder layer: attention, router, each expert's three projections."""
    h, inter, e = config.hidden_size, config.intermediate_size, config.num_local_experts
    kv = config.num_key_value_heads * h // config.num_attention_heads
    return [(h, h), (kv, h), (kv, h), (h, h), (e, h)] + [(inter, h), (inter, h), (h, inter)] * e


def memory_bound(config: MixtralConfig, result: dict[str, Any], compute_bytes: int, checkpoint_bytes: int, device: str) -> dict[str, float]:
    """The bound each phase's peak is checked against, in GiB, by part: what the README promises (the non-layer weights,
    one layer computing and the next read ahead, the caches) plus the training state of one layer's trainable factors
    (the factor pairs; under qlr the corrections) and, on the host, the process itself."""
    report = result["report"]
    layer = sum(out * inp for out, inp in linear_shapes(config))
    params = report["params"]
    trainable = (params["factor_params"] + params["added_params"]) / config.num_hidden_layers
    parts = {
        "non-layer weights": 2 * config.vocab_size * config.hidden_size * compute_bytes,
        "layer computing": layer * compute_bytes,
        "next layer read ahead": layer * checkpoint_bytes if device == "cpu" else 0,  # read into host memory
        "activation caches": report["activation_cache"]["gib"] * 2**30,
        "training state": trainable * TRAIN_STATE_BYTES,
        "process": result["baseline_gib"] * 2**30 if device == "cpu" else 0,
    }
    return {k: v / 2**30 for k, v in parts.items() if v}


def phase_rows(result: dict[str, Any], peak_tflops: float, bound: float, device: str) -> list[list[Any]]:
    """One table row per phase and layer: seconds, peaks, counted work and its rate."""
    report, work = result["report"], result["work"]
    where = "gpu" if device == "cuda" else "host"
    allocation = report.get("allocation") or {}
    timed_phases = [("prepass", 0, "-", allocation.get("prepass_seconds"), allocation.get("prepass_peak_gib"))]
    for n, layer in enumerate(report["layers"]):
        timed_phases += [(p, n, layer["layer"], s, layer["peak_gib"][p]) for p, s in layer["seconds"].items()]
    rows = []
    for phase, n, index, seconds, peaks in timed_phases:
        if seconds is None:
            continue
        counted = work.get(f"{phase}:{n}", {"matmul": 0, "linalg": 0, "bytes": 0})
        rate = (counted["matmul"] + counted["linalg"]) / seconds / 1e12 if seconds else 0.0
        gpu = f"{peaks.get('gpu', 0.0):.1f}" if device == "cuda" else "-"
        counts = [f"{counted['matmul'] / 1e9:,.0f}", f"{counted['linalg'] / 1e9:,.0f}", f"{counted['bytes'] / 1e9:,.1f}"]
        rows.append([phase, index, f"{seconds:.1f}", f"{peaks['host']:.1f}", gpu, f"{peaks[where] / bound:.2f}", *counts])
        rows[-1] += [f"{rate * 1e3:,.0f}", f"{rate / peak_tflops:.0%}"]
    return rows


def projection(report: dict[str, Any], layers: int) -> tuple[float, float, float]:
    """(minutes for all 32 layers, fixed seconds, seconds per layer): the pre-pass scales with depth, the rest per layer."""
    per_layer = [sum(layer["seconds"].values()) for layer in report["layers"]]
    steady = per_layer[1:] or per_layer
    prepass = (report.get("allocation") or {}).get("prepass_seconds") or 0.0
    fixed = report["seconds"] - sum(per_layer) - prepass
    mean = sum(steady) / len(steady)
    return (fixed + prepass * FULL_LAYERS / layers + FULL_LAYERS * mean) / 60, fixed, mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, help="decoder layers built and compressed (cpu 1, cuda 3)")
    parser.add_argument("--num-sequences", type=int, help="calibration sequences (cpu 8, cuda 128)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (cpu 256, cuda 2048)")
    parser.add_argument("--runs", nargs="+", choices=tuple(RUNS), default=list(RUNS))
    parser.add_argument("--tiny", action="store_true", help="a 256-wide stand-in with the same structure: checks the script in seconds")
    parser.add_argument("--data", default=BUILTIN_TEXT, help="calibration text (default: the built-in Wikipedia sample)")
    parser.add_argument("--tokenizer", type=Path, help="a folder with tokenizer files (default: the built-in model's)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-scale"))
    parser.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides for every run")
    parser.add_argument("--reuse", action="store_true", help="take a run's result from --workdir when its settings are the same")
    parser.add_argument("--profile", action="store_true", help="also profile one training step of the last run's output")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for but no CUDA GPU is visible: use --device cpu")
    scale = SCALE[args.device]
    layers, sequences, seq_len = (getattr(args, k) or scale[k] for k in ("layers", "num_sequences", "seq_len"))
    tokenizer = args.tokenizer or builtin_model_dir()

    from transformers import AutoTokenizer

    from distill_lr.testing import write_random_checkpoint

    vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    shape = TINY if args.tiny else MIXTRAL
    config = MixtralConfig(**shape, num_hidden_layers=layers, vocab_size=vocab, architectures=["MixtralForCausalLM"])
    model_dir = args.workdir / f"{'tiny' if args.tiny else 'mixtral'}-random-{layers}"
    start = time.perf_counter()
    if not (model_dir / "model.safetensors.index.json").exists() and not (model_dir / "model.safetensors").exists():
        write_random_checkpoint(config, model_dir, tokenizer, device=args.device)
    build_s = time.perf_counter() - start
    peak, peak_dtype = matmul_peak_tflops(args.device)
    common = [
        f"model={model_dir}",
        "overwrite=true",
        f"device={args.device}",
        f"data.source={args.data}",
        f"data.num_sequences={sequences}",
        f"data.seq_len={seq_len}",
        "evaluate=false",
        "plot=false",  # no matplotlib needed (a bare GPU machine)
        "train.epochs=1",
        f"ranks.target={scale['target']}",
        # As configs/mixtral_8x7b.yaml: whole 16-byte widths, so the experts' grouped matmuls apply (8 suits the stand-in).
        f"ranks.rank_multiple={8 if args.tiny else 64}",
    ]
    header = ["phase", "layer", "s", "host GiB", "GPU GiB", "peak / bound", "matmul GFLOP", "solver GFLOP", "GB moved", "GFLOP/s"]
    header.append("of peak")
    summary: dict[str, Any] = {"device": device_name(args.device), "peak_tflops": peak, "peak_dtype": peak_dtype, "runs": {}}
    lines = [
        f"{device_name(args.device)}; measured {peak_dtype} matmul peak {peak * 1e3:,.0f} GFLOP/s",
        f"random {'tiny ' * args.tiny}Mixtral-8x7B-shaped checkpoint, {layers} of {FULL_LAYERS} layers (built in {build_s:.0f} s); "
        f"calibration {sequences} x {seq_len} tokens",
    ]
    for name in args.runs:
        overrides = [*common, f"output={args.workdir / ('out-' + name)}", *RUNS[name], *args.set]
        spec, result_path = args.workdir / f"{name}.spec.json", args.workdir / f"{name}.result.json"
        reused = args.reuse and result_path.exists() and json.loads(spec.read_text())["overrides"] == overrides
        if not reused:
            result_path.unlink(missing_ok=True)
            save_results({"overrides": overrides, "result": str(result_path)}, spec)
            subprocess.run([sys.executable, __file__, "--child", str(spec)], check=True)
        result = json.loads(result_path.read_text())
        report = result["report"]
        compute_bytes = 4 if args.device == "cpu" else 2
        parts = memory_bound(config, result, compute_bytes, 2, args.device)
        bound = sum(parts.values())
        minutes, fixed, mean = projection(report, layers)
        lines += [
            "",
            f"### {name}: {' '.join(overrides[2:])}",
            "",
            markdown_table(header, phase_rows(result, peak, bound, args.device), "l" + "r" * (len(header) - 1)),
            "",
            f"Bound {bound:.1f} GiB = " + " + ".join(f"{k} {v:.1f}" for k, v in parts.items()) + ".",
            f"Whole run {report['seconds']:.0f} s; projected Mixtral-8x7B ({FULL_LAYERS} layers): {minutes:.1f} min "
            f"({fixed:.0f} s fixed + pre-pass x {FULL_LAYERS / layers:.0f} + {FULL_LAYERS} x {mean:.1f} s).",
        ]
        summary["runs"][name] = {"overrides": overrides, "bound_gib": parts, "projected_min": minutes, **result}
    if args.profile:
        last = args.workdir / f"out-{args.runs[-1]}"
        micro = 1 if args.device == "cpu" else 8
        lines += ["", "### Profile", "", profile_step(last, args.device, micro, seq_len, args.workdir / "step_trace.json")]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out is not None:
        save_results(summary, args.out.with_suffix(".json"))
        args.out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
