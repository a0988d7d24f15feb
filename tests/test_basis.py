"""Basis Selection and the built-in code corpus: the invariants the method rests on, and runs on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import fails, interrupted_then_resumed, layer_bytes, run, run_files, stopped_in_stage
from safetensors.torch import load_file

from distill_lr.builtin import BUILTIN_CODE, builtin_python_documents
from distill_lr.checkpoint.layout import E2E_STATE, MANIFEST_NAME, layer_file
from distill_lr.checkpoint.manifest import RunManifest
from distill_lr.config import load_config
from distill_lr.data import load_documents, split_documents
from distill_lr.errors import UserInputError
from distill_lr.factorize import from_linear, svd_bases
from distill_lr.methods.basis_selection import BasisLinear, RelearnedBases, bases_at, fold, prune_mask_
from distill_lr.modeling.lowrank import LowRankLinear
from distill_lr.moments import Moments
from distill_lr.testing import save_tiny

BASES = {"method": "basis_selection", "train.epochs": "2", "plot": "false"}
# the paper's setting: σ relearned and pruned end to end on the calibration text's own next-token loss
END_TO_END = {"method": "basis_selection", "basis.regime": "end_to_end", "e2e.enabled": "true", "e2e.loss": "lm"}
END_TO_END |= {"ranks.target": 0.5, "ranks.allocation": "uniform"}
END_TO_END |= {"e2e.epochs": 4, "e2e.batch_size": 4, "e2e.micro_batch_size": 2, "e2e.holdout_fraction": 0.25, "e2e.lr": 3e-2}
END_TO_END |= {"e2e.evals_per_epoch": 2, "e2e.patience": 8, "plot": "false"}


def linear_and_inputs(seed: int = 0) -> tuple[torch.nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(24, 16, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(16, 24, generator=g))
        linear.bias.copy_(torch.randn(16, generator=g))
    return linear, torch.randn(64, 24, generator=g) @ torch.randn(24, 24, generator=g)


def test_fixed_sigma_and_no_new_bases_is_the_truncated_svd_exactly() -> None:
    linear, x = linear_and_inputs()
    U, sigma, Vh = svd_bases(linear.weight, 6)
    module = BasisLinear(U, sigma, Vh, 0, linear.bias, torch.Generator().manual_seed(0))
    A, B, kept = fold(module)
    svd = from_linear(linear, 6, "svd")
    assert kept == {"kept": 6, "new": 0, "new_used": 0}
    assert torch.allclose(B @ A, svd.B.weight @ svd.A.weight, atol=1e-5)
    assert torch.allclose(module(x), svd(x), rtol=1e-5, atol=1e-3)  # float32 rounding of outputs up to ~100


def test_new_bases_start_at_zero_so_the_layer_starts_as_its_bases() -> None:
    linear, x = linear_and_inputs(1)
    U, sigma, Vh = svd_bases(linear.weight, 8)
    with_new = BasisLinear(U, sigma, Vh, 3, linear.bias, torch.Generator().manual_seed(0))
    without = BasisLinear(U, sigma, Vh, 0, linear.bias, torch.Generator().manual_seed(0))
    assert with_new.A_new.abs().sum() > 0 and torch.equal(with_new(x), without(x))


def test_whitened_bases_are_the_output_optimal_truncation() -> None:
    linear, x = linear_and_inputs(2)
    stats = Moments.empty(24)
    stats.update(x)
    U, sigma, Vh = svd_bases(linear.weight, 5, stats)
    whiten = from_linear(linear, 5, "whiten", stats)
    assert torch.allclose((U * sigma) @ Vh, (whiten.B.weight @ whiten.A.weight).double(), atol=1e-4)
    plain = svd_bases(linear.weight, 5)
    error = {
        name: ((x.double() @ (linear.weight.double() - (u * s) @ v).T) ** 2).sum()
        for name, (u, s, v) in {"w": (U, sigma, Vh), "p": plain}.items()
    }
    assert error["w"] < error["p"]  # on the calibration inputs, whitened bases lose less of the output


def test_pruning_drops_the_smallest_weights_down_to_the_count_asked() -> None:
    mask, sigma = torch.ones(6), torch.tensor([5.0, -0.1, 3.0, 0.2, -4.0, 1.0])
    assert prune_mask_(mask, sigma, 4) and mask.tolist() == [1, 0, 1, 0, 1, 1]
    assert prune_mask_(mask, sigma, 2) and mask.tolist() == [1, 0, 0, 0, 1, 0]
    assert not prune_mask_(mask, sigma, 3)  # never grows back
    assert [bases_at(s, 10, 20, 8, 0.5) for s in (0, 1, 5, 9)] == [20, 18, 8, 8]


def test_a_run_keeps_exactly_the_budgeted_rank_and_reports_the_bases(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    report = run(tiny_llama, corpus, tmp_path / "out", **BASES)
    planned = json.loads((tmp_path / "out" / "config.json").read_text())["distill_lr"]["ranks"]
    for layer in report.layers:
        state = load_file(tmp_path / "out" / layer_file(layer.layer))
        for name, bases in layer.bases.items():
            full = f"model.layers.{layer.layer}.{name}"
            assert bases["kept"] + bases["new"] == state[f"{full}.A.weight"].shape[0] == planned[full]
            assert bases["kept"] >= 1 and bases["new_used"] <= bases["new"]
    assert report.perplexity.compressed < 1.05 * report.perplexity.dense


def test_a_resumed_basis_selection_run_equals_an_unbroken_one(tmp_path: Path, tiny_llama: Path, corpus: Path, monkeypatch) -> None:
    run(tiny_llama, corpus, tmp_path / "whole", **BASES)
    interrupted_then_resumed(monkeypatch, tiny_llama, corpus, tmp_path / "resumed", **BASES)
    assert run_files(tmp_path / "resumed") == run_files(tmp_path / "whole")


def test_unbalanced_folding_gives_the_same_bases_and_weights_back() -> None:
    linear, x = linear_and_inputs(3)
    stats = Moments.empty(24)
    stats.update(x)
    U, sigma, Vh = svd_bases(linear.weight, 6, stats)  # whitened: σ ranks the bases by their output, not by ‖row of A‖
    module = BasisLinear(U, sigma, Vh, 0, linear.bias, torch.Generator().manual_seed(0))
    A, B, _ = fold(module, balance=False)
    back = BasisLinear.from_low_rank(LowRankLinear.from_factors(A, B, linear.bias), 2, torch.Generator().manual_seed(0))
    assert torch.allclose(back.sigma, sigma.float(), rtol=1e-5) and torch.allclose(back(x), module(x), rtol=1e-5, atol=1e-3)


def test_end_to_end_selection_trains_the_lm_loss_and_keeps_the_budget(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    report = run(tiny_llama, corpus, tmp_path / "out", **END_TO_END)
    truncated = run(
        tiny_llama, corpus, tmp_path / "whiten", method="whiten", plot="false", **{"ranks.target": 0.5, "ranks.allocation": "uniform"}
    )
    planned = json.loads((tmp_path / "out" / "config.json").read_text())["distill_lr"]["ranks"]
    assert report.e2e["loss"] == "lm" and report.e2e["steps"] > 0
    # the held-out text's perplexity beats the output-optimal truncation at the same ranks (the start of the stage holds
    # twice the bases, so its own held-out loss at the start is no bar)
    assert report.perplexity.compressed < truncated.perplexity.compressed
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    for layer in report.layers:
        assert layer.train is None  # nothing trains in the layer loop
        state = load_file(tmp_path / "out" / layer_file(layer.layer))
        recorded = manifest["layers"][str(layer.layer)]["report"]["bases"]
        for name, rank in planned.items():
            if name.startswith(f"model.layers.{layer.layer}."):
                bases = recorded[name.removeprefix(f"model.layers.{layer.layer}.")]
                assert state[f"{name}.A.weight"].shape[0] == rank == bases["kept"] + bases["new"]
                assert report.e2e["bases"][f"{layer.layer}.{name.removeprefix(f'model.layers.{layer.layer}.')}"] == bases
    assert not (tmp_path / "out" / E2E_STATE).exists()


def test_a_stop_in_end_to_end_selection_resumes_it_exactly(tmp_path: Path, tiny_llama: Path, corpus: Path, monkeypatch) -> None:
    run(tiny_llama, corpus, tmp_path / "whole", **END_TO_END)
    stopped_in_stage(monkeypatch, tiny_llama, corpus, tmp_path / "resumed", 3, **END_TO_END)  # pruning begun: masks saved too
    run(tiny_llama, corpus, tmp_path / "resumed", **END_TO_END)
    assert run_files(tmp_path / "resumed") == run_files(tmp_path / "whole")


def test_a_stop_while_selected_layers_are_rewritten_resumes_from_the_final_factors(
    tmp_path: Path, tiny_llama: Path, corpus: Path, monkeypatch
) -> None:
    run(tiny_llama, corpus, tmp_path / "whole", **END_TO_END)
    real = RelearnedBases.layer_record

    def stop_at_layer_one(self, index, record, added):  # layer 0 rewritten at its budget, the others still at their start
        if index == 1:
            raise KeyboardInterrupt
        return real(self, index, record, added)

    monkeypatch.setattr(RelearnedBases, "layer_record", stop_at_layer_one)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_llama, corpus, tmp_path / "resumed", **END_TO_END)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="layer 1 is computed again"):  # its file was rewritten, its record not
        run(tiny_llama, corpus, tmp_path / "resumed", **END_TO_END)
    assert layer_bytes(tmp_path / "resumed") == layer_bytes(tmp_path / "whole")
    monkeypatch.setattr(RunManifest, "record_stage", lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run(tiny_llama, corpus, tmp_path / "again", **END_TO_END)
    monkeypatch.undo()
    run(tiny_llama, corpus, tmp_path / "again", **END_TO_END)
    assert run_files(tmp_path / "again") == run_files(tmp_path / "whole")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("basis.prune_fraction=1.5", "basis.prune_fraction must be in (0, 1]"),  # a schedule that ends after the run
        ("basis.new_bases=-1", "basis.new_bases must be >= 0"),
        ("basis.initial_factor=0.5", "basis.initial_factor must be >= 1"),
        ("basis.regime=global", "basis.regime must be one of"),
        ("basis.regime=end_to_end", "set e2e.enabled=true"),
        ("e2e.loss=mse", "e2e.loss must be one of"),
        ("basis.regime=end_to_end e2e.enabled=true e2e.optimizer=adafactor", "use e2e.optimizer=adamw"),
    ],
)
def test_bad_basis_settings_are_one_line(override: str, needle: str) -> None:
    with pytest.raises(UserInputError) as err:
        load_config(None, ["method=basis_selection", *override.split()])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_an_unknown_or_empty_corpus_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="unknown built-in text 'builtin:rust'"):
        load_documents("builtin:rust")
    (tmp_path / "empty.jsonl").write_text('{"text": "  "}\n')
    with pytest.raises(UserInputError, match="has no non-empty documents"):
        load_documents(str(tmp_path / "empty.jsonl"))


def test_moe_models_are_refused_before_anything_is_written(tmp_path: Path, corpus: Path) -> None:
    tiny_mixtral = save_tiny(tmp_path / "mixtral", "mixtral")
    fails(tiny_mixtral, corpus, tmp_path / "out", "has MoE expert projections, which it does not handle", method="basis_selection")
    assert not (tmp_path / "out" / "config.json").exists()


def test_the_code_corpus_is_the_standard_library_split_by_file_the_same_every_time() -> None:
    documents = builtin_python_documents()
    assert len(documents) > 100 and documents == builtin_python_documents()
    assert any("def " in d and "import " in d for d in documents[:20])
    loaded = load_documents(BUILTIN_CODE)
    assert len(loaded) == len(documents)
    held, calibration = split_documents(len(documents), 0.1, torch.Generator().manual_seed(0))
    again = split_documents(len(documents), 0.1, torch.Generator().manual_seed(0))
    assert not set(held) & set(calibration) and (held, calibration) == again and len(held) + len(calibration) == len(documents)
