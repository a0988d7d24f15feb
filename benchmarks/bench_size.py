"""Size against quality on the built-in SmolLM2-135M and Wikipedia text: quantization, low rank, and the two composed.

Every row is one compression run with the calibration and held-out text of ``bench_quality.py``; it reports the
bytes of the decoder layers' linears as saved (codes, scales, factors, all in bfloat16 where floating) and the
held-out perplexity, in one table and one plot with the Pareto front::

    python benchmarks/bench_size.py                          # every default row, two runs at a time (2-core CPU)
    python benchmarks/bench_size.py --rows int4-gptq-g128 qlr3-r64 --jobs 1
    python benchmarks/bench_size.py --append --rows          # redraw the table and plot from size.json

Rows of a quantization library (llm-compressor's GPTQ, run by ``benchmarks/library_quant.py`` in its own
environment) are read from ``docs/size_library.json`` when it is there.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from bench_quality import E2E

from distill_lr.analysis.tables import markdown_table, save_results
from distill_lr.checkpoint.layout import MANIFEST_NAME
from distill_lr.config import load_config
from distill_lr.driver import compress

# Calibration and evaluation of bench_quality (256 x 256 calibration tokens, 64 x 256 held out), saved in bfloat16.
BASE = [
    "data.num_sequences=256",
    "data.seq_len=256",
    "data.eval_sequences=64",
    "train.epochs=2",
    "train.holdout_fraction=0.0625",
    "train.inputs=student",
    "train.batch_size=4",
    "save_dtype=bfloat16",
]
WHITEN, DISTILL = ["method=whiten"], ["method=distill", "init=whiten"]


def _quant(bits: int, method: str = "gptq", group: int = 128) -> list[str]:
    return [f"quant.bits={bits}", f"quant.method={method}", f"quant.group_size={group}"]


def _qlr(bits: int, rank: int, train: bool = False) -> list[str]:
    return ["method=qlr", *_quant(bits), f"quant.correction_rank={rank}", *(["quant.correction_train=true"] if train else [])]


# name -> (family, overrides)
ROWS: dict[str, tuple[str, list[str]]] = {
    "bf16": ("dense", [*WHITEN, "ranks.target=null"]),
    **{f"int{b}-gptq-g128": ("quantized", ["method=dense", *_quant(b)]) for b in (8, 4, 3, 2)},
    **{f"int{b}-rtn-g128": ("quantized", ["method=dense", *_quant(b, "rtn")]) for b in (8, 4, 3)},
    **{f"int{b}-gptq-g{g}": ("quantized", ["method=dense", *_quant(b, group=g)]) for b in (4, 3) for g in (64, 32)},
    **{f"whiten-{p}": ("low rank", [*WHITEN, f"ranks.target=0.{p // 10}"]) for p in (20, 40)},
    **{f"distill-{p}": ("low rank", [*DISTILL, f"ranks.target=0.{p // 10}"]) for p in (20, 40)},
    **{
        f"whiten-{p}+int{b}": ("low rank + quantized", [*WHITEN, f"ranks.target=0.{p // 10}", *_quant(b)]) for p in (20, 40) for b in (8, 4)
    },
    **{
        f"distill-{p}+int{b}": ("low rank + quantized", [*DISTILL, f"ranks.target=0.{p // 10}", *_quant(b)])
        for p in (20, 40)
        for b in (8, 4)
    },
    **{f"qlr{b}-r{r}": ("quantized + correction", _qlr(b, r)) for b in (4, 3, 2) for r in (16, 64, 128)},
    # one epoch of the layer-wise training (the distill rows take two): the CPU hour allows no more
    **{
        f"qlr{b}-r{r}-trained": ("quantized + correction", [*_qlr(b, r, train=True), "train.epochs=1"]) for b in (4, 3, 2) for r in (16, 64)
    },
    # the end-to-end stage of bench_quality's +e2e rows over the corrections (the integers frozen); -scales: the
    # quantization scales train too
    **{f"qlr{b}-r16+e2e": ("quantized + correction", [*_qlr(b, 16), *E2E]) for b in (4, 3)},
    **{f"qlr{b}-r16+e2e-scales": ("quantized + correction", [*_qlr(b, 16), *E2E, "e2e.train_scales=true"]) for b in (4, 3)},
}
DEFAULT_ROWS = [
    "bf16",
    "int8-gptq-g128",
    "int4-gptq-g128",
    "int3-gptq-g128",
    "int2-gptq-g128",
    "int4-rtn-g128",
    "int4-gptq-g64",
    "int3-gptq-g64",
    "whiten-20",
    "whiten-40",
    "whiten-20+int8",
    "whiten-20+int4",
    "whiten-40+int4",
    "qlr4-r16",
    "qlr3-r16",
    "qlr3-r64",
    "qlr2-r16",
    "qlr2-r64",
    "int4-gptq-g32",
    "distill-20+int4",
    "distill-20",
    "qlr3-r16-trained",
]


def run_one(name: str, workdir: str, threads: int) -> dict:
    """One row: its compression run (resumed when its folder holds the same settings; read back when finished)."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    family, overrides = ROWS[name]
    out = Path(workdir) / name
    where = [f"output={out}", f"teacher_cache={Path(workdir) / 'teacher'}"]
    cfg = load_config(None, [*BASE, *overrides, *where])
    manifest = json.loads((out / MANIFEST_NAME).read_text()) if (out / MANIFEST_NAME).is_file() else {}
    same = manifest.get("settings") == cfg.result_fingerprint()
    if not (same and manifest.get("complete") and (out / "report.json").is_file()):
        cfg.overwrite = not same  # a folder of other settings is replaced
        compress(cfg)
    report = json.loads((out / "report.json").read_text())
    ppl = report["perplexity"]
    return {
        "row": name,
        "family": family,
        "bytes": report["size"]["bytes"],
        "ppl": ppl["compressed"],
        "dense_ppl": ppl["dense"],
        "eval_tokens": ppl["eval_tokens"],
        "removed": report["params"]["removed_fraction"],
        "seconds": report["seconds"],
        "command": "python scripts/compress.py " + " ".join([*BASE, *overrides]),
        "fp32_bytes": report["params"]["decoder_linear_before"] * 4,
    }


