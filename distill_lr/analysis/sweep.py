"""LASER sweeps: layers × module types × ρ, each evaluated on held-out perplexity and task accuracy.

An intervention at layer l leaves the layers below l as they are, so the dense pass stores the inputs
of every swept layer once; the interventions at layer l then start from those inputs and re-run only
layers l..L-1, all of them in step, so each layer above l is read from disk once per swept layer,
not once per intervention. Weights stream from the shards one layer at a time, as in the compressor.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from distill_lr.analysis import laser
from distill_lr.cache import ActivationCache, choose_placement
from distill_lr.checkpoint.reader import CheckpointReader, LayerLoader, load_non_layer_
from distill_lr.errors import check
from distill_lr.layerwise import embed, run_layer
from distill_lr.streams import Stream, score
from distill_lr.tasks import EncodedTask


@dataclass
class Model:
    """A checkpoint opened for layer-by-layer passes: the skeleton with its embeddings and head, and the streams."""

    reader: CheckpointReader
    model: PreTrainedModel
    prefix: str
    layers: nn.ModuleList
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    streams: list[Stream] = field(default_factory=list)

    @classmethod
    def open(cls, folder: str | Path, device: torch.device, dtype: torch.dtype, batch_size: int) -> Model:
        reader = CheckpointReader(folder)
        model, prefix, layers = reader.skeleton()
        load_non_layer_(model, reader, prefix, device, dtype)
        return cls(reader, model, prefix, layers, device, dtype, batch_size)

    def add_stream(self, name: str, ids: torch.Tensor, task: EncodedTask | None = None) -> None:
        self.streams.append(Stream.open(name, ids.to(self.device), self.model, self.layers, task))

    def embedded(self) -> dict[str, torch.Tensor]:
        return {s.name: embed(self.model, self.layers, s.ids, self.batch_size) for s in self.streams}

    def forward_(self, layer: nn.Module, index: int, hidden: dict[str, torch.Tensor]) -> None:
        """Every stream through decoder layer ``index``, in place."""
        for s in self.streams:
            run_layer(layer, hidden[s.name], s.kwargs[index], self.batch_size, out=hidden[s.name])

    def metrics(self, final: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Held-out loss and perplexity of the text stream, and each task's accuracy, from the last layer's outputs."""
        out: dict[str, Any] = {}
        for s in self.streams:
            scores = score(self.model, self.layers, s, final[s.name])
            if s.task is None:
                out.update(loss=scores["loss"], ppl=scores["ppl"])
            else:
                out.setdefault("tasks", {})[s.name] = scores
        return out


@dataclass
class SweepResult:
    dense: dict[str, Any]
    rows: list[dict[str, Any]]  # one per intervention: layer, type, value, higher, metrics
    layer_forwards: int  # what the sweep ran
    naive_layer_forwards: int  # every intervention from layer 0, plus the dense pass
    seconds: float
    seconds_per_layer_forward: float


def run_sweep(m: Model, layers: list[int], types: list[str], values: list[float | int], higher: bool = False) -> SweepResult:
    """Every (layer, module type, value) intervention, each evaluated from the dense inputs of its layer up."""
    laser.check_module_types(types)
    check(all(0 <= i < len(m.layers) for i in layers), f"layers must be in [0, {len(m.layers) - 1}], got {layers}")
    start = time.perf_counter()
    n = len(m.layers)
    loader = LayerLoader(m.reader, m.layers, m.prefix, read_ahead=False)
    try:
        dense, inputs = _dense_pass(m, loader, set(layers))
        rows, forwards = [], n
        for index in tqdm(sorted(set(layers)), desc="sweep", unit="layer"):
            configs = [laser.Intervention(index, (t,), v, higher) for t in types for v in values]
            for config, metrics in zip(configs, _from_layer(m, loader, index, inputs.pop(index), configs), strict=True):
                rows.append({"layer": index, "type": config.types[0], "value": config.value, "higher": higher, **metrics})
            forwards += len(configs) * (n - index)
    finally:
        loader.close()
    seconds = time.perf_counter() - start
    naive = n + len(rows) * n
    return SweepResult(dense, rows, forwards, naive, seconds, seconds / forwards)


def _dense_pass(m: Model, loader: LayerLoader, keep: set[int]) -> tuple[dict[str, Any], dict[int, dict[str, torch.Tensor]]]:
    """The dense model's metrics, and the inputs of each layer in ``keep`` (copied into activation caches)."""
    hidden = m.embedded()
    size = sum(h.numel() * h.element_size() for h in hidden.values()) * (len(keep) + 1)
    cache = ActivationCache(choose_placement("auto", size, m.device, 0), m.device, Path(tempfile.gettempdir()), size)
    inputs: dict[int, dict[str, torch.Tensor]] = {}
    for index in tqdm(range(len(m.layers)), desc="dense pass", unit="layer"):
        if index in keep:
            inputs[index] = {name: cache.empty_like(h).copy_(h) for name, h in hidden.items()}
        layer = loader.load(index, m.device, m.dtype)
        m.forward_(layer, index, hidden)
        layer.to("meta")
    return m.metrics(hidden), inputs


def _from_layer(
    m: Model, loader: LayerLoader, index: int, inputs: dict[str, torch.Tensor], configs: list[laser.Intervention]
) -> list[dict[str, Any]]:
    """The metrics of each intervention at layer ``index``: all of them advance through the layers above in step."""
    layer = loader.load(index, m.device, m.dtype)
    original = {t: {name: w.detach().clone() for name, w in laser.weights(layer, t).items()} for t in {c.types[0] for c in configs}}
    spectra = {t: {name: laser.Spectrum.of(w) for name, w in ws.items()} for t, ws in original.items()}
    streams = []
    for config in configs:
        t = config.types[0]
        current = laser.weights(layer, t)
        for name, matrix in current.items():
            laser.intervene_(matrix, config.value, config.higher, spectra[t][name])
        hidden = {name: h.clone() for name, h in inputs.items()}
        m.forward_(layer, index, hidden)
        streams.append(hidden)
        with torch.no_grad():
            for name, matrix in current.items():
                matrix.copy_(original[t][name])
    layer.to("meta")
    for above in range(index + 1, len(m.layers)):
        layer = loader.load(above, m.device, m.dtype)
        for hidden in streams:
            m.forward_(layer, above, hidden)
        layer.to("meta")
    return [m.metrics(hidden) for hidden in streams]


def badness(row: dict[str, Any], by: str) -> float:
    """What a sweep minimises: the held-out loss (``by="loss"``), or minus the accuracy of the first task (``"acc"``)."""
    return row["loss"] if by == "loss" else -next(iter(row["tasks"].values()))["acc"]


def best_per_type(result: SweepResult, by: str) -> dict[str, dict[str, Any]]:
    """The best intervention of each module type (see ``badness``)."""
    best: dict[str, dict[str, Any]] = {}
    for row in result.rows:
        if row["type"] not in best or badness(row, by) < badness(best[row["type"]], by):
            best[row["type"]] = row
    return best
