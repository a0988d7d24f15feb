"""The machine a run computes on: device and dtype from the settings, timing that waits for the GPU, host memory
handed back, and what to say when a layer's outputs overflow the dtype in use."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
import time
from collections.abc import Callable

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
