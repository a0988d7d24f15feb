"""What the benchmarks share beyond ``distill_lr.analysis.tables``: timing that waits for the GPU."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work (it is asynchronous) before a clock is read; nothing to wait for on a CPU."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], T], device: torch.device | str | None = None, repeats: int = 1, warmup: bool = True) -> tuple[float, T]:
    """Mean seconds of ``fn()`` over ``repeats`` calls (after one untimed call when ``warmup``), and its last result."""
    result = fn() if warmup else None
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats, result  # type: ignore[return-value]


def line_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    labels: tuple[str, str, str],
    path: Path,
    log_y: bool = False,
    reference: tuple[float, str] | None = None,
) -> None:
    """One line per named (x, y) series, with (x label, y label, title), and a dashed horizontal ``reference`` (value, label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", markersize=3, label=name)
    if reference is not None:
        ax.axhline(reference[0], color="grey", linestyle="--", label=reference[1])
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(labels[2])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
