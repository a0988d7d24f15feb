"""Data parallel per layer (``distill_lr.distributed``): one process against several, on the built-in SmolLM2-135M.

Each method runs once as a plain single process and once under ``torchrun --nproc-per-node N``, every process with
one thread (``OMP_NUM_THREADS=1``), so N processes use N cores where the single process uses one. The table gives
the mean per-layer wall time (the sum of a layer's phases in report.json), the speed-up, the share of that time
spent in collectives, the bytes all-reduced or broadcast per layer and per training step (what a projection to more
GPUs rests on), and the held-out perplexity of each run::

    python benchmarks/bench_distributed.py                   # whiten and distill, 1 and 2 processes (docs/distributed.md)
    python benchmarks/bench_distributed.py --processes 1 2 4 --methods whiten
    python benchmarks/bench_distributed.py --stage           # the end-to-end stage sharded by FSDP, 1 and 2 processes
    python benchmarks/bench_distributed.py --moe             # expert parallel statistics on a random MoE, 1 and 2 processes

``--moe``: expert parallelism on a random Mixtral-shaped model built here (``MOE``: 32 small experts, 4 routed per token,
where the experts' moments outweigh the layer's weights, as in DeepSeek-class models) and random text: ``whiten`` and
GPTQ int4 of every expert, 1 and N processes; the table adds the experts' moment bytes each process holds and the bytes
it exchanges per layer (rows sent to the experts' owners, moments and results broadcast).

``--stage``: one ``whiten`` run is compressed once; each process count resumes a copy of it with the end-to-end stage
on for ``STAGE``'s steps, so every count trains from the same factors; the table gives the stage's seconds per step
(its wall time, the loading of the layers and the held-out evaluations included, over its steps),
the held-out KL, the perplexity and the decoder layers' weights each process holds.

Run it alone on the machine: the processes share its cores with nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from distill_lr.analysis.tables import markdown_table, save_results

ROOT = Path(__file__).resolve().parents[1]
# 64 calibration windows of 256 tokens, the same uniform plan for every run (no pre-pass: it is not part of a layer's time)
SETTINGS = [
    "data.num_sequences=64",
    "data.seq_len=256",
    "data.eval_sequences=32",
    "ranks.target=0.2",
    "ranks.allocation=uniform",
    "train.epochs=1",
    "train.batch_size=8",
    "plot=false",
]


# the stage after the layer loop: 8 steps of 8 of the 60 training sequences, evaluated on the 4 held out at steps 4 and 8
STAGE = ["e2e.enabled=true", "e2e.max_steps=8", "e2e.batch_size=8", "e2e.micro_batch_size=2", "e2e.evals_per_epoch=2"]


def launch(method: str, processes: int, out: Path, extra: list[str], threads: int = 1) -> dict:
    """One run's report.json, from a plain process (1) or torchrun (several), ``threads`` each."""
    args = [f"method={method}", f"output={out}", *SETTINGS, *extra]
    script = str(ROOT / "scripts" / "compress.py")
    prefix = (
        [sys.executable]
        if processes == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([*prefix, script, *args], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "report.json").read_text())


def summary(report: dict) -> dict:
    """Per-layer means of wall time, collective time and bytes; bytes per training step."""
    layers = report["layers"]
    wall = sum(sum(layer["seconds"].values()) for layer in layers) / len(layers)
    comm = [layer.get("comm") or {} for layer in layers]
    comm_s = sum(p["seconds"] for c in comm for p in c.values()) / len(layers)
    comm_b = sum(p["bytes"] for c in comm for p in c.values()) / len(layers)
    steps = sum((layer.get("train") or {}).get("steps", 0) for layer in layers)
    train_b = sum(c.get("train.step", {}).get("bytes", 0) for c in comm)
    return {
        "layer_seconds": round(wall, 2),
        "comm_seconds": round(comm_s, 3),
        "comm_share": round(comm_s / wall, 4),
        "bytes_per_layer": int(comm_b),
        "bytes_per_step": int(train_b / steps) if steps else None,
        "phases": {k: round(sum(layer["seconds"][k] for layer in layers) / len(layers), 2) for k in layers[0]["seconds"]},
        "perplexity": report["perplexity"]["compressed"],
        "dense_perplexity": report["perplexity"]["dense"],
    }


def layer_row(name: str, n: int, r: dict, base: dict, column: str, digits: int) -> list:
    """One row of a per-layer table: ``r`` against the first process count's ``base``; ``column`` before the perplexity,
    printed with ``digits`` decimals."""
    drift = 100 * (r["perplexity"] / base["perplexity"] - 1)
    return [
        name,
        n,
        f"{r['layer_seconds']:.2f}",
        f"{base['layer_seconds'] / r['layer_seconds']:.2f}×",
        f"{100 * r['comm_share']:.1f}%",
        f"{r['bytes_per_layer'] / 2**20:.1f}",
        column,
        f"{r['perplexity']:.{digits}f} ({drift:+.{digits}f}%)",
    ]


