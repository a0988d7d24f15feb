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

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import psutil
import torch
import transformers

from distill_lr.checkpoint.files import atomic_writer
from distill_lr.errors import UserInputError

log = logging.getLogger("distill_lr")

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


def plan_cache(
    requested: str, folder: Path, tokens: int, hidden: int, layers: torch.nn.ModuleList, compute: tuple[torch.device, torch.dtype]
) -> ActivationCache:
    """Place the activation caches of ``tokens`` (all streams) where ``requested`` says, or by free memory; files go in ``folder``."""
    device, dtype = compute
    need = cache_bytes(tokens, 1, hidden, dtype)
    layer_bytes = max(sum(p.numel() for p in layer.parameters()) for layer in layers) * dtype.itemsize
    placement = choose_placement(requested, need, device, layer_bytes)
    log.info("activation caches: %.2f GiB at their peak, on %s", need / 2**30, placement)
    return ActivationCache(placement, device, folder, need)


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


class TeacherStore:
    """The dense layers' outputs on disk, for later runs over the same model, text and compute settings.

    Every run of a sweep (methods, ranks, training settings) computes the same teacher outputs; with
    a store the first run writes them and the others read them instead of running the dense layer
    (``teacher_cache``). The values are the stored bytes of what was computed, so a run that reads
    them gives the same result as one that computes them. The folder name hashes what the values
    depend on; a file name adds a hash of its stream's token ids. Files are raw tensors written
    atomically (``checkpoint.files.atomic_writer``), so a file that exists is complete.
    """

    CHUNK = 8  # sequences written per copy: no second full-size host copy of a stream that lives on the GPU

    def __init__(self, root: Path, key: dict[str, Any], tokens: dict[str, torch.Tensor]) -> None:
        self.folder = root / _digest(json.dumps(key, sort_keys=True).encode())
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserInputError(f"teacher_cache folder {root} cannot be used ({err.strerror}): choose another teacher_cache=") from err
        self._tags = {stream: _digest(t.cpu().contiguous().numpy().tobytes()) for stream, t in tokens.items()}
        self.read = self.written = 0

    @staticmethod
    def key(model_fingerprint: str, device: torch.device, dtype: torch.dtype, batch_size: int) -> dict[str, Any]:
        """What the dense layers' outputs depend on besides the token ids: the weights and the kernels that compute them."""
        kernels = torch.cuda.get_device_name(device) if device.type == "cuda" else torch.backends.cpu.get_cpu_capability()
        return {
            "model": model_fingerprint,
            "dtype": str(dtype),
            "device": device.type,
            "kernels": kernels,
            "batch_size": batch_size,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }

    def holds(self, stream: str) -> bool:
        """Whether the store keeps this stream's outputs (the calibration and evaluation text; task rows are not kept)."""
        return stream in self._tags

    def path(self, index: int, stream: str) -> Path:
        return self.folder / f"layer-{index:05d}-{stream}-{self._tags[stream]}.bin"

    def load_into(self, index: int, stream: str, out: torch.Tensor) -> bool:
        """Fill ``out`` with the stored outputs of layer ``index``; False (``out`` untouched) when there are none."""
        path = self.path(index, stream)
        if not path.is_file() or path.stat().st_size != out.numel() * out.element_size():
            return False
        out.copy_(torch.from_file(str(path), shared=False, size=out.numel(), dtype=out.dtype).view(out.shape))  # a lazy private map
        self.read += 1
        return True

    def save(self, index: int, stream: str, tensor: torch.Tensor) -> None:
        with atomic_writer(self.path(index, stream)) as fh:
            for start in range(0, len(tensor), self.CHUNK):
                chunk = tensor[start : start + self.CHUNK].detach().cpu().contiguous()
                fh.write(memoryview(chunk.view(torch.uint8).numpy()))
        self.written += 1

    def missing_bytes(self, layers: int, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> int:
        """Bytes the files not stored yet will take (``shapes``: each stream's outputs, the same at every layer)."""
        size = {stream: int(torch.Size(shape).numel()) * dtype.itemsize for stream, shape in shapes.items()}
        return sum(n for i in range(layers) for stream, n in size.items() if not self.path(i, stream).is_file())


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]
