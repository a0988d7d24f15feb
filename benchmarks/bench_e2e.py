"""End-to-end stage benchmark on the built-in SmolLM2-135M and the built-in Wikipedia text.

One layer-wise run (a ``bench_quality`` row, same calibration settings) is compressed once; each variant copies
its folder and resumes it with the end-to-end stage on and its own ``e2e.*`` overrides,
so every variant starts from the same factors and is scored on the same held-out calibration slice (the KL
curve) and the same held-out documents (perplexity). The table also gives each variant's stage estimate at
Llama-2-7B shapes (20% removed), so a lighter optimizer's memory and its KL are read side by side::

    python benchmarks/bench_e2e.py                                  # AdamW against Adafactor, 24 steps (docs/e2e.md)
    python benchmarks/bench_e2e.py --steps 96 --variant adamw --variant adafactor e2e.optimizer=adafactor
    python benchmarks/bench_e2e.py --base distill/loss-aware --variant lr3e-3 e2e.lr=3e-3
    python benchmarks/bench_e2e.py --estimates                      # the 7B estimates per process, 1/2/4 processes

``--variant NAME KEY=VALUE ...`` (repeatable) names a variant and its overrides; without any, the default pair.
Held-out evaluations come every ``--eval-every`` steps and never stop a variant early, so the curves are whole.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from bench_quality import SMALL, run_one
from common import line_plot

from distill_lr.analysis.tables import markdown_table, save_results
from distill_lr.checkpoint.files import human_bytes
from distill_lr.config import load_config
from distill_lr.driver import compress
from distill_lr.schema import E2EConfig
from distill_lr.stages import e2e

DEFAULT_VARIANTS = [["adamw"], ["adafactor", "e2e.optimizer=adafactor"]]
# Llama-2-7B's shapes at 20% of its decoder-linear weights removed, bf16 compute, 512-token micro-batches of one
# sequence: the figure docs/allocation.md quotes for the stage's memory on one GPU.
LLAMA_7B = {"hidden": 4096, "layers": 32, "heads": 32, "vocab": 32000}
LLAMA_7B_FACTORS = int(0.8 * 32 * (4 * 4096**2 + 3 * 4096 * 11008))  # of the decoder linears' weights, 80% kept
LLAMA_7B_OTHER = 2 * 32000 * 4096 + (2 * 32 + 1) * 4096  # embeddings, head, norms
LLAMA_7B_OUTSIDE = 2 * 32000 * 4096 + 4096  # embeddings, head, final norm: whole in each process of a sharded stage


def stage_settings(overrides: list[str]) -> E2EConfig:
    """The variant's ``e2e.*`` settings (its other overrides aside)."""
    return load_config(None, [o for o in overrides if o.startswith("e2e.")]).e2e


def estimate_7b(overrides: list[str], processes: int = 1) -> e2e.Estimate:
    """The stage's estimate per process at Llama-2-7B shapes under the variant's ``e2e.*`` settings."""
    settings = replace(stage_settings(overrides), micro_batch_size=1)
    return e2e.estimate(LLAMA_7B_FACTORS, LLAMA_7B_OTHER, 2, LLAMA_7B, settings, 512, (processes, LLAMA_7B_OUTSIDE))


def estimates_table() -> str:
    """The 7B-class estimate per process for each optimizer, with and without checkpointing, on 1, 2 and 4 processes
    (the stage sharded by FSDP)."""
    rows = []
    for optimizer in ("adamw", "adafactor"):
        for checkpointing in ("false", "true"):
            overrides = [f"e2e.optimizer={optimizer}", f"e2e.gradient_checkpointing={checkpointing}"]
            sharded = optimizer == "adamw"  # Adafactor is refused with several processes
            cells = [human_bytes(estimate_7b(overrides, n).total) if n == 1 or sharded else "refused" for n in (1, 2, 4)]
            rows.append([optimizer, checkpointing, *cells])
    return markdown_table(["optimizer", "gradient checkpointing", "1 process", "2 processes", "4 processes"], rows, align="llrrr")


