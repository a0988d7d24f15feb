"""Does compressing with the target domain's text help on that domain, and what does it cost elsewhere?

The built-in SmolLM2-135M is compressed with each method on code (``builtin:python``, the standard library) or on
Wikipedia (``builtin:wikipedia``) and scored on the held-out documents of both domains (files and articles never used
for calibration), at each ratio of decoder-linear weights removed::

    python benchmarks/bench_domain.py                                   # every row at 50, 70 and 80% removed
    python benchmarks/bench_domain.py --rows basis_selection@code distill@code --ratios 0.7
    python benchmarks/bench_domain.py --append --rows                   # redraw the table and plots from domain.json

Rows are ``variant@calibration``: a method, or a method with other settings (``VARIANTS``: Basis Selection end to end
on the language-modelling loss, distill with the loss-aware allocation). Every other run uses uniform ranks (Basis
Selection's setting: the same budget for every matrix) so that the methods differ in nothing else; the runs of one
calibration domain share one teacher pass.
Writes ``domain.md``, ``domain.json`` and one plot per evaluation domain (``domain-code.png``, ``domain-wiki.png``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill_lr.analysis.tables import device_name, markdown_table, save_results
from distill_lr.builtin import BUILTIN_CODE, BUILTIN_TEXT, builtin_model_dir
from distill_lr.checkpoint.compressed import load_compressed
from distill_lr.config import load_config
from distill_lr.data import build_token_sets, load_documents
from distill_lr.driver import compress

DOMAINS = {"code": BUILTIN_CODE, "wiki": BUILTIN_TEXT}
VARIANTS = {  # what a row's name before the @ runs; the first three are the default rows
    "whiten": ["method=whiten"],
    "distill": ["method=distill"],
    "basis_selection": ["method=basis_selection"],
    # the paper's setting: σ relearned and pruned end to end on the calibration text's own next tokens
    "basis_selection_e2e": ["method=basis_selection", "basis.regime=end_to_end", "e2e.enabled=true", "e2e.loss=lm", "e2e.epochs=2"],
    "distill_e2e": ["method=distill", "e2e.enabled=true", "e2e.loss=lm", "e2e.epochs=2"],  # the same stage after distill
    "distill_loss_aware": ["method=distill", "ranks.allocation=loss-aware"],  # the default allocation instead of uniform ranks
}
METHODS = tuple(VARIANTS)
ROWS = [f"{m}@{d}" for m in METHODS for d in DOMAINS]
DEFAULT_ROWS = [f"{m}@{d}" for m in METHODS[:3] for d in DOMAINS]
BASE = [
    "data.num_sequences=64",
    "data.seq_len=256",
    "data.eval_sequences=32",
    "ranks.allocation=uniform",
    "train.inputs=student",
    "train.epochs=2",
    "plot=false",
]
EVAL_SEQUENCES, SEQ_LEN = 32, 256


def held_out(domain: str, tokenizer: AutoTokenizer, windows: int = EVAL_SEQUENCES) -> torch.Tensor:
    """The held-out windows of a domain: the documents a run with ``BASE``'s data settings never calibrates on."""
    tokens = build_token_sets(
        load_documents(DOMAINS[domain]),
        tokenizer,
        num_sequences=1,
        seq_len=SEQ_LEN,
        eval_sequences=windows,
        eval_fraction=0.1,
        seed=0,
    )
    return tokens.evaluation


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    total = sum(float(model(input_ids=w[None], labels=w[None]).loss) for w in windows)
    return math.exp(total / len(windows))


def run_one(row: str, ratio: float, workdir: Path, windows: dict[str, torch.Tensor], extra: list[str]) -> dict:
    method, _, calibration = row.partition("@")
    out = workdir / f"{method}-{calibration}-{int(ratio * 100)}"
    overrides = [*BASE, *VARIANTS[method], f"data.source={DOMAINS[calibration]}", f"ranks.target={ratio}", *extra]
    where = [f"output={out}", f"teacher_cache={workdir / f'teacher-{calibration}'}", "overwrite=true"]
    report = compress(load_config(None, [*overrides, *where]))
    model = load_compressed(out, dtype=torch.float32)
    return {
        "row": row,
        "method": method,
        "calibration": calibration,
        "ratio": ratio,
        "removed": report.params.removed_fraction,
        "ppl": {domain: perplexity(model, w) for domain, w in windows.items()},
        "seconds": report.seconds,
        "command": "python scripts/compress.py " + " ".join(overrides),
    }


