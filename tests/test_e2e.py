"""The end-to-end stage: it lowers the held-out KL, its resume equals an unbroken run, it refuses what does not fit; it
trains what a quantized run leaves trainable and never changes a saved integer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import fails, folder_state, held_out_perplexity, layer_bytes, run, run_files, stopped_in_stage
from safetensors.torch import load_file

from distill_lr import distributed
from distill_lr.checkpoint.compressed import load_compressed
from distill_lr.checkpoint.layout import E2E_STATE, MANIFEST_NAME
from distill_lr.checkpoint.manifest import RunManifest
from distill_lr.config import load_config
from distill_lr.errors import UserInputError
from distill_lr.methods import get_method
from distill_lr.run import check_processes
from distill_lr.schema import E2EConfig
from distill_lr.stages import e2e
from distill_lr.testing import save_tiny

# A wide init gives peaked next-token distributions, so low rank costs a KL the stage can win back.
STAGE = {"method": "svd", "ranks.target": 0.5, "e2e.enabled": "true", "e2e.epochs": 4, "e2e.batch_size": 4, "e2e.micro_batch_size": 2}
STAGE |= {"e2e.holdout_fraction": 0.25, "e2e.lr": 3e-2, "e2e.evals_per_epoch": 1, "e2e.patience": 4}


@pytest.fixture
def peaked(tmp_path: Path) -> Path:
    return save_tiny(tmp_path / "peaked", "llama", initializer_range=0.2)


def test_the_stage_lowers_held_out_kl(tmp_path: Path, peaked: Path, corpus: Path) -> None:
    layerwise = run(peaked, corpus, tmp_path / "plain", **{k: v for k, v in STAGE.items() if not k.startswith("e2e")})
    trained = run(peaked, corpus, tmp_path / "e2e", **STAGE)
    assert trained.e2e["best_holdout"] < 0.95 * trained.e2e["init_holdout"] and trained.e2e["steps"] > 0
    # a random teacher's perplexity on real text is no target: closer to it need not mean a lower perplexity
    assert trained.perplexity.compressed != layerwise.perplexity.compressed
    assert trained.perplexity.dense == pytest.approx(layerwise.perplexity.dense)
    assert not (tmp_path / "e2e" / E2E_STATE).exists()
    # the perplexity reported is the saved model's: the student streams were recomputed from the trained layers
    model = load_compressed(tmp_path / "e2e", dtype=torch.float32)
    assert held_out_perplexity(model, peaked, corpus) == pytest.approx(trained.perplexity.compressed, rel=1e-4)
    assert layer_bytes(tmp_path / "e2e") != layer_bytes(tmp_path / "plain")


def test_a_stop_in_the_stage_resumes_it_and_equals_an_unbroken_run(tmp_path: Path, peaked: Path, corpus: Path, monkeypatch) -> None:
    whole = run(peaked, corpus, tmp_path / "whole", **STAGE)
    stopped_in_stage(monkeypatch, peaked, corpus, tmp_path / "resumed", 2, **STAGE)
    resumed = run(peaked, corpus, tmp_path / "resumed", **STAGE)
    assert run_files(tmp_path / "resumed") == run_files(tmp_path / "whole")
    assert resumed.perplexity.compressed == pytest.approx(whole.perplexity.compressed, rel=1e-6)
    again = run(peaked, corpus, tmp_path / "whole", **STAGE)  # done: replayed from the manifest, through the trained layers
    assert again.e2e == {k: v for k, v in whole.e2e.items() if k != "seconds"}  # a timing of the invocation that trained
    assert again.perplexity.compressed == pytest.approx(whole.perplexity.compressed, rel=1e-6)


def test_a_stop_while_the_trained_layers_are_written_resumes_the_writing(tmp_path: Path, peaked: Path, corpus: Path, monkeypatch) -> None:
    run(peaked, corpus, tmp_path / "whole", **STAGE)
    monkeypatch.setattr(RunManifest, "record_stage", lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run(peaked, corpus, tmp_path / "resumed", **STAGE)
    monkeypatch.undo()
    run(peaked, corpus, tmp_path / "resumed", **STAGE)
    assert run_files(tmp_path / "resumed") == run_files(tmp_path / "whole")


def test_a_folder_trained_end_to_end_refuses_other_stage_settings(tmp_path: Path, peaked: Path, corpus: Path) -> None:
    run(peaked, corpus, tmp_path / "out", **STAGE)
    before = folder_state(tmp_path / "out")
    fails(peaked, corpus, tmp_path / "out", "end-to-end stage", **{**STAGE, "e2e.enabled": "false"})
    fails(peaked, corpus, tmp_path / "out", "end-to-end stage", **{**STAGE, "e2e.lr": 1e-3})
    assert folder_state(tmp_path / "out") == before  # a refused command leaves every file as it was (the manifest still complete)
    path = tmp_path / "out" / MANIFEST_NAME  # as a folder trained before e2e.optimizer existed records it
    manifest = json.loads(path.read_text())
    del manifest["stages"]["e2e"]["settings"]["optimizer"]
    path.write_text(json.dumps(manifest))
    assert run(peaked, corpus, tmp_path / "out", **STAGE).e2e["steps"] > 0  # replayed as done, not refused
    fails(peaked, corpus, tmp_path / "out", "end-to-end stage", **{**STAGE, "e2e.optimizer": "adafactor"})


def test_a_finished_layer_wise_run_gets_the_stage_later(tmp_path: Path, peaked: Path, corpus: Path) -> None:
    plain = {k: v for k, v in STAGE.items() if not k.startswith("e2e")}
    run(peaked, corpus, tmp_path / "later", **plain)
    later = run(peaked, corpus, tmp_path / "later", **STAGE)
    run(peaked, corpus, tmp_path / "direct", **STAGE)
    assert later.e2e["steps"] > 0 and run_files(tmp_path / "later") == run_files(tmp_path / "direct")


def test_a_stage_that_does_not_fit_is_refused_before_the_layer_loop(tmp_path: Path, peaked: Path, corpus: Path, monkeypatch) -> None:
    monkeypatch.setattr(e2e, "free_memory", lambda _device: 1 << 20)
    fails(peaked, corpus, tmp_path / "out", "e2e.gradient_checkpointing=true", **STAGE)
    assert not any((tmp_path / "out").glob("model-layer-*"))


def test_the_estimate_counts_optimizer_state_and_checkpointing_saves_activations() -> None:
    shape = {"hidden": 4096, "layers": 32, "heads": 32, "vocab": 32000}
    plain = e2e.estimate(5_000_000_000, 1_500_000_000, 2, shape, E2EConfig(), seq_len=512)
    light = e2e.estimate(5_000_000_000, 1_500_000_000, 2, shape, E2EConfig(gradient_checkpointing=True), seq_len=512)
    assert plain.optimizer == 12 * 5_000_000_000 and plain.weights == 2 * 1_500_000_000 + 4 * 5_000_000_000
    assert light.activations < plain.activations / 10 and light.total < plain.total


def test_with_several_processes_the_estimate_divides_the_layers_and_the_optimizer_state() -> None:
    shape, replicated = {"hidden": 4096, "layers": 32, "heads": 32, "vocab": 32000}, 300_000_000  # embeddings and head
    one = e2e.estimate(5_000_000_000, 1_500_000_000, 2, shape, E2EConfig(), 512, (1, replicated))
    two = e2e.estimate(5_000_000_000, 1_500_000_000, 2, shape, E2EConfig(), 512, (2, replicated))
    assert one == e2e.estimate(5_000_000_000, 1_500_000_000, 2, shape, E2EConfig(), 512)  # a single process: as before
    assert two.optimizer == one.optimizer // 2 and two.activations == one.activations and two.logits == one.logits
    in_layers = 1_200_000_000 * 2 + 5_000_000_000 * 4
    gathered = 2 * (1_200_000_000 + 5_000_000_000) * 2 // 32  # two layers whole, in the compute dtype
    assert two.weights == in_layers // 2 + replicated * 2 + gathered


def test_a_sharded_stage_refuses_adafactor_in_one_line(monkeypatch) -> None:
    monkeypatch.setattr(distributed, "_GROUP", distributed.Group(rank=0, world=2))
    cfg = load_config(None, ["e2e.enabled=true", "e2e.optimizer=adafactor", "method=svd"])
    with pytest.raises(UserInputError, match="e2e.optimizer=adafactor does not run sharded"):
        check_processes(cfg, get_method(cfg))
    adamw = load_config(None, ["e2e.enabled=true", "method=distill"])
    check_processes(adamw, get_method(adamw))  # AdamW over factor modules: the stage runs sharded


def test_kl_is_zero_for_equal_logits_and_positive_otherwise() -> None:
    logits = torch.randn(2, 5, 11)
    assert float(e2e.kl_to_teacher(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    p, q = logits.log_softmax(-1), (logits * 2).log_softmax(-1)
    expected = (p.exp() * (p - q)).sum(-1).mean()
    assert float(e2e.kl_to_teacher(logits * 2, logits)) == pytest.approx(float(expected), rel=1e-5)


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a run's layer files, by name."""
    return {k: v for p in sorted(folder.glob("model-layer-*.safetensors")) for k, v in load_file(p).items()}


