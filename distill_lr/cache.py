"""Activation caches: where the hidden states that travel up the stack are kept.

While layer i is compressed the driver holds, for the calibration and for the evaluation
sequences, the teacher input, the student input and the teacher output: three tensors of
sequences × seq_len × hidden. At Mixtral scale (128 × 2048 × 4096 in bf16) that is 6 GiB, which
fits on an 80 GB GPU beside the layer being trained; larger calibration sets go to pinned host
memory, and beyond that to memory-mapped files on disk. The values are the same wherever they
live and every batch is computed on the compute device, so the result does not depend on the
placement.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import psutil
import torch

PLACEMENTS = ("auto", "device", "host", "disk")
STREAMS = 3  # teacher input, student input and teacher output are alive at once
# GPU memory kept free for the layer being compressed, as a multiple of its weights: the dense
# layer, float32 factors with their gradients and AdamW moments, and the training activations.
LAYER_WORKSPACE = 10
HOST_SHARE = 0.5  # at most this share of the available host memory goes to caches


def cache_bytes(sequences: int, seq_len: int, hidden: int, dtype: torch.dtype) -> int:
    """Peak bytes of the activation caches of one run (all streams, calibration and evaluation)."""
    return STREAMS * sequences * seq_len * hidden * dtype.itemsize


def choose_placement(requested: str, need: int, device: torch.device, layer_bytes: int) -> str:
    """``device`` when the caches fit on the GPU beside one layer's workspace, else ``host`` when they fit
    in half the available RAM, else ``disk``. On a CPU run ``device`` and ``host`` are the same memory."""
    if requested != "auto":
        return requested
    fits_host = need <= psutil.virtual_memory().available * HOST_SHARE
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need + LAYER_WORKSPACE * layer_bytes <= free:
            return "device"
        return "host" if fits_host else "disk"
    return "device" if fits_host else "disk"


class ActivationCache:
    """Allocates the cache tensors in the chosen place; ``disk`` tensors are mapped from unlinked temporary files,
    so nothing is left behind, even after a crash."""

    def __init__(self, placement: str, device: torch.device, folder: Path, total_bytes: int = 0) -> None:
        if placement not in PLACEMENTS[1:]:
            raise ValueError(f"cache placement {placement!r}: use one of {PLACEMENTS[1:]}")
        self.placement, self.device, self.folder, self.total_bytes = placement, device, folder, total_bytes

    @property
    def disk_bytes(self) -> int:
        """What the caches will take on disk at their peak (0 unless ``disk``)."""
        return self.total_bytes if self.placement == "disk" else 0

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.placement == "device":
            return torch.empty(shape, dtype=dtype, device=self.device)
        if self.placement == "host":
            return torch.empty(shape, dtype=dtype, pin_memory=self.device.type == "cuda")
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.folder, prefix=".activations-", suffix=".bin")
        os.close(fd)
        try:
            flat = torch.from_file(name, shared=True, size=int(torch.Size(shape).numel()), dtype=dtype)
        finally:
            os.unlink(name)  # the mapping keeps the data; the space is freed with the tensor
        return flat.view(shape)

    def empty_like(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.empty(tuple(tensor.shape), tensor.dtype)
