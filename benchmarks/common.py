"""What the benchmarks share beyond ``distill_lr.analysis.tables``: timing that waits for the GPU."""

from __future__ import annotations

import time
from collections.abc import Callable
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