def integers_kept(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """The names of the tensors the stage changed; asserts that every integer tensor is byte-identical."""
    assert before.keys() == after.keys()
    for k, v in before.items():
        if not v.is_floating_point():
            assert torch.equal(v, after[k]), k
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


QLR = {"method": "qlr", "quant.bits": 4, "quant.group_size": 16, "quant.correction_rank": 4, "save_dtype": "float32"}


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_the_stage_trains_qlr_corrections_over_frozen_integers(tmp_path: Path, corpus: Path, model_type: str) -> None:
    model = save_tiny(tmp_path / model_type, model_type, initializer_range=0.2)
    plain = run(model, corpus, tmp_path / "plain", **QLR)
    trained = run(model, corpus, tmp_path / "e2e", **QLR, **{k: v for k, v in STAGE.items() if k not in ("method", "ranks.target")})
    assert trained.e2e["best_holdout"] < trained.e2e["init_holdout"]
    changed = integers_kept(saved_tensors(tmp_path / "plain"), saved_tensors(tmp_path / "e2e"))
    assert changed and all(k.endswith(("A.weight", "B.weight", ".A", ".B")) for k in changed)  # the corrections, scales as saved
    corrections = [v for k, v in saved_tensors(tmp_path / "e2e").items() if k.endswith(("A.weight", "B.weight", ".A", ".B"))]
    assert plain.params.added_params == sum(v.numel() for v in corrections) > 0  # what the estimate counts as trained
    model_e2e = load_compressed(tmp_path / "e2e", dtype=torch.float32)
    assert held_out_perplexity(model_e2e, model, corpus) == pytest.approx(trained.perplexity.compressed, rel=1e-4)


QUANTIZED_FACTORS = {"method": "svd", "ranks.target": 0.5, "quant.bits": 4, "quant.group_size": 16, "save_dtype": "float32"}
E2E_ONLY = {k: v for k, v in STAGE.items() if k.startswith("e2e")}


def test_quantized_factors_train_their_scales_and_resume_equals_an_unbroken_run(
    tmp_path: Path, peaked: Path, corpus: Path, monkeypatch
) -> None:
    """Every factor quantized (quant.targets=auto): nothing float is left but the scales, refused unless they train."""
    fails(peaked, corpus, tmp_path / "refused", "e2e.train_scales=true", **QUANTIZED_FACTORS, **E2E_ONLY)
    settings = {**QUANTIZED_FACTORS, **E2E_ONLY, "e2e.train_scales": "true"}
    run(peaked, corpus, tmp_path / "plain", **QUANTIZED_FACTORS)
    whole = run(peaked, corpus, tmp_path / "whole", **settings)
    assert whole.e2e["best_holdout"] < whole.e2e["init_holdout"]
    changed = integers_kept(saved_tensors(tmp_path / "plain"), saved_tensors(tmp_path / "whole"))
    assert changed and all(k.endswith(".scale") for k in changed)
    stopped_in_stage(monkeypatch, peaked, corpus, tmp_path / "resumed", 2, **settings)
    run(peaked, corpus, tmp_path / "resumed", **settings)
    assert run_files(tmp_path / "resumed") == run_files(tmp_path / "whole")


def test_adafactor_lowers_held_out_kl_and_resumes_like_an_unbroken_run(tmp_path: Path, peaked: Path, corpus: Path, monkeypatch) -> None:
    settings = {**STAGE, "e2e.optimizer": "adafactor"}
    whole = run(peaked, corpus, tmp_path / "whole", **settings)
    assert whole.e2e["best_holdout"] < 0.95 * whole.e2e["init_holdout"]
    stopped_in_stage(monkeypatch, peaked, corpus, tmp_path / "resumed", 2, **settings)
    run(peaked, corpus, tmp_path / "resumed", **settings)
    assert run_files(tmp_path / "resumed") == run_files(tmp_path / "whole")


def test_adafactor_holds_a_third_of_adamw_s_optimizer_bytes() -> None:
    shape = {"hidden": 4096, "layers": 32, "heads": 32, "vocab": 32000}
    adamw, adafactor = (e2e.estimate(5_000_000_000, 1_500_000_000, 2, shape, E2EConfig(optimizer=o), 512) for o in ("adamw", "adafactor"))
    assert adafactor.optimizer * 3 == adamw.optimizer and adafactor.weights == adamw.weights
    assert e2e.state_bytes(1000, E2EConfig(optimizer="adafactor")) == 8000 < e2e.state_bytes(1000, E2EConfig())


def test_biases_beside_quantized_factors_train_with_the_scales_frozen(tmp_path: Path, corpus: Path) -> None:
    """Qwen2's q/k/v biases: the float part left around quantized factors trains; integers and scales stay as saved."""
    model = save_tiny(tmp_path / "qwen2", "qwen2", initializer_range=0.2)
    words = {"tokenizer": save_tiny(tmp_path / "tok", "llama")}  # the tiny word tokenizer, loaded as such
    run(model, corpus, tmp_path / "plain", **QUANTIZED_FACTORS, **words)
    absolute = {"e2e.relative_lr": "false", "e2e.lr": 1e-2}  # the tiny model's biases start at zero: no RMS to be relative to
    trained = run(model, corpus, tmp_path / "e2e", **QUANTIZED_FACTORS, **{**E2E_ONLY, **absolute}, **words)
    assert trained.e2e["steps"] > 0
    changed = integers_kept(saved_tensors(tmp_path / "plain"), saved_tensors(tmp_path / "e2e"))
    assert changed and all(k.endswith(".bias") for k in changed)
