"""What the benchmark scripts share: the device's name, timing, Markdown tables and saved results."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from distill_lr.checkpoint.files import write_json_atomic

T = TypeVar("T")


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name, or the CPU with the threads torch uses: the line every benchmark table starts from."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


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


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A Markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default: the first left, the rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def save_results(data: Any, path: Path) -> None:
    """The benchmark's numbers as JSON, written atomically (a stopped run leaves the last complete file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(data, path)