def stage(processes: list[int], tmp: Path, extra: list[str]) -> list[list]:
    """The end-to-end stage from one layer-wise base, per process count: the table's rows."""
    base = tmp / "base"
    launch("whiten", 1, base, extra, threads=len(processes))  # not timed
    rows, results = [], {}
    for n in processes:
        shutil.copytree(base, tmp / f"stage-{n}")
        report = launch("whiten", n, tmp / f"stage-{n}", [*STAGE, *extra])  # --set may override STAGE
        results[n] = {**report["e2e"], "perplexity": report["perplexity"]["compressed"]}
        r, first = results[n], results[min(results)]
        print(n, {k: v for k, v in r.items() if k != "curve"}, flush=True)
        rows.append(
            [
                n,
                f"{r['seconds'] / r['steps']:.2f}",
                f"{(first['seconds'] / first['steps']) / (r['seconds'] / r['steps']):.2f}×",
                f"{r['init_holdout']:.4f} → {r['best_holdout']:.4f}",
                f"{r['perplexity']:.2f} ({100 * (r['perplexity'] / first['perplexity'] - 1):+.2f}%)",
                f"{r['layer_bytes_per_process'] / 2**20:.1f}",
            ]
        )
    save_results({"settings": SETTINGS + STAGE + extra, "results": results}, tmp / "stage.json")
    return rows


# a random MoE whose experts' moments outweigh its weights: 32 experts of width 256 on a 512-wide model, 4 routed per token
MOE = {"hidden_size": 512, "intermediate_size": 256, "num_local_experts": 32, "num_experts_per_tok": 4, "num_hidden_layers": 4}
MOE_RUNS = {"whiten": ("whiten", []), "gptq-int4": ("dense", ["quant.bits=4", "quant.group_size=64"])}  # name: method, settings


def moe(processes: list[int], tmp: Path, extra: list[str]) -> list[list]:
    """Each ``MOE_RUNS`` entry on the random MoE, per process count: the table's rows."""
    from distill_lr.testing import save_tiny, write_corpus

    model = save_tiny(tmp / "moe", "mixtral", shard_size=None, num_attention_heads=8, num_key_value_heads=4, **MOE)
    data = [f"model={model}", f"data.source={write_corpus(tmp / 'corpus.jsonl', n_docs=400)}"]
    rows, results = [], {}
    for name, (method, settings) in MOE_RUNS.items():
        for n in processes:
            report = launch(method, n, tmp / f"{name}-{n}", [*data, *settings, *extra])
            held = [e.get("moment_bytes_per_process") for layer in report["layers"] for e in (layer.get("experts") or {}).values()]
            results.setdefault(name, {})[n] = r = {**summary(report), "moment_bytes_per_process": max(held) if held and all(held) else None}
            first = results[name][min(results[name])]
            print(name, n, r, flush=True)
            moments = "" if r["moment_bytes_per_process"] is None else f"{r['moment_bytes_per_process'] / 2**20:.1f}"
            rows.append(layer_row(name, n, r, first, moments, digits=3))
    save_results({"settings": SETTINGS + extra, "model": MOE, "runs": MOE_RUNS, "results": results}, tmp / "moe.json")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["whiten", "distill"])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value settings for every run")
    parser.add_argument("--stage", action="store_true", help="the end-to-end stage instead of the layer loop's methods")
    parser.add_argument("--moe", action="store_true", help="expert parallel statistics on a random MoE instead")
    args = parser.parse_args()
    if args.moe:
        with tempfile.TemporaryDirectory() as tmp:
            rows = moe(args.processes, Path(tmp), args.set)
            shutil.copy(Path(tmp) / "moe.json", args.out / "distributed_moe.json")
        header = ["run", "processes", "s / layer", "speed-up", "in collectives", "MiB / layer", "expert moments / process (MiB)"]
        print(markdown_table([*header, "perplexity"], rows))
        return
    if args.stage:
        with tempfile.TemporaryDirectory() as tmp:
            rows = stage(args.processes, Path(tmp), args.set)
            shutil.copy(Path(tmp) / "stage.json", args.out / "distributed_stage.json")
        header = ["processes", "s / step", "speed-up", "held-out KL (start → best)", "perplexity", "layer weights / process (MiB)"]
        print(markdown_table(header, rows))
        return
    results: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for n in args.processes:
                results.setdefault(method, {})[n] = summary(launch(method, n, Path(tmp) / f"{method}-{n}", args.set))
                print(method, n, results[method][n], flush=True)
    rows = []
    for method, by_n in results.items():
        base = by_n[min(by_n)]
        for n, r in by_n.items():
            step = "" if r["bytes_per_step"] is None else f"{r['bytes_per_step'] / 2**20:.2f}"
            rows.append(layer_row(method, n, r, base, step, digits=2))
    header = ["method", "processes", "s / layer", "speed-up", "in collectives", "MiB / layer", "MiB / train step", "perplexity"]
    table = markdown_table(header, rows)
    print(table)
    save_results({"settings": SETTINGS + args.set, "results": results}, args.out / "distributed.json")


if __name__ == "__main__":
    main()
