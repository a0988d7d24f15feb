"""Quality benchmark on the built-in SmolLM2-135M and the built-in Wikipedia text.

Compresses at each ratio with every method in one run and prints one table (held-out perplexity,
its multiple of dense, parameters kept, wall time), written as Markdown with a PNG plot::

    python scripts/bench_quality.py                      # 2-core CPU defaults, about an hour (README: Results)
    python scripts/bench_quality.py --large              # more calibration text and epochs, for a GPU
    python scripts/bench_quality.py --methods whiten distill-whiten --ratios 0.2 --set train.lr=2e-2

Perplexity is measured on held-out documents never used for calibration; the ratio counts the
weights of the decoder layers' linear projections only.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch

from distill_lr.bench import markdown_table, save_results
from distill_lr.config import load_config
from distill_lr.driver import compress

METHODS = {
    "svd": ["method=svd"],
    "pca": ["method=pca"],
    "whiten": ["method=whiten"],
    # Both inits train with the defaults (preconditioned, lr 1e-2): docs/measurements.md.
    "distill-svd": ["method=distill", "init=svd"],
    "distill-whiten": ["method=distill", "init=whiten"],
}
# Trained on the student stack's inputs only (each step costs half as much), 256 sequences x 2 epochs, a
# 1/16 hold-out: the settings that measured best within the CPU hour (docs/measurements.md).
TRAIN = ["train.inputs=student", "train.batch_size=4"]
SMALL = ["data.num_sequences=256", "data.seq_len=256", "data.eval_sequences=64", "train.epochs=2", "train.holdout_fraction=0.0625", *TRAIN]
LARGE = ["data.num_sequences=512", "data.seq_len=512", "data.eval_sequences=64", "train.epochs=4", *TRAIN]


def native_cpu_bf16() -> bool:
    """AVX512-BF16 or AMX: there bfloat16 training steps are faster (scripts/bench_autocast.py); elsewhere emulated."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def run_one(method: str, ratio: float, base: list[str], extra: list[str], workdir: Path) -> dict:
    out = workdir / f"{method}-{int(ratio * 100)}"
    where = [f"output={out}", "overwrite=true", f"teacher_cache={workdir / 'teacher'}"]  # the runs share one teacher pass
    overrides = [*base, *METHODS[method], f"ranks.target={ratio}", *where, *extra]
    report = compress(load_config(None, overrides))
    ppl = report.perplexity
    assert ppl is not None  # the benchmark always evaluates
    return {
        "method": method,
        "ratio": ratio,
        "ppl": ppl.compressed,
        "dense_ppl": ppl.dense,
        "eval_tokens": ppl.eval_tokens,
        "removed": report.params.removed_fraction,
        "kept_params": report.params.model_after,
        "seconds": report.seconds,
        "command": "python scripts/compress.py " + " ".join(o for o in overrides if o not in where),
    }


def markdown(rows: list[dict]) -> str:
    dense = rows[0]["dense_ppl"]
    lines = [
        f"Dense perplexity: **{dense:.2f}** on {rows[0]['eval_tokens']:,} held-out tokens. The runs share one teacher pass"
        " (`teacher_cache`): the first computes the dense layers' outputs, the others read them, so their wall times leave it out.",
        "",
    ]
    cells = [
        (
            f"{r['removed']:.1%}",
            r["method"],
            f"{r['ppl']:.4g}",
            f"{r['ppl'] / dense:.3g}×",
            f"{r['kept_params']:,}",
            f"{r['seconds']:.0f} s",
        )
        for r in rows
    ]
    lines += [markdown_table(("removed", "method", "perplexity", "× dense", "params kept", "wall time"), cells, align="rlrrrr"), ""]
    for removed in dict.fromkeys(r["removed"] for r in rows):
        at = [r for r in rows if r["removed"] == removed]
        trained = min((r for r in at if r["method"].startswith("distill")), key=lambda r: r["ppl"], default=None)
        free = min((r for r in at if not r["method"].startswith("distill")), key=lambda r: r["ppl"], default=None)
        if trained and free:
            lines.append(
                f"- {removed:.1%} removed: best distill ({trained['method']}, {trained['ppl']:.4g}) is "
                f"{trained['ppl'] / free['ppl']:.2f}× the best training-free method ({free['method']}, {free['ppl']:.4g})."
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["removed"] * 100, r["ppl"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts, strict=True), marker="o", label=method)
    ax.axhline(rows[0]["dense_ppl"], color="grey", linestyle="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("decoder-linear parameters removed (%)")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("SmolLM2-135M-Instruct, built-in Wikipedia text")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--methods", nargs="+", default=["svd", "whiten", "distill-svd", "distill-whiten"], choices=list(METHODS))
    parser.add_argument("--large", action="store_true", help="512 x 512 calibration tokens, 4 epochs (for a GPU)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides for every run")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where quality.md, quality.json and quality.png go")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = LARGE if args.large else SMALL
    if not torch.cuda.is_available() and native_cpu_bf16():
        base = [*base, "train.autocast=bfloat16"]  # on a GPU the default already is
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        for ratio in args.ratios:
            for method in args.methods:
                rows.append(run_one(method, ratio, base, args.set, Path(tmp)))
                print(f"{method:>15} @ {ratio:.0%}: ppl {rows[-1]['ppl']:.4g} ({rows[-1]['seconds']:.0f} s)", flush=True)
                save_results(rows, args.out / "quality.json")  # partial results survive a stop
    table = markdown(rows)
    (args.out / "quality.md").write_text(table)
    plot(rows, args.out / "quality.png")
    print(table)
    for r in rows:
        print(f"{r['method']} @ {r['ratio']:.0%}: {r['command']}")


if __name__ == "__main__":
    main()
