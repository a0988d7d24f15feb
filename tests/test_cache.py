"""Activation caches: placement never changes the result, and disk caches leave nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import layer_bytes, run

from distill_lr.cache import ActivationCache, TeacherStore, choose_placement


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
        reports[placement] = run(tiny_llama, corpus, out, method=method, cache=placement)
        assert reports[placement].activation_cache["placement"] == placement
        assert not list(out.glob(".activations-*"))
    files = {p: layer_bytes(tmp_path / p) for p in reports}
    assert files["device"] == files["host"] == files["disk"]
    assert reports["device"].perplexity == reports["host"].perplexity == reports["disk"].perplexity


def test_teacher_store_round_trips_and_misses_on_other_tokens(tmp_path: Path) -> None:
    ids = {"calibration": torch.arange(12).view(3, 4)}
    store = TeacherStore(tmp_path, {"model": "m"}, ids)
    y = torch.randn(3, 4, 5).to(torch.bfloat16)
    out = torch.zeros_like(y)
    assert not store.load_into(0, "calibration", out) and not out.any()
    store.save(0, "calibration", y)
    assert store.load_into(0, "calibration", out) and torch.equal(out, y)
    assert [p.name for p in store.folder.iterdir()] == [store.path(0, "calibration").name]  # no temporary file left
    other_tokens = TeacherStore(tmp_path, {"model": "m"}, {"calibration": ids["calibration"] + 1})
    other_model = TeacherStore(tmp_path, {"model": "n"}, ids)
    assert not other_tokens.load_into(0, "calibration", out) and not other_model.load_into(0, "calibration", out)
    assert not store.load_into(0, "calibration", torch.zeros(3, 4, 6, dtype=torch.bfloat16))  # another width
    shapes = {"calibration": (3, 4, 5)}
    assert store.missing_bytes(2, shapes, torch.bfloat16) == other_tokens.missing_bytes(2, shapes, torch.bfloat16) // 2 == 120


@pytest.mark.parametrize("method", ["whiten", "distill"])
def test_a_run_reading_the_teacher_cache_equals_one_computing_it(tmp_path: Path, tiny_llama: Path, corpus: Path, method: str) -> None:
    plain = run(tiny_llama, corpus, tmp_path / "plain", method=method)
    cold = run(tiny_llama, corpus, tmp_path / "cold", method=method, teacher_cache=str(tmp_path / "teacher"))
    warm = run(tiny_llama, corpus, tmp_path / "warm", method=method, teacher_cache=str(tmp_path / "teacher"))
    layers = len(plain.layers)
    assert cold.teacher_cache["files_written"] == 2 * layers and cold.teacher_cache["files_read"] == 0
    assert warm.teacher_cache["files_read"] == 2 * layers and warm.teacher_cache["files_written"] == 0
    assert layer_bytes(tmp_path / "plain") == layer_bytes(tmp_path / "cold") == layer_bytes(tmp_path / "warm")
    assert plain.perplexity == cold.perplexity == warm.perplexity
