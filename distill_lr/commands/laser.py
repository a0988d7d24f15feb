"""LASER on a checkpoint, streamed one decoder layer at a time: one intervention, or a sweep to find the best.

    distill-lr laser sweep                                  # the default grid on the built-in model
    distill-lr laser sweep --layers 20 24 28 --types mlp_out --rhos 0.1 0.01 --write-best runs/laser-best
    distill-lr laser apply --layer 28 --types mlp_out --rho 0.01 --output runs/laser-28
    distill-lr laser apply --layer 3 --types q k --rank 8 --higher --output runs/laser-hi

A sweep evaluates every (layer, module type, ρ) on held-out perplexity and on task accuracy (the
built-in ``builtin:wiki-lastword`` task unless ``--tasks`` names JSON-lines files), prints a table, the
best intervention per module type and the saving of re-running only the layers above each
intervention, and writes ``laser_sweep.json``, ``laser_sweep.md`` and heat-maps (``laser_sweep.png``)
to ``--out``. ``--write-best OUT`` writes the best one as a checkpoint that ``load_compressed`` and
``trust_remote_code`` load.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from distill_lr.analysis import laser
from distill_lr.analysis.sweep import Model, SweepResult, badness, best_per_type, run_sweep
from distill_lr.analysis.tables import device_name, markdown_table, save_results
from distill_lr.builtin import BUILTIN_MODEL, BUILTIN_TEXT, resolve_model_dir
from distill_lr.data import bos_prefix, build_token_sets, held_out_documents, load_documents
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
    held_out = held_out_documents(len(documents), 0.1, 0)  # as build_token_sets above holds them out
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


def heatmaps(dense: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    """Per module type, layer × ρ coloured by the change in held-out loss (and in accuracy of the first task), symmetric-log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import SymLogNorm

    types = list(dict.fromkeys(r["type"] for r in rows))
    layers = sorted({r["layer"] for r in rows})
    values = sorted({r["value"] for r in rows}, reverse=True)
    task = next(iter(dense.get("tasks", {})), None)
    panels = [("Δ held-out loss (nats)", lambda r: r["loss"] - dense["loss"], "RdBu_r", 0.01)]
    if task:
        base_acc = dense["tasks"][task]["acc"]
        panels.append((f"Δ {task} acc (points)", lambda r: 100 * (r["tasks"][task]["acc"] - base_acc), "RdBu", 1.0))
    fig, axes = plt.subplots(len(panels), len(types), figsize=(2.4 * len(types) + 1.5, 2.8 * len(panels)), squeeze=False)
    for row, (title, value_of, cmap, linear) in enumerate(panels):
        cells = {(r["type"], r["value"], r["layer"]): value_of(r) for r in rows}
        limit = max(abs(v) for v in cells.values()) or 1.0
        norm = SymLogNorm(linthresh=linear, vmin=-limit, vmax=limit)
        for col, t in enumerate(types):
            grid = torch.full((len(values), len(layers)), float("nan"))
            for (kind, v, layer), change in cells.items():
                if kind == t:
                    grid[values.index(v), layers.index(layer)] = change
            ax = axes[row][col]
            image = ax.imshow(grid.numpy(), cmap=cmap, norm=norm, aspect="auto")
            ax.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=6)
            ax.set_yticks(range(len(values)), [str(v) for v in values], fontsize=7)
            ax.set_title(t, fontsize=9)
            ax.set_xlabel("layer", fontsize=7)
        axes[row][0].set_ylabel(f"ρ kept\n{title}", fontsize=7)
        fig.colorbar(image, ax=list(axes[row]), shrink=0.85, label=title)
    fig.subplots_adjust(hspace=0.45)
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
    heatmaps(result.dense, result.rows, args.out / "laser_sweep.png")
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
        row = min(result.rows, key=lambda r: badness(r, by))
        intervention = laser.Intervention(row["layer"], (row["type"],), row["value"], args.higher)
        report = laser.write_intervened(resolve_model_dir(args.model), args.write_best, intervention, overwrite=args.overwrite)
        print(f"wrote {intervention.name()} to {args.write_best} (parameter change {report['parameter_change']:+,})")


def plot(args: argparse.Namespace) -> None:
    saved = json.loads(args.sweep_json.read_text())
    heatmaps(saved["dense"], saved["rows"], args.sweep_json.with_suffix(".png"))


def apply(args: argparse.Namespace) -> None:
    value: Any = args.rank if args.rank is not None else args.rho
    intervention = laser.Intervention(args.layer, tuple(args.types), value, args.higher)
    report = laser.write_intervened(resolve_model_dir(args.model), args.output, intervention, overwrite=args.overwrite)
    for name, info in report["matrices"].items():
        print(f"{name}: rank {info['rank']}, {info['stored']}, {info['params']:,} parameters (dense {info['dense_params']:,})")
    print(f"{report['intervention']}: parameter change {report['parameter_change']:+,}; written to {args.output}")


HELP = "LASER on a checkpoint: one intervention, or a sweep to find the best"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=BUILTIN_MODEL)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier LASER output in the same folder")
    sub = parser.add_subparsers(dest="command", required=True, metavar="action")
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
    s.add_argument("--out", type=Path, default=Path("runs/laser"), help="where laser_sweep.{json,md,png} go")
    s.add_argument("--write-best", help="write the best intervention as a checkpoint to this folder")
    p = sub.add_parser("plot", help="redraw the heat-maps of a saved laser_sweep.json")
    p.add_argument("sweep_json", type=Path)
    a = sub.add_parser("apply", help="one intervention, written as a checkpoint")
    a.add_argument("--layer", type=int, required=True)
    a.add_argument("--types", nargs="+", required=True)
    a.add_argument("--rho", type=float, default=0.1)
    a.add_argument("--rank", type=int, help="an integer rank instead of rho")
    a.add_argument("--higher", action="store_true")
    a.add_argument("--output", required=True)


def run(args: argparse.Namespace) -> int:
    logging.getLogger("distill_lr").setLevel(logging.WARNING)  # the sweep's table is the output
    {"sweep": sweep, "plot": plot, "apply": apply}[args.command](args)
    return 0
