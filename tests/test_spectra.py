"""Spectral metrics recover what a matrix was built with; the spectra script on tiny models, a LoRA adapter and a sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill_lr import cli
from distill_lr.analysis import spectra
from distill_lr.commands import spectra as spectra_command
from distill_lr.moments import Moments
from distill_lr.testing import save_tiny


def with_singular_values(s: torch.Tensor, m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return (U * s) @ V.T


def test_known_singular_values_are_recovered() -> None:
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    m = spectra.metrics(spectra.singular_values(with_singular_values(s, 7, 5)), (7, 5))
    assert torch.allclose(torch.tensor(m["singular_values"], dtype=torch.float64), s)
    assert m["condition_number"] == pytest.approx(16.0)
    p = s / s.sum()
    assert m["effective_rank"] == pytest.approx(math.exp(float(-(p * p.log()).sum())))
    assert m["stable_rank"] == pytest.approx(float(s.square().sum()) / 64)
    assert m["energy"][0] == pytest.approx(64 / 85.25) and m["energy"][-1] == pytest.approx(1.0)
    assert m["nuclear_fraction"][1] == pytest.approx(12 / 15.5)
    assert m["break_even_rank"] == pytest.approx(35 / 12) and m["rank_for_90pct_energy"]["rank"] == 2
    assert m["rank_for_90pct_energy"]["params"] == 2 * 12


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_the_activation_aware_spectrum_is_that_of_w_times_s(shape: tuple[int, int]) -> None:
    m, n = shape
    g = torch.Generator().manual_seed(1)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.randn(200, n, generator=g) * torch.linspace(0.1, 3.0, n)
    inputs, outputs = Moments.empty(n), Moments.empty(m, of_outputs=True)
    inputs.update(x)
    outputs.update(x @ W.float().T)
    eigenvalues, Q = torch.linalg.eigh(inputs.second_moment())
    expected = torch.linalg.svdvals(W @ (Q * eigenvalues.sqrt()) @ Q.T)
    assert torch.allclose(spectra.activation_singular_values(W, inputs), expected, rtol=1e-6)
    if m < n:
        assert torch.allclose(spectra.activation_singular_values(W, outputs), expected, rtol=1e-4)


def test_shared_subspace_ratio_and_overlap() -> None:
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    assert spectra.shared_subspace_ratio(Q[:, :3], Q[:, :3], threshold=0.0) == pytest.approx(3 / 6)
    assert spectra.shared_subspace_ratio(Q[:, :3], Q[:, 3:6], threshold=0.0) == 1.0
    assert spectra.subspace_overlap(Q[:, :3], Q[:, :3], 3) == pytest.approx(1.0)
    assert spectra.subspace_overlap(Q[:, :3], Q[:, 3:6], 3) == pytest.approx(0.0, abs=1e-12)


def test_spearman() -> None:
    assert spectra.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spectra.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spectra.spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert math.isnan(spectra.spearman([1, 2], [1, 2]))


def test_spectra_of_a_moe_model_and_a_sweep_correlation(tmp_path: Path) -> None:
    model = save_tiny(tmp_path / "mixtral", "mixtral")
    sweep = {
        "dense": {"loss": 2.0, "tasks": {"t": {"acc": 0.5}}},
        "rows": [
            {"layer": i, "type": "mlp_out", "value": 0.5, "loss": 2.0 + 0.1 * i, "tasks": {"t": {"acc": 0.5 - 0.1 * i}}} for i in range(3)
        ],
    }
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    argv = ["--model", str(model), "--out", str(tmp_path / "out"), "--activations", "0", "--sweep", str(tmp_path / "sweep.json")]
    assert cli.main(["spectra", *argv]) == 0
    result = json.loads((tmp_path / "out" / "spectra.json").read_text())
    names = set(result["layers"][0])
    assert {"self_attn.q_proj", "mlp.gate", "mlp.experts.3.down", "mlp.experts.0.up"} <= names
    assert "self_attn.q_proj" in result["shared_subspace"]
    metrics = {c["metric"] for c in result["sweep_correlations"]}
    assert "effective_rank" in metrics and all(c["layers"] == 3 for c in result["sweep_correlations"])
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"spectra_by_depth.png", "energy_curves.png", "condition_effective_rank.png"}
    # the numbers are those of the expert's own weight, read apart from the streamed pass
    down = AutoModelForCausalLM.from_pretrained(model).model.layers[0].mlp.experts.down_proj[3].detach().double()
    expected = torch.linalg.svdvals(down)
    entry = result["layers"][0]["mlp.experts.3.down"]
    torch.testing.assert_close(torch.tensor(entry["singular_values"], dtype=torch.float64), expected, rtol=1e-5, atol=1e-8)
    assert entry["stable_rank"] == pytest.approx(float(expected.square().sum() / expected[0] ** 2), rel=1e-5)
    assert entry["condition_number"] == pytest.approx(float(expected[0] / expected[-1]), rel=1e-5)
    assert entry["break_even_rank"] == pytest.approx(64 * 128 / (64 + 128))


def test_activation_spectra_on_a_tiny_model(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    argv = ["--model", str(tiny_llama), "--out", str(tmp_path / "out"), "--activations", "4", "--seq-len", "16", "--data", str(corpus)]
    assert cli.main(["spectra", *argv]) == 0
    layer = json.loads((tmp_path / "out" / "spectra.json").read_text())["layers"][1]
    assert "activation" in layer["mlp.down_proj"] and "activation" in layer["self_attn.q_proj"]


def test_compare_a_lora_adapter_merged_as_peft_merges_it(tmp_path: Path, tiny_llama: Path) -> None:
    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    merged = lora.merge_and_unload().state_dict()
    from distill_lr.checkpoint.reader import CheckpointReader, build_skeleton, decoder_layers

    reader = CheckpointReader(tiny_llama)
    prefix, layers = decoder_layers(build_skeleton(reader.config))
    other = spectra_command.Other(tmp_path / "adapter", reader, layers, prefix)
    mine = {
        name: AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()[f"{prefix}1.{name}.weight"]
        for name in ("self_attn.q_proj", "mlp.up_proj")
    }
    theirs = other.weights(1, mine)
    assert torch.allclose(theirs["self_attn.q_proj"], merged[f"{prefix}1.self_attn.q_proj.weight"], atol=1e-6)
    assert torch.equal(theirs["mlp.up_proj"], mine["mlp.up_proj"])
    argv = ["--model", str(tiny_llama), "--out", str(tmp_path / "out"), "--activations", "0", "--compare", str(tmp_path / "adapter")]
    assert cli.main(["spectra", *argv]) == 0
    layer = json.loads((tmp_path / "out" / "spectra.json").read_text())["layers"][0]
    assert layer["self_attn.q_proj"]["compare"]["weight_change"] > 0 and layer["mlp.up_proj"]["compare"]["weight_change"] == 0
    assert layer["mlp.up_proj"]["compare"]["left_overlap"] == pytest.approx(1.0)


def test_compare_refuses_another_architecture(tmp_path: Path, tiny_llama: Path, capsys) -> None:
    other = save_tiny(tmp_path / "wide", "llama", hidden_size=32)
    argv = ["--model", str(tiny_llama), "--out", str(tmp_path / "o"), "--activations", "0", "--compare", str(other)]
    assert cli.main(["spectra", *argv]) == 2
    assert "is a checkpoint of another architecture" in capsys.readouterr().err
