"""What the analysis commands and the benchmarks print and save: the device's name, Markdown tables, JSON results."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from distill_lr.checkpoint.files import write_json_atomic


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name, or the CPU with the threads torch uses: the line every benchmark table starts from."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


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
