"""LASER on a checkpoint, streamed one decoder layer at a time: one intervention, or a sweep to find the best.

    python scripts/laser.py sweep                                  # the default grid on the built-in model
    python scripts/laser.py sweep --layers 20 24 28 --types mlp_out --rhos 0.1 0.01 --write-best runs/laser-best
    python scripts/laser.py apply --layer 28 --types mlp_out --rho 0.01 --output runs/laser-28
    python scripts/laser.py apply --layer 3 --types q k --rank 8 --higher --output runs/laser-hi

A sweep evaluates every (layer, module type, ρ) on held-out perplexity and on task accuracy (the
built-in ``builtin:wiki-lastword`` task unless ``--tasks`` names JSON-lines files), prints a table, the
best intervention per module type and the saving of re-running only the layers above each
intervention, and writes ``laser_sweep.json``, ``laser_sweep.md`` and heat-maps (``laser_sweep.png``)
to ``--out``. ``--write-best OUT`` writes the best one as a checkpoint that ``load_compressed`` and
``trust_remote_code`` load.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from distill_lr import laser
from distill_lr.bench import device_name, markdown_table, save_results
from distill_lr.builtin import BUILTIN_MODEL, BUILTIN_TEXT, resolve_model_dir
from distill_lr.data import bos_prefix, build_token_sets, load_documents, split_documents
from distill_lr.errors import UserInputError
from distill_lr.sweep import Model, SweepResult, best_per_type, run_sweep
from distill_lr.tasks import BUILTIN_TASK, encode, load_tasks

DEFAULT_LAYERS = "every 4th"


def open_model(args: argparse.Namespace) -> Model:
    """The checkpoint with its held-out text and task streams."""
    from transformers import AutoTokenizer

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    folder = resolve_model_dir(args.model)
    m = Model.open(folder, device, dtype, args.batch_size)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    documents = load_documents(args.data)
    tokens = build_token_sets(
        documents, tokenizer, num_sequences=1, seq_len=args.seq_len, eval_sequences=args.eval_sequences, eval_fraction=0.1, seed=0
    )
    m.add_stream("text", tokens.evaluation)
    held_out, _ = split_documents(len(documents), 0.1, torch.Generator().manual_seed(0))  # as build_token_sets splits them
    for task in load_tasks(args.tasks, documents, held_out, n_examples=args.task_examples):
        encoded = encode(task, tokenizer, bos_prefix(tokenizer))
        m.add_stream(task.name, encoded.input_ids, encoded)
    return m


def table(result: SweepResult) -> str:
    tasks = list(result.dense.get("tasks", {}))
    header = ["layer", "type", "ρ", "loss", "Δ loss", "perplexity", *(f"{t} acc" for t in tasks), *(f"Δ {t} acc (pts)" for t in tasks)]
    rows = []
    for r in sorted(result.rows, key=lambda r: r["loss"]):
        accs = [r["tasks"][t]["acc"] for t in tasks]
        deltas = [100 * (r["tasks"][t]["acc"] - result.dense["tasks"][t]["acc"]) for t in tasks]
        rows.append([r["layer"], r["type"], r["value"], f"{r['loss']:.4f}", f"{r['loss'] - result.dense['loss']:+.4f}", f"{r['ppl']:.3f}"])
        rows[-1] += [f"{a:.3f}" for a in accs] + [f"{d:+.1f}" for d in deltas]
    return markdown_table(header, rows, align="rl" + "r" * (len(header) - 2))


def heatmaps(result: SweepResult, path: Path) -> None:
    """Per module type, layer × ρ coloured by the change in held-out loss (and in accuracy of the first task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = list(dict.fromkeys(r["type"] for r in result.rows))
    layers = sorted({r["layer"] for r in result.rows})
    values = sorted({r["value"] for r in result.rows}, reverse=True)
    task = next(iter(result.dense.get("tasks", {})), None)
    panels = [("Δ held-out loss", lambda r: r["loss"] - result.dense["loss"], "RdBu_r")]
    if task:
        base_acc = result.dense["tasks"][task]["acc"]
        panels.append((f"Δ {task} accuracy (points)", lambda r: 100 * (r["tasks"][task]["acc"] - base_acc), "RdBu"))
    fig, axes = plt.subplots(len(panels), len(types), figsize=(2.6 * len(types) + 1, 3.2 * len(panels)), squeeze=False)
    for row, (title, value_of, cmap) in enumerate(panels):
        grid = torch.full((len(values), len(layers)), float("nan"))
        cells = {(r["type"], r["value"], r["layer"]): value_of(r) for r in result.rows}
        limit = max(abs(v) for v in cells.values()) or 1.0
        for col, t in enumerate(types):
            for (kind, v, layer), change in cells.items():
                if kind == t:
                    grid[values.index(v), layers.index(layer)] = change
            ax = axes[row][col]
            image = ax.imshow(grid.numpy(), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
            ax.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
            ax.set_yticks(range(len(values)), [str(v) for v in values], fontsize=7)
            ax.set_title(f"{t}: {title}", fontsize=8)
            ax.set_xlabel("layer", fontsize=7)
            if col == 0:
                ax.set_ylabel("ρ (fraction of rank kept)", fontsize=7)
        fig.colorbar(image, ax=list(axes[row]), shrink=0.8)
    fig.savefig(path, dpi=120)


def sweep(args: argparse.Namespace) -> None:
    m = open_model(args)
    n = len(m.layers)
    layers = args.layers if args.layers else list(range(0, n, 4))
    result = run_sweep(m, layers, args.types, args.rhos, args.higher)
    by = args.best_by or ("acc" if result.dense.get("tasks") else "loss")
    best = best_per_type(result, by)
    args.out.mkdir(parents=True, exist_ok=True)
    save_results(
        {"dense": result.dense, "rows": result.rows, "best": best, "layer_forwards": result.layer_forwards}, args.out / "laser_sweep.json"
    )
    text = table(result)
    (args.out / "laser_sweep.md").write_text(text + "\n")
    heatmaps(result, args.out / "laser_sweep.png")
    print(
        f"\n{args.model}: {n} layers, {device_name(m.device)}; dense loss {result.dense['loss']:.4f} (perplexity {result.dense['ppl']:.3f})"
    )
    for name, score in result.dense.get("tasks", {}).items():
        print(f"dense {name}: acc {score['acc']:.3f}, acc_norm {score['acc_norm']:.3f} on {score['examples']} examples")
    print(text)
    print(f"\nbest per module type (by {by}):")
    for t, r in best.items():
        accs = ", ".join(f"{k} acc {v['acc']:.3f}" for k, v in r.get("tasks", {}).items())
        print(f"  {t}: layer {r['layer']}, ρ={r['value']}: loss {r['loss']:.4f} {accs}")
    saved = 1 - result.layer_forwards / result.naive_layer_forwards
    print(
        f"\n{len(result.rows)} interventions in {result.seconds:.0f} s: {result.layer_forwards:,} layer passes instead of "
        f"{result.naive_layer_forwards:,} re-running every layer ({saved:.0%} fewer; about "
        f"{result.naive_layer_forwards * result.seconds_per_layer_forward:.0f} s at the measured "
        f"{result.seconds_per_layer_forward:.3f} s a pass, heads and SVDs included)"
    )
    if args.write_best:
        row = min(result.rows, key=lambda r: r["loss"] if by == "loss" else -next(iter(r["tasks"].values()))["acc"])
        intervention = laser.Intervention(row["layer"], (row["type"],), row["value"], args.higher)
        report = laser.write_intervened(resolve_model_dir(args.model), args.write_best, intervention, overwrite=args.overwrite)
        print(f"wrote {intervention.name()} to {args.write_best} (parameter change {report['parameter_change']:+,})")


def apply(args: argparse.Namespace) -> None:
    value: Any = args.rank if args.rank is not None else args.rho
    intervention = laser.Intervention(args.layer, tuple(args.types), value, args.higher)
    report = laser.write_intervened(resolve_model_dir(args.model), args.output, intervention, overwrite=args.overwrite)
    for name, info in report["matrices"].items():
        print(f"{name}: rank {info['rank']}, {info['stored']}, {info['params']:,} parameters (dense {info['dense_params']:,})")
    print(f"{report['intervention']}: parameter change {report['parameter_change']:+,}; written to {args.output}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=BUILTIN_MODEL)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier LASER output in the same folder")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sweep", help="layers x module types x rho")
    s.add_argument("--layers", type=int, nargs="*", help=f"decoder layers to intervene on (default: {DEFAULT_LAYERS})")
    s.add_argument("--types", nargs="+", default=list(laser.MODULE_TYPES), help=f"module types: {', '.join(laser.MODULE_TYPES)}")
    s.add_argument("--rhos", type=float, nargs="+", default=[0.1, 0.01], help="fractions of the full rank kept")
    s.add_argument("--higher", action="store_true", help="keep the smallest components instead (drop the largest)")
    s.add_argument("--tasks", nargs="*", default=[BUILTIN_TASK], help="task files (.jsonl) or builtin:wiki-lastword")
    s.add_argument("--task-examples", type=int, default=60, help="examples of the built-in task")
    s.add_argument("--data", default=BUILTIN_TEXT, help="held-out text for the perplexity")
    s.add_argument("--eval-sequences", type=int, default=32)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--best-by", choices=["loss", "acc"], help="default: acc when there is a task, else loss")
    s.add_argument("--out", type=Path, default=Path("docs"), help="where laser_sweep.{json,md,png} go")
    s.add_argument("--write-best", help="write the best intervention as a checkpoint to this folder")
    a = sub.add_parser("apply", help="one intervention, written as a checkpoint")
    a.add_argument("--layer", type=int, required=True)
    a.add_argument("--types", nargs="+", required=True)
    a.add_argument("--rho", type=float, default=0.1)
    a.add_argument("--rank", type=int, help="an integer rank instead of rho")
    a.add_argument("--higher", action="store_true")
    a.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        (sweep if args.command == "sweep" else apply)(args)
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
