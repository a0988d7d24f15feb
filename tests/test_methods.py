"""Methods and inits as plug-ins: one registered from outside the package runs like a built-in one, with no other change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run, run_files

from distill_lr import methods
from distill_lr.errors import UserInputError
from distill_lr.factorize import INITS, Init
from distill_lr.methods.base import Factorize, LayerStep, LayerWork, Method
from distill_lr.methods.distill import Distill
from distill_lr.schema import CompressConfig


class CountFactors(LayerStep):
    """A step of the outside method: records how many factor pairs the layer has (the report keeps it)."""

    name = "count"

    def run(self, work: LayerWork) -> None:
        work.report.train = {**(work.report.train or {}), "factor_pairs": sum(1 for n, _ in work.layer.named_modules() if n.endswith(".A"))}


def build_svd_distill(cfg: CompressConfig) -> Method:
    return Method("svd-distill", (Factorize("svd"), Distill(), CountFactors()), {"method": "distill", "init": "svd"})


def test_a_method_registered_from_outside_writes_what_the_same_built_in_steps_write(
    tmp_path: Path, tiny_llama: Path, corpus: Path, monkeypatch
) -> None:
    monkeypatch.setattr(methods, "REGISTRY", dict(methods.REGISTRY))  # the built-in registry again after the test
    methods.register("svd-distill", build_svd_distill)
    outside = run(tiny_llama, corpus, tmp_path / "outside", method="svd-distill", plot="false")
    built_in = run(tiny_llama, corpus, tmp_path / "built-in", method="distill", init="svd", plot="false")
    # the same steps on the same settings: the same layer files and model config; only the report's timings and method name differ
    files = {k: v for k, v in run_files(tmp_path / "outside").items() if k.endswith(".safetensors") or k == "config.json"}
    assert files == {k: v for k, v in run_files(tmp_path / "built-in").items() if k in files}
    assert outside.perplexity.compressed == built_in.perplexity.compressed
    assert all(layer.train["factor_pairs"] == layer.linears for layer in outside.layers)
    with pytest.raises(UserInputError, match="method 'svd-distill' is registered already"):
        methods.register("svd-distill", build_svd_distill)


def test_an_init_added_to_the_table_is_a_valid_setting_and_its_factors_are_used(
    tmp_path: Path, tiny_llama: Path, corpus: Path, monkeypatch
) -> None:
    calls = []

    def svd64(W: torch.Tensor, rank: int, _stats, bias):  # the truncated SVD, computed in float64
        calls.append(tuple(W.shape))
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        return (Vh[:rank] * S[:rank, None]).float(), U[:, :rank].float(), None if bias is None else bias.float()

    monkeypatch.setitem(INITS, "svd64", Init(svd64, needs_moments=False))
    common = {"method": "distill", "train.epochs": "1", "plot": "false", "evaluate": "false"}
    mine = run(tiny_llama, corpus, tmp_path / "svd64", init="svd64", **common)
    assert len(calls) == sum(layer.linears for layer in mine.layers)  # every factor pair came from it
    theirs = run(tiny_llama, corpus, tmp_path / "svd", init="svd", **common)
    # the same subspace as the float32 SVD: the same errors, to rounding
    for a, b in zip(mine.layers, theirs.layers, strict=True):
        assert a.train["init_holdout"] == pytest.approx(b.train["init_holdout"], rel=1e-4)
