"""The picture of a run, ``report.png``: per-layer error, the training curves, the rank plan, perplexity before and after.

Drawn from ``report.json`` alone, so a finished run can be redrawn (``distill-lr plot RUN``). matplotlib
is optional (the ``analysis`` and ``bench`` extras): without it a run logs one line saying how to get the picture.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from distill_lr.checkpoint.files import atomic_file

log = logging.getLogger("distill_lr")
REPORT_PNG = "report.png"


def draw_run(report: dict[str, Any], path: Path) -> bool:
    """Write the run's picture to ``path`` (atomically); False, with one log line, when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("no %s: `pip install matplotlib` (or distill-lr[analysis]) draws it, also later with python -m distill_lr.plots", path)
        return False
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    _errors(axes[0][0], report["layers"])
    _curves(axes[0][1], report["layers"])
    _plan(fig, axes[1][0], (report.get("allocation") or {}).get("kept"))
    _perplexity(axes[1][1], report)
    params, method = report["params"], report["config"].get("method", "")
    removed = f"{params['removed_fraction']:.1%} of the decoder-linear weights removed"
    fig.suptitle(f"{Path(report['input']).name}, method {method}: {removed}")  # nothing of this invocation: a resume draws the same
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, metadata={"Software": None})  # no version stamp: the same run, the same bytes
    plt.close(fig)
    return True


def _errors(ax: Any, layers: list[dict[str, Any]]) -> None:
    index = [layer["layer"] for layer in layers]
    ax.plot(index, [layer.get("err_teacher_input") for layer in layers], marker="o", ms=3, label="on the dense layers' inputs")
    ax.plot(index, [layer.get("err_student_input") for layer in layers], marker="o", ms=3, label="on the compressed stack's inputs")
    ax.set(title="relative output error per layer ‖Ŷ − Y‖ / ‖Y‖", xlabel="decoder layer", ylabel="relative error")
    ax.xaxis.set_major_locator(_whole_numbers())
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _curves(ax: Any, layers: list[dict[str, Any]]) -> None:
    trained = [layer for layer in layers if (layer.get("train") or {}).get("curve")]
    ax.set(title="held-out distillation loss while training, / its value at init", xlabel="step", ylabel="held-out loss ratio")
    if not trained:
        ax.text(0.5, 0.5, "no layer-wise training in this run", ha="center", va="center", transform=ax.transAxes)
        return
    import matplotlib

    colors = matplotlib.colormaps["viridis"]
    for layer in trained:
        init = layer["train"]["init_holdout"] or 1.0
        curve = layer["train"]["curve"]
        ax.plot(
            [0] + [p["step"] for p in curve],
            [1.0] + [p["holdout_loss"] / init for p in curve],
            lw=1,
            color=colors(layer["layer"] / len(layers)),
        )
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(alpha=0.3)
    ax.text(0.99, 0.98, "colour: layer, dark = bottom", ha="right", va="top", fontsize=8, transform=ax.transAxes)


def _plan(fig: Any, ax: Any, kept: dict[str, dict[str, float]] | None) -> None:
    ax.set(title="rank plan: kept fraction of each matrix's parameters (1 = dense)")
    if not kept:
        ax.text(0.5, 0.5, "no rank plan in this report", ha="center", va="center", transform=ax.transAxes)
        return
    modules = list(dict.fromkeys(m for row in kept.values() for m in row))
    grid = [[row.get(m, float("nan")) for m in modules] for row in kept.values()]
    image = ax.imshow(grid, aspect="auto", vmin=0.0, vmax=1.0, cmap="magma", interpolation="nearest")
    ax.set_xticks(range(len(modules)), [m.rsplit(".", 1)[-1] for m in modules], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("decoder layer")
    ax.yaxis.set_major_locator(_whole_numbers())
    fig.colorbar(image, ax=ax, fraction=0.04)


def _whole_numbers() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _perplexity(ax: Any, report: dict[str, Any]) -> None:
    ppl = report.get("perplexity")
    ax.set(title="held-out perplexity")
    if not ppl:
        ax.text(0.5, 0.5, "not evaluated (evaluate=false)", ha="center", va="center", transform=ax.transAxes)
        return
    bars = ax.bar(["dense", "compressed"], [ppl["dense"], ppl["compressed"]], color=["#777777", "#c0504d"])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel(f"perplexity on {ppl['eval_tokens']:,} held-out tokens")
