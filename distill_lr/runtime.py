"""The machine a run computes on: device and dtype from the settings, timing that waits for the GPU, the seconds and
peak memory of each phase, host memory handed back, and what to say when a layer's outputs overflow the dtype in use."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distill_lr.errors import UserInputError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserInputError(f"device '{name}' is not a torch device: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device '{name}' asked for but no CUDA GPU is visible: use device=cpu or device=auto")
    return device


def resolve_dtype(name: str, auto: torch.dtype) -> torch.dtype:
    return auto if name == "auto" else getattr(torch, name)


def elapsed(start: float) -> float:
    """Seconds since ``start`` (``time.perf_counter``), rounded, once the GPU's queued work is done (it is asynchronous)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return round(time.perf_counter() - start, 3)


PhaseListener = Callable[[str, bool], None]
# Called with (phase, True) as a phase starts and (phase, False) as it ends: a benchmark attributes counted work to phases.
PHASE_LISTENERS: list[PhaseListener] = []
_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the host's resident peak (Linux ``clear_refs``; elsewhere it stays the process's) and the GPU's."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    """The peaks since ``reset_peak_memory``: ``host`` (resident set) and, on a GPU, ``gpu`` (allocated by torch)."""
    try:
        host = int(re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text()).group(1)) * 1024  # type: ignore[union-attr]
    except (OSError, AttributeError):
        import resource  # not on Windows; macOS counts bytes, Linux kB

        host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    peaks = {"host": round(host / 2**30, 3)}
    if device.type == "cuda":
        peaks["gpu"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return peaks


@dataclass
class PhaseLog:
    """Seconds and peak memory of each named phase (a layer's load, teacher pass, method steps, write, student pass).

    ``with phases("init"): ...`` times the block, records its memory peaks and tells ``PHASE_LISTENERS``.
    """

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)
    peak_gib: dict[str, dict[str, float]] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        reset_peak_memory(self.device)
        for listener in PHASE_LISTENERS:
            listener(name, True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = elapsed(start)
            self.peak_gib[name] = peak_memory_gib(self.device)
            for listener in PHASE_LISTENERS:
                listener(name, False)


def overflow_message(compute_dtype: torch.dtype, index: int, which: str) -> str:
    """What to say when decoder layer ``index``'s dense or compressed outputs are not finite, for the dtype in use."""
    dtype = str(compute_dtype).removeprefix("torch.")
    if compute_dtype == torch.float32:
        advice = "that is not a rounding overflow: check the checkpoint's weights and the calibration text"
    else:
        advice = f"the layer overflows {dtype}: run with dtype=float32"
    if which == "compressed":
        advice += f", or keep the layer dense with the rule '\"layers.{index}.**\": skip'"
    return f"decoder layer {index}'s {which} outputs hold inf or NaN in {dtype}: {advice}"


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up once (``find_library`` runs a subprocess); None elsewhere (musl, macOS)."""
    libc = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def release_freed_host_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``).

    glibc keeps the memory of freed tensors in its heap, fragmented; without a trim per layer the
    peak resident memory creeps up with depth (``benchmarks/bench_memory.py`` measures it).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
