"""Activation caches: placement never changes the result, and disk caches leave nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import overrides_for
from test_pipeline import layer_bytes

from distill_lr.cache import ActivationCache, choose_placement
from distill_lr.config import load_config
from distill_lr.driver import compress


def test_disk_cache_round_trips_and_leaves_no_file(tmp_path: Path) -> None:
    cache = ActivationCache("disk", torch.device("cpu"), tmp_path)
    x = cache.empty((3, 5, 7), torch.bfloat16)
    x[:] = torch.arange(105, dtype=torch.bfloat16).view(3, 5, 7)
    y = cache.empty_like(x)
    y.copy_(x * 2)
    assert torch.equal(y, x * 2) and y.dtype == torch.bfloat16 and y.shape == (3, 5, 7)
    assert list(tmp_path.iterdir()) == []  # unlinked at once: nothing to clean up after a crash


def test_auto_placement_follows_the_free_memory() -> None:
    cpu = torch.device("cpu")
    assert choose_placement("auto", 1 << 20, cpu, layer_bytes=1 << 20) == "device"
    assert choose_placement("auto", 1 << 60, cpu, layer_bytes=1 << 20) == "disk"
    assert choose_placement("host", 1 << 60, cpu, layer_bytes=1 << 20) == "host"


@pytest.mark.parametrize("method", ["whiten", "distill"])
def test_every_placement_gives_the_same_files(tmp_path: Path, tiny_llama: Path, corpus: Path, method: str) -> None:
    reports = {}
    for placement in ("device", "host", "disk"):
        out = tmp_path / placement
        reports[placement] = compress(load_config(None, overrides_for(tiny_llama, corpus, out, method=method, cache=placement)))
        assert reports[placement]["activation_cache"]["placement"] == placement
        assert not list(out.glob(".activations-*"))
    files = {p: layer_bytes(tmp_path / p) for p in reports}
    assert files["device"] == files["host"] == files["disk"]
    assert reports["device"]["perplexity"] == reports["host"]["perplexity"] == reports["disk"]["perplexity"]
