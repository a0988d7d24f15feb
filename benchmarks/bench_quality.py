"""Quality benchmark on the built-in SmolLM2-135M and the built-in Wikipedia text.

Compresses at each ratio with every row (a method and a rank allocation) in one run and prints one
table (held-out perplexity, its multiple of dense, parameters kept, wall time), written as Markdown
with a PNG plot::

    python benchmarks/bench_quality.py                      # 2-core CPU defaults (docs/results.md)
    python benchmarks/bench_quality.py --large              # more calibration text and epochs, for a GPU
    python benchmarks/bench_quality.py --rows whiten/uniform whiten/loss-aware --ratios 0.2 --set train.lr=2e-2

A ``+e2e`` row continues the same ratio's row without it: its output folder is copied and resumed with
the end-to-end stage on, so the layer-wise pass is not paid twice (its wall time is the stage's run).
Perplexity is measured on held-out documents never used for calibration; the ratio counts the weights
of the decoder layers' linear projections only.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from common import line_plot

from distill_lr.analysis.tables import markdown_table, save_results
from distill_lr.config import load_config
from distill_lr.driver import compress

METHODS = {
    "svd": ["method=svd"],
    "pca": ["method=pca"],
    "whiten": ["method=whiten"],
    # Both inits train with the defaults (preconditioned, lr 1e-2): docs/measurements.md.
    "distill-svd": ["method=distill", "init=svd"],
    "distill": ["method=distill", "init=whiten"],
}
ALLOCATIONS = ("uniform", "bottom", "loss-aware")
ROWS = [f"{m}/{a}" for m in METHODS for a in ALLOCATIONS] + [f"{m}/{a}+e2e" for m in ("distill",) for a in ALLOCATIONS]
DEFAULT_ROWS = ["whiten/uniform", "whiten/bottom", "whiten/loss-aware", "distill/uniform", "distill/loss-aware", "distill/loss-aware+e2e"]
# Trained on the student stack's inputs only (each step costs half as much), 256 sequences x 2 epochs, a
# 1/16 hold-out: the settings that measured best within the CPU hour (docs/measurements.md).
TRAIN = ["train.inputs=student", "train.batch_size=4"]
SMALL = ["data.num_sequences=256", "data.seq_len=256", "data.eval_sequences=64", "train.epochs=2", "train.holdout_fraction=0.0625", *TRAIN]
LARGE = ["data.num_sequences=512", "data.seq_len=512", "data.eval_sequences=64", "train.epochs=4", *TRAIN]
# 24 steps of 8 sequences (most of one epoch over the 240 training sequences): about 12 minutes on 2 CPU cores.
E2E = ["e2e.enabled=true", "e2e.max_steps=24"]


def native_cpu_bf16() -> bool:
    """AVX512-BF16 or AMX: there bfloat16 training steps are faster (benchmarks/bench_autocast.py); elsewhere emulated."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def row_overrides(row: str) -> list[str]:
    method, _, allocation = row.removesuffix("+e2e").partition("/")
    return [*METHODS[method], f"ranks.allocation={allocation}", *(E2E if row.endswith("+e2e") else [])]


def run_one(row: str, ratio: float, base: list[str], extra: list[str], workdir: Path) -> dict:
    out = workdir / f"{row.replace('/', '-')}-{int(ratio * 100)}"
    if row.endswith("+e2e"):  # continue the layer-wise row: copy its folder, resume with the stage on
        source = workdir / f"{row.removesuffix('+e2e').replace('/', '-')}-{int(ratio * 100)}"
        if not source.is_dir():
            raise SystemExit(f"row {row} continues {row.removesuffix('+e2e')} at {ratio:.0%}: list that row first")
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(source, out)
    where = [f"output={out}", f"teacher_cache={workdir / 'teacher'}"]  # the runs share one teacher pass
    if not row.endswith("+e2e"):
        where.append("overwrite=true")
    overrides = [*base, *row_overrides(row), f"ranks.target={ratio}", *where, *extra]
    report = compress(load_config(None, overrides))
    ppl = report.perplexity
    assert ppl is not None  # the benchmark always evaluates
    allocation = report.allocation or {}
    return {
        "method": row,
        "ratio": ratio,
        "ppl": ppl.compressed,
        "dense_ppl": ppl.dense,
        "eval_tokens": ppl.eval_tokens,
        "removed": report.params.removed_fraction,
        "kept_params": report.params.model_after,
        "seconds": report.seconds,
        "prepass_seconds": allocation.get("prepass_seconds", 0.0),
        "e2e": report.e2e,
        "command": "python scripts/compress.py " + " ".join(o for o in overrides if o not in where),
    }