def with_reference_rows(rows: list[dict], library: Path) -> list[dict]:
    """The rows plus dense float32 (the checkpoint as it is) and the library's rows when measured."""
    first = rows[0]
    fp32 = {
        "row": "fp32",
        "family": "dense",
        "bytes": first["fp32_bytes"],
        "ppl": first["dense_ppl"],
        "seconds": 0.0,
        "command": "(the input)",
    }
    extra = json.loads(library.read_text()) if library.is_file() else []
    return [fp32, *rows, *extra]


def pareto(rows: list[dict]) -> set[str]:
    """The rows that no other row beats with at most as many bytes."""
    front, best = set(), float("inf")
    for r in sorted(rows, key=lambda r: (r["bytes"], r["ppl"])):
        if r["ppl"] < best:
            front.add(r["row"])
            best = r["ppl"]
    return front


def compositions_that_pay(rows: list[dict]) -> list[str]:
    """Each low-rank composition on the Pareto front that beats every quantization-alone row of no more bytes, with that row."""
    alone = [r for r in rows if r["family"] in ("quantized", "library")]
    front = pareto(rows)
    lines = []
    for r in rows:
        if r["family"] not in ("low rank + quantized", "quantized + correction") or r["row"] not in front:
            continue
        cheaper = [q for q in alone if q["bytes"] <= r["bytes"]]
        rival = min(cheaper, key=lambda q: q["ppl"]) if cheaper else None
        if rival is None or r["ppl"] < rival["ppl"]:
            against = (
                f"best quantization-alone row at ≤ its bytes: {rival['row']} {rival['ppl']:.4g} at {rival['bytes'] / 1e6:.1f} MB"
                if rival
                else "no quantization-alone row is as small"
            )
            row = f"**{r['row']}** ({r['bytes'] / 1e6:.1f} MB, {r['ppl']:.4g})"
            lines.append(f"- {row} beats every quantization-alone row of no more bytes ({against}).")
    return lines or ["- No low-rank composition beats the quantization-alone rows of no more bytes."]