def markdown(rows: list[dict], dense: dict[str, float]) -> str:
    cells = [
        (
            f"{r['removed']:.1%}",
            r["method"],
            r["calibration"],
            *(f"{r['ppl'][d]:.4g} ({r['ppl'][d] / dense[d]:.3g}×)" for d in DOMAINS),
            f"{r['seconds']:.0f} s",
        )
        for r in rows
    ]
    header = ("removed", "method", "calibrated on", *(f"{d} perplexity (× dense)" for d in DOMAINS), "wall time")
    lines = [f"Dense perplexity: code {dense['code']:.3f}, wiki {dense['wiki']:.3f}.", "", markdown_table(header, cells, "rllrrr"), ""]
    for ratio in dict.fromkeys(r["ratio"] for r in rows):
        at = {r["row"]: r for r in rows if r["ratio"] == ratio}
        for method in METHODS:
            own, other = at.get(f"{method}@code"), at.get(f"{method}@wiki")
            if own and other:
                gain, cost = 1 - own["ppl"]["code"] / other["ppl"]["code"], own["ppl"]["wiki"] / other["ppl"]["wiki"] - 1
                lines.append(
                    f"- {ratio:.0%}, {method}: calibrated on code, code perplexity {gain:.0%} lower than calibrated on Wikipedia "
                    f"({own['ppl']['code']:.4g} vs {other['ppl']['code']:.4g}); Wikipedia perplexity {cost:+.0%} "
                    f"({own['ppl']['wiki']:.4g} vs {other['ppl']['wiki']:.4g})."
                )
        coded = {m: at[f"{m}@code"]["ppl"]["code"] for m in METHODS if f"{m}@code" in at}
        if coded:
            best = min(coded, key=coded.__getitem__)
            lines.append(
                f"- {ratio:.0%}, on code, calibrated on code: best {best} ({coded[best]:.4g}); "
                + ", ".join(f"{m} {v:.4g}" for m, v in coded.items())
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], dense: dict[str, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for domain in DOMAINS:
        fig, ax = plt.subplots(figsize=(6, 4))
        for row in dict.fromkeys(r["row"] for r in rows):
            pts = sorted((r["removed"] * 100, r["ppl"][domain]) for r in rows if r["row"] == row)
            style = "-" if row.endswith("@code") else "--"
            ax.plot(*zip(*pts, strict=True), style, marker="o", label=row)
        ax.axhline(dense[domain], color="grey", linestyle=":", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("decoder-linear parameters removed (%)")
        ax.set_ylabel(f"held-out {domain} perplexity (log)")
        ax.set_title(f"SmolLM2-135M-Instruct on held-out {domain}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"domain-{domain}.png", dpi=120)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7, 0.8])
    rows_help = "variant@domain (default: the three methods' rows); none with --append: redraw"
    parser.add_argument("--rows", nargs="*", default=DEFAULT_ROWS, choices=ROWS, metavar="ROW", help=rows_help)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides for every run")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where domain.md, domain.json and the plots go")
    parser.add_argument("--workdir", type=Path, help="keep the compressed folders here (default: a temporary folder)")
    parser.add_argument("--append", action="store_true", help="add the rows to those of domain.json instead of replacing them")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = args.out / "domain.json"
    saved = json.loads(results.read_text()) if args.append and results.is_file() else {}
    rows, dense = saved.get("rows", []), saved.get("dense")
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir())
    windows = {domain: held_out(domain, tokenizer) for domain in DOMAINS}
    if dense is None:
        model = AutoModelForCausalLM.from_pretrained(builtin_model_dir(), dtype=torch.float32)
        dense = {domain: perplexity(model, w) for domain, w in windows.items()}
    with tempfile.TemporaryDirectory(prefix="bench-domain-") as tmp:
        workdir = args.workdir or Path(tmp)
        for ratio in args.ratios:
            for row in args.rows:
                rows = [r for r in rows if (r["row"], r["ratio"]) != (row, ratio)] + [run_one(row, ratio, workdir, windows, args.set)]
                done = rows[-1]
                print(
                    f"{row:>22} @ {ratio:.0%}: code {done['ppl']['code']:.4g}, wiki {done['ppl']['wiki']:.4g} ({done['seconds']:.0f} s)",
                    flush=True,
                )
                save_results({"device": device_name(), "dense": dense, "rows": rows}, results)  # partial results survive a stop
    rows.sort(key=lambda r: (r["ratio"], ROWS.index(r["row"])))
    table = markdown(rows, dense)
    (args.out / "domain.md").write_text(table)
    plot(rows, dense, args.out)
    print(table)


if __name__ == "__main__":
    main()
