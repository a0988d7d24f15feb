"""Shared fixtures and helpers of the test suite: tiny random checkpoints (``distill_lr.testing``), fast runs on them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from distill_lr import driver
from distill_lr.checkpoint.layout import E2E_STATE
from distill_lr.checkpoint.reader import CheckpointReader, LayerLoader, load_non_layer_
from distill_lr.config import load_config
from distill_lr.data import build_token_sets, load_documents
from distill_lr.driver import compress
from distill_lr.errors import UserInputError
from distill_lr.report import RunReport
from distill_lr.stages import e2e
from distill_lr.testing import save_tiny, write_corpus

# Tiny models: intra-op threads cost more than they save (the suite takes minutes with 2 threads on
# 2 cores and well under one with 1).
torch.set_num_threads(1)


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Path:
    return save_tiny(tmp_path / "llama")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus.jsonl")


def overrides_for(model: Path, corpus: Path, output: Path, **extra) -> list[str]:
    """Settings for a fast CPU run on a tiny model."""
    base = {
        "model": str(model),
        "output": str(output),
        "data.source": str(corpus),
        "data.num_sequences": 16,
        "data.seq_len": 32,
        "data.eval_sequences": 4,
        "data.eval_fraction": 0.2,
        "batch_size": 4,
        "train.epochs": 1,
        "train.batch_size": 4,
        "ranks.target": 0.3,
        "method": "whiten",
        "plot": "false",  # 0.6 s a picture: drawn where a test asks for it
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run(model: Path, corpus: Path, output: Path, **extra) -> RunReport:
    """A fast CPU compression of a tiny model (``overrides_for``'s settings, updated by ``extra``)."""
    return compress(load_config(None, overrides_for(model, corpus, output, **extra)))


def fails(model: Path, corpus: Path, output: Path, needle: str, **extra) -> None:
    """The run fails before its end with a one-line ``UserInputError`` that contains ``needle``."""
    with pytest.raises(UserInputError) as err:
        run(model, corpus, output, **extra)
    message = str(err.value)
    assert needle in message, message
    assert "\n" not in message


def held_out_perplexity(model: torch.nn.Module, tokenizer_folder: Path, corpus: Path) -> float:
    """A whole loaded model's perplexity on the held-out windows of a run with ``overrides_for``'s data settings: what the
    run reports, computed apart from the run's layer-by-layer pass."""
    cfg = load_config(None, overrides_for(tokenizer_folder, corpus, tokenizer_folder / "unused"))
    tokens = build_token_sets(
        load_documents(cfg.data.source),
        AutoTokenizer.from_pretrained(tokenizer_folder),
        num_sequences=cfg.data.num_sequences,
        seq_len=cfg.data.seq_len,
        eval_sequences=cfg.data.eval_sequences,
        eval_fraction=cfg.data.eval_fraction,
        seed=cfg.seed,
    )
    total = 0.0
    with torch.no_grad():
        for row in tokens.evaluation:
            total += float(model(input_ids=row[None], labels=row[None]).loss) * (len(row) - 1)
    return math.exp(total / (len(tokens.evaluation) * (tokens.evaluation.shape[1] - 1)))


def layer_bytes(folder: Path) -> dict[str, bytes]:
    """Every weight file of a checkpoint folder, by name: for byte-for-byte comparisons of runs on different inputs."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob("model-*.safetensors"))}


def run_files(folder: Path) -> dict[str, bytes]:
    """Every file of a run's folder but report.json (the one record of timings), by name: a resumed run must equal an
    unbroken one in all of them, weights, manifest and config.json alike."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "report.json"}


def materialised_layer(folder: Path, index: int = 0):
    """(model, layers, layer): the skeleton with embeddings and head loaded, and one real decoder layer."""
    reader = CheckpointReader(folder)
    model, prefix, layers = reader.skeleton()
    load_non_layer_(model, reader, prefix, torch.device("cpu"), torch.float32)
    return model, layers, LayerLoader(reader, layers, prefix, read_ahead=False).load(index, "cpu", torch.float32)


def folder_state(folder: Path) -> dict[str, bytes] | None:
    """Every file under ``folder`` with its bytes (None: no such folder): to check that a refused command changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else None


def stopped_in_stage(monkeypatch, model: Path, corpus: Path, output: Path, saves: int, **extra) -> None:
    """A run killed (KeyboardInterrupt) right after the end-to-end stage saved its ``saves``-th resumable state."""
    real, done = e2e._save_state, []

    def stop(*args, **kwargs):
        real(*args, **kwargs)
        done.append(1)
        if len(done) == saves:
            raise KeyboardInterrupt

    monkeypatch.setattr(e2e, "_save_state", stop)
    with pytest.raises(KeyboardInterrupt):
        run(model, corpus, output, **extra)
    monkeypatch.setattr(e2e, "_save_state", real)
    assert (output / E2E_STATE).is_file()


def interrupted_then_resumed(monkeypatch, model: Path, corpus: Path, output: Path, at_layer: int = 2, **extra) -> RunReport:
    """A run stopped (KeyboardInterrupt) as it reaches layer ``at_layer``, then the same command again: the resumed report."""
    real = driver.compress_layer

    def crash(run_, index, *args, **kwargs):
        if index == at_layer:
            raise KeyboardInterrupt
        return real(run_, index, *args, **kwargs)

    monkeypatch.setattr(driver, "compress_layer", crash)
    with pytest.raises(KeyboardInterrupt):
        run(model, corpus, output, **extra)
    assert not (output / "config.json").exists()  # an unfinished folder never looks complete
    monkeypatch.setattr(driver, "compress_layer", real)
    return run(model, corpus, output, **extra)