def markdown(rows: list[dict]) -> str:
    dense = rows[0]["ppl"]
    front = pareto(rows)
    bf16 = next((r["bytes"] for r in rows if r["row"] == "bf16"), rows[0]["bytes"] / 2)
    cells = [
        (
            ("**" + r["row"] + "**") if r["row"] in front else r["row"],
            r["family"],
            f"{r['bytes'] / 1e6:.1f}",
            f"{r['bytes'] / bf16:.1%}",
            f"{r['ppl']:.4g}",
            f"{r['ppl'] / dense:.3g}×",
            f"{r['seconds']:.0f} s" if r["seconds"] else "—",
        )
        for r in sorted(rows, key=lambda r: r["bytes"])
    ]
    header = ("row (bold: Pareto front)", "family", "decoder-linear MB", "of bf16", "perplexity", "× dense", "wall time")
    lines = [
        f"Dense perplexity **{dense:.2f}** on {rows[1].get('eval_tokens', 0):,} held-out tokens; bytes are those of the decoder"
        " layers' linears as saved (codes, scales and zero points, factors; bfloat16 where floating). The runs share one teacher"
        " pass (`teacher_cache`) and ran two at a time on the two cores, so wall times are indicative only.",
        "",
        markdown_table(header, cells, align="llrrrrr"),
        "",
        *compositions_that_pay(rows),
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    top = rows[0]["ppl"] * 20  # rows above (collapsed models) are drawn on the top edge with their value

    def shown(r: dict) -> float:
        return min(r["ppl"], top)

    markers = {"dense": "s", "quantized": "o", "library": "x", "low rank": "^", "low rank + quantized": "D", "quantized + correction": "P"}
    for family, marker in markers.items():
        pts = [r for r in rows if r["family"] == family]
        if pts:
            ax.scatter([r["bytes"] / 1e6 for r in pts], [shown(r) for r in pts], marker=marker, label=family, s=40)
            for r in pts:
                label = r["row"] if r["ppl"] <= top else f"{r['row']} ({r['ppl']:.3g}, off scale)"
                ax.annotate(label, (r["bytes"] / 1e6, shown(r)), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = sorted((r for r in rows if r["row"] in pareto(rows)), key=lambda r: r["bytes"])
    ax.step([r["bytes"] / 1e6 for r in front], [shown(r) for r in front], where="post", color="black", linewidth=0.8, label="Pareto front")
    ax.set_ylim(rows[0]["ppl"] * 0.9, top * 1.3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes of the decoder linears (MB, log)")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("SmolLM2-135M-Instruct: size against quality")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rows", nargs="*", default=DEFAULT_ROWS, choices=list(ROWS), metavar="ROW", help="none with --append: redraw only"
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each when more than one")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where size.md, size.json and size.png go")
    parser.add_argument("--workdir", type=Path, help="keep the compressed folders here (default: a temporary folder)")
    parser.add_argument("--append", action="store_true", help="add the rows to those of size.json instead of replacing them")
    args = parser.parse_args()
    results = args.out / "size.json"
    rows = json.loads(results.read_text()) if args.append and results.is_file() else []
    args.out.mkdir(parents=True, exist_ok=True)
    order = list(args.rows)  # the defaults: training-free rows first, for an early table (a stopped bench resumes each folder)
    threads = 1 if args.jobs > 1 else torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench-size-") as tmp:
        workdir = str(args.workdir or tmp)
        if order and "bf16" in order:  # first and alone: it fills the teacher cache the others read
            rows.append(run_one("bf16", workdir, torch.get_num_threads()))
            order.remove("bf16")
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for future in as_completed([pool.submit(run_one, name, workdir, threads) for name in order]):
                row = future.result()
                rows.append(row)
                print(f"{row['row']:>22}: {row['bytes'] / 1e6:7.1f} MB  ppl {row['ppl']:.4g}  ({row['seconds']:.0f} s)", flush=True)
                save_results(rows, results)  # partial results survive a stop
    rows.sort(key=lambda r: list(ROWS).index(r["row"]))
    save_results(rows, results)
    shown = with_reference_rows(rows, args.out / "size_library.json")
    table = markdown(shown)
    (args.out / "size.md").write_text(table)
    plot(shown, args.out / "size.png")
    print(table)


if __name__ == "__main__":
    main()