def run_variant(name: str, overrides: list[str], base: dict, steps: int, eval_every: int, workdir: Path) -> dict:
    """The base folder, copied and resumed with the stage on for ``steps`` steps."""
    out = workdir / f"e2e-{name}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(base["output"], out)
    per_epoch = math.ceil(base["train_sequences"] / stage_settings(overrides).batch_size)
    settings = ["e2e.enabled=true", f"e2e.max_steps={steps}", f"e2e.epochs={math.ceil(steps / per_epoch)}", "e2e.patience=1000"]
    settings.append(f"e2e.evals_per_epoch={max(1, per_epoch // eval_every)}")
    config = [*base["overrides"], *settings, *overrides, f"output={out}", f"teacher_cache={workdir / 'teacher'}"]
    report = compress(load_config(None, config))
    assert report.perplexity is not None and report.e2e is not None
    need = estimate_7b(overrides)
    return {
        "variant": name,
        "overrides": overrides,
        "init_kl": report.e2e["init_holdout"],
        "best_kl": report.e2e["best_holdout"],
        "best_step": report.e2e["best_step"],
        "steps": report.e2e["steps"],
        "curve": [(p["step"], p["holdout_kl"]) for p in report.e2e["curve"]],
        "ppl": report.perplexity.compressed,
        "dense_ppl": report.perplexity.dense,
        "seconds": report.seconds,
        "estimate_7b_gib": need.total / 2**30,
        "command": "python scripts/compress.py " + " ".join(o for o in config if not o.startswith(("output=", "teacher_cache="))),
    }


def markdown(rows: list[dict], base: dict) -> str:
    ref = rows[0]
    cells = [
        (
            r["variant"],
            " ".join(r["overrides"]) or "(defaults)",
            f"{r['init_kl']:.4f}",
            f"{r['best_kl']:.4f} (step {r['best_step']})",
            f"{r['best_kl'] / ref['best_kl']:.3f}",
            f"{r['ppl']:.2f}",
            f"{r['estimate_7b_gib']:.1f} GiB",
            f"{r['seconds']:.0f} s",
        )
        for r in rows
    ]
    header = ("variant", "overrides", "held-out KL at start", f"best held-out KL in {ref['steps']} steps", "÷ first row")
    header += ("perplexity", "7B estimate", "stage time")
    lines = [
        f"Base: `{base['row']}` at {base['ratio']:.0%} removed (perplexity {base['ppl']:.2f}; dense {ref['dense_ppl']:.2f}), "
        f"{base['train_sequences']} training and {base['held_out']} held-out calibration sequences; each variant resumes a copy of it.",
        "",
        markdown_table(header, cells, align="llrrrrrr"),
        "",
    ]
    return "\n".join(lines) + "".join(f"\n- {r['variant']}: `{r['command']}`" for r in rows) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    series = {r["variant"]: tuple(zip(*[(0, r["init_kl"]), *r["curve"]], strict=True)) for r in rows}
    line_plot(series, ("end-to-end steps", "held-out KL to the dense model", "SmolLM2-135M-Instruct, end-to-end stage"), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="whiten/uniform", help="the layer-wise row (a bench_quality row) every variant continues")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--eval-every", type=int, default=3, help="steps between held-out evaluations")
    parser.add_argument("--variant", nargs="+", action="append", metavar="NAME [KEY=VALUE ...]", help="repeatable")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for the base and every variant")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where e2e.md, e2e.json and e2e.png go")
    parser.add_argument("--workdir", type=Path, help="keep the compressed folders here (default: a temporary folder)")
    parser.add_argument("--estimates", action="store_true", help="print the 7B-class estimates per process and stop (no run)")
    args = parser.parse_args()
    if args.estimates:
        print(estimates_table())
        return
    logging.basicConfig(level=logging.WARNING)
    variants = args.variant or DEFAULT_VARIANTS
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        workdir = args.workdir or Path(tmp)
        layerwise = run_one(args.base, args.ratio, SMALL, args.set, workdir)
        cfg = load_config(None, [*SMALL, *args.set])
        held_out = max(1, math.ceil(cfg.data.num_sequences * E2EConfig().holdout_fraction))
        base = {
            "row": args.base,
            "ratio": args.ratio,
            "ppl": layerwise["ppl"],
            "output": workdir / f"{args.base.replace('/', '-')}-{int(args.ratio * 100)}",
            "overrides": layerwise["command"].removeprefix("python scripts/compress.py ").split(),
            "train_sequences": cfg.data.num_sequences - held_out,
            "held_out": held_out,
        }
        print(f"base {args.base} @ {args.ratio:.0%}: ppl {base['ppl']:.4g} ({layerwise['seconds']:.0f} s)", flush=True)
        rows: list[dict] = []
        for name, *overrides in variants:
            rows.append(run_variant(name, overrides, base, args.steps, args.eval_every, workdir))
            last = rows[-1]
            print(f"{name:>16}: best held-out KL {last['best_kl']:.4f}, ppl {last['ppl']:.4g} ({last['seconds']:.0f} s)", flush=True)
            save_results(rows, args.out / "e2e.json")  # partial results survive a stop
    table = markdown(rows, {**base, "output": str(base["output"])})
    (args.out / "e2e.md").write_text(table)
    plot(rows, args.out / "e2e.png")
    print(table)
    print("estimates at 7B: " + ", ".join(f"{r['variant']} {human_bytes(int(r['estimate_7b_gib'] * 2**30))}" for r in rows))


if __name__ == "__main__":
    main()