def markdown(rows: list[dict]) -> str:
    dense = rows[0]["dense_ppl"]
    lines = [
        f"Dense perplexity: **{dense:.2f}** on {rows[0]['eval_tokens']:,} held-out tokens. The runs share one teacher pass"
        " (`teacher_cache`): the first computes the dense layers' outputs, the others read them, so their wall times leave it out;"
        " a `+e2e` row's time is that of its stage (it continues the row without it).",
        "",
    ]
    cells = [
        (
            f"{r['removed']:.1%}",
            r["method"],
            f"{r['ppl']:.4g}",
            f"{r['ppl'] / dense:.3g}×",
            f"{r['kept_params']:,}",
            f"{r['seconds']:.0f} s" + (f" ({r['prepass_seconds']:.0f} s pre-pass)" if r.get("prepass_seconds") else ""),
        )
        for r in rows
    ]
    lines += [markdown_table(("removed", "row", "perplexity", "× dense", "params kept", "wall time"), cells, align="rlrrrr"), ""]
    for ratio in dict.fromkeys(r["ratio"] for r in rows):
        at = {r["method"]: r for r in rows if r["ratio"] == ratio}
        best = min(at.values(), key=lambda r: r["ppl"])
        lines.append(f"- {ratio:.0%} removed: best row {best['method']}, {best['ppl']:.4g} = {best['ppl'] / dense:.2f}× dense.")
        for method in ("whiten", "distill"):
            uniform, aware = at.get(f"{method}/uniform"), at.get(f"{method}/loss-aware")
            if uniform and aware:
                gain = 1 - aware["ppl"] / uniform["ppl"]
                lines.append(f"  - {method}: loss-aware {aware['ppl']:.4g} vs uniform {uniform['ppl']:.4g} ({gain:.0%} lower).")
        if at.get("whiten/uniform") and at.get("whiten/loss-aware"):
            cost = at["whiten/loss-aware"]["prepass_seconds"] / at["whiten/uniform"]["seconds"]
            lines.append(f"  - the allocation's pre-pass took {cost:.0%} of a uniform `whiten` run's time.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    series = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["removed"] * 100, r["ppl"]) for r in rows if r["method"] == method)
        series[method] = tuple(zip(*pts, strict=True))
    labels = ("decoder-linear parameters removed (%)", "held-out perplexity (log)", "SmolLM2-135M-Instruct, built-in Wikipedia text")
    line_plot(series, labels, path, log_y=True, reference=(rows[0]["dense_ppl"], "dense"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument(
        "--rows", nargs="*", default=DEFAULT_ROWS, choices=ROWS, metavar="METHOD/ALLOCATION[+e2e]", help="none with --append: redraw only"
    )
    parser.add_argument("--large", action="store_true", help="512 x 512 calibration tokens, 4 epochs (for a GPU)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides for every run")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where quality.md, quality.json and quality.png go")
    parser.add_argument("--workdir", type=Path, help="keep the compressed folders here (default: a temporary folder)")
    parser.add_argument("--append", action="store_true", help="add the rows to those of quality.json instead of replacing them")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = LARGE if args.large else SMALL
    if not torch.cuda.is_available() and native_cpu_bf16():
        base = [*base, "train.autocast=bfloat16"]  # on a GPU the default already is
    results = args.out / "quality.json"
    rows = json.loads(results.read_text()) if args.append and results.is_file() else []
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        workdir = args.workdir or Path(tmp)
        for ratio in args.ratios:
            for row in args.rows:
                rows.append(run_one(row, ratio, base, args.set, workdir))
                print(f"{row:>24} @ {ratio:.0%}: ppl {rows[-1]['ppl']:.4g} ({rows[-1]['seconds']:.0f} s)", flush=True)
                save_results(rows, results)  # partial results survive a stop
    rows.sort(key=lambda r: (r["ratio"], ROWS.index(r["method"]) if r["method"] in ROWS else -1))
    table = markdown(rows)
    (args.out / "quality.md").write_text(table)
    plot(rows, args.out / "quality.png")
    print(table)
    for r in rows:
        print(f"{r['method']} @ {r['ratio']:.0%}: {r['command']}")


if __name__ == "__main__":
    main()
