"""Stages after the layer loop: what a stage sees of the finished run, and the interface a stage implements.

A method lists its stages (``Method.stages``); the registry adds the end-to-end stage to any method when
``e2e.enabled``. A stage runs after every layer file is written and before the folder is made complete.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Protocol

import torch
from torch import nn

from distill_lr.cache import ActivationCache
from distill_lr.checkpoint.manifest import RunManifest
from distill_lr.checkpoint.reader import CheckpointReader
from distill_lr.data import TokenSets
from distill_lr.report import RunReport
from distill_lr.schema import CompressConfig
from distill_lr.streams import Stream


class FinishedLayers(Protocol):
    """What a stage after the layer loop sees of the run (``distill_lr.run.Run``): the files and the streams at the top."""

    cfg: CompressConfig
    device: torch.device
    dtype: torch.dtype  # compute
    save_dtype: torch.dtype
    out: Path  # the output folder: every layer file is written and in the manifest
    reader: CheckpointReader
    model: nn.Module  # the skeleton with embeddings, final norm and head materialised
    prefix: str  # of the decoder layers' names
    layers: nn.ModuleList  # on meta again, with their compressed modules
    ranks: dict[str, int]  # full module name -> the rank plan's rank
    tokens: TokenSets
    cache: ActivationCache
    manifest: RunManifest
    report: RunReport
    streams: list[Stream]  # the calibration text first: teacher and student states after the last layer


class RunStage(ABC):
    """A stage after the layer loop, before the folder is made complete (index and ``config.json``): an
    end-to-end training of all factors, say, that rewrites the layer files it changes."""

    name: ClassVar[str]

    @property
    def data_parallel(self) -> bool:
        """Whether the stage runs with the sequences spread over processes (``distill_lr.distributed``)."""
        return False

    def check(self, run: FinishedLayers) -> None:  # noqa: B027 (optional hook)
        """Before the layer loop (streams and files not there yet): refuse early what the stage could not do."""

    @abstractmethod
    def run(self, run: FinishedLayers) -> None:
        """Do the stage; record what it did in ``run.report``."""
