"""Group-wise quantization: the grid against compressed-tensors', GPTQ's invariants, packed storage, the quantized
methods' runs (load, remote code, resume) and their bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams
from conftest import fails, held_out_perplexity, interrupted_then_resumed, layer_bytes, materialised_layer, run, run_files
from safetensors import safe_open
from test_pipeline import REMOTE_LOAD
from transformers import AutoModelForCausalLM

from distill_lr import quant
from distill_lr.checkpoint import compressed
from distill_lr.config import load_config
from distill_lr.errors import UserInputError
from distill_lr.factorize import factorize_layer_, whiten_factors
from distill_lr.layerwise import capture_inputs
from distill_lr.methods import quantize
from distill_lr.modeling.lowrank import (
    KERNEL_ROWS,
    CorrectedExperts,
    CorrectedLinear,
    ExpertLinears,
    QuantExpertLinears,
    QuantLinear,
    pack_codes,
    unpack_codes,
)
from distill_lr.moments import Moments
from distill_lr.stats import input_moments
from distill_lr.testing import save_tiny

torch.manual_seed(0)
Q4 = {"quant.bits": 4, "quant.group_size": 16}


def correlated(n: int, tokens: int = 2048) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(tokens, n, generator=g) @ torch.randn(n, n, generator=g) * 0.3 + torch.randn(n, generator=g)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_round_trips_at_every_width(bits: int) -> None:
    for n in (1, 7, 8, 37, 576):
        codes = torch.randint(0, 1 << bits, (5, n), dtype=torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (5, -(-n // 8) * bits)
        assert torch.equal(unpack_codes(packed, bits, n), codes)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_to_nearest_is_compressed_tensors_grid(bits: int, symmetric: bool) -> None:
    W, g = torch.randn(48, 128), 32
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="group", group_size=g)
    groups = W.view(48, -1, g)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    ours = quant.rtn(W, quant.QuantSpec(bits, g, symmetric))
    assert torch.allclose(ours.scale, scale)
    expected = fake_quantize(W, scale, zero, args)
    differ = (ours.dequantized() - expected).abs() > 1e-5
    assert differ.float().mean() < 1e-3  # a few exact ties round the other way


def test_a_ragged_last_group_has_its_own_scale() -> None:
    W = torch.randn(8, 576)
    spec = quant.QuantSpec(4, 128)
    whole = quant.rtn(W, spec)
    assert whole.scale.shape == (8, 5)
    head, tail = quant.rtn(W[:, :512], spec), quant.rtn(W[:, 512:], quant.QuantSpec(4, 64))
    assert torch.equal(whole.dequantized(), torch.cat([head.dequantized(), tail.dequantized()], 1))


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest() -> None:
    W, spec = torch.randn(16, 64), quant.QuantSpec(4, 16)
    H = torch.diag(torch.rand(64) + 0.5)
    assert torch.equal(quant.gptq(W, H, spec, act_order=False, damping=1e-6).codes, quant.rtn(W, spec).codes)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_lowers_the_output_error_of_correlated_inputs(bits: int, symmetric: bool) -> None:
    W, x = torch.randn(32, 96), correlated(96)
    H, spec = x.T @ x / len(x), quant.QuantSpec(bits, 32, symmetric)
    errors = {
        name: quant.output_error(W, q.dequantized(), H) for name, q in [("rtn", quant.rtn(W, spec)), ("gptq", quant.gptq(W, H, spec))]
    }
    assert errors["gptq"] < 0.7 * errors["rtn"]


def test_gptq_survives_inputs_that_never_fire() -> None:
    x = correlated(32)
    x[:, 5] = 0
    q = quant.gptq(torch.randn(8, 32), x.T @ x / len(x), quant.QuantSpec(3, 8))
    assert torch.isfinite(q.dequantized()).all()


def test_quant_linear_computes_with_the_dequantized_weight_and_counts_its_bytes() -> None:
    W, b = torch.randn(24, 40), torch.randn(24)
    q = quant.rtn(W, quant.QuantSpec(3, 16, symmetric=False))
    module = q.module(b, torch.float32)
    x = torch.randn(5, 40)
    assert torch.allclose(module(x), x @ q.dequantized().T + b, atol=1e-5)
    assert compressed.linear_bytes(module, torch.bfloat16) == q.spec.bytes(24, 40, 2) + 24 * 2 + 16  # bias, qshape


KERNEL_CASES = [  # (bits, out, in, group): shorter last groups, a group wider than the row, widths off the kernels' tiles
    (4, 64, 576, 128),
    (4, 48, 100, 32),
    (4, 32, 96, 1000),
    (4, 64, 300, 96),
    (8, 64, 576, 128),
    (8, 24, 4104, 128),
    (8, 40, 256, 64),
    (8, 16, 7, 4),
]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("bits", "out_features", "in_features", "group"), KERNEL_CASES)
def test_integer_kernels_compute_the_dequantized_weight(
    bits: int, out_features: int, in_features: int, group: int, symmetric: bool
) -> None:  # noqa: E501
    """Stated tolerance: relative Frobenius error ≤ 1e-2 against float32 products of the same bfloat16 inputs (the
    kernels multiply bfloat16 inputs by bfloat16 scales; bfloat16 keeps 8 significant bits, 0.4%)."""
    q = quant.rtn(torch.randn(out_features, in_features), quant.QuantSpec(bits, group, symmetric))
    bias = torch.randn(out_features)
    module = q.module(bias, torch.bfloat16)
    assert module.int_kernel() is not None
    x = torch.randn(2, 3, in_features).bfloat16()
    expected = x.float() @ q.dequantized().T + bias.bfloat16().float()
    y = module(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, out_features)
    assert (y.float() - expected).norm() <= 1e-2 * expected.norm()


def test_the_int4_kernel_is_not_used_where_it_does_not_apply_and_the_kernels_follow_new_integers() -> None:
    assert quant.rtn(torch.randn(40, 64), quant.QuantSpec(4, 32)).module(None, torch.bfloat16).int_kernel() is None  # rows % 16
    assert quant.rtn(torch.randn(32, 100), quant.QuantSpec(4, 20)).module(None, torch.bfloat16).int_kernel() is None  # group 20
    assert quant.rtn(torch.randn(32, 64), quant.QuantSpec(3, 32)).module(None, torch.bfloat16).int_kernel() is None  # 3 bits
    first, second = (quant.rtn(torch.randn(32, 64), quant.QuantSpec(4, 32)).module(None, torch.bfloat16) for _ in range(2))
    x = torch.randn(1, 64).bfloat16()
    before = first(x)
    first.load_state_dict(second.state_dict())
    assert torch.equal(first(x), second(x)) and not torch.equal(first(x), before)


def test_many_rows_and_float32_inputs_use_the_dequantized_weight() -> None:
    q = quant.rtn(torch.randn(32, 64), quant.QuantSpec(4, 32))
    module = q.module(None, torch.bfloat16)
    x = torch.randn(KERNEL_ROWS + 1, 64).bfloat16()
    assert torch.equal(module(x), torch.nn.functional.linear(x, module.dequantized(torch.bfloat16)))
    module32 = q.module(None, torch.float32)
    x32 = torch.randn(1, 64)
    assert torch.equal(module32(x32), torch.nn.functional.linear(x32, module32.dequantized(torch.float32)))


def test_a_full_rank_correction_reproduces_the_weight() -> None:
    """W = Q(W) + B A exactly once the correction has full rank: the whitened SVD of the residual loses nothing."""
    linear = torch.nn.Linear(20, 12, bias=False)
    stats = Moments.empty(20)
    stats.update(correlated(20))
    base = quant.rtn(linear.weight.detach(), quant.QuantSpec(2, 8)).module(None, torch.float32)
    residual = linear.weight.detach() - base.dequantized()
    A, B = whiten_factors(residual, 12, stats)
    module = CorrectedLinear(base, 12)
    module.A.weight.data.copy_(A)
    module.B.weight.data.copy_(B)
    x = torch.randn(4, 20)
    assert torch.allclose(module(x), linear(x), atol=1e-4)


def quantized_modules(folder: Path) -> set[str]:
    keys = set()
    for f in folder.glob("model-layer-*.safetensors"):
        with safe_open(f, "pt") as fh:
            keys |= {k.rpartition(".")[0] for k in fh.keys() if k.endswith(".qweight")}
    return keys


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("dense-gptq", {"method": "dense"}),
        ("whiten-both", {}),
        ("distill-factors-rtn", {"method": "distill", "quant.targets": "factors", "quant.method": "rtn", "quant.symmetric": False}),
        ("qlr", {"method": "qlr", "quant.correction_rank": 4, "quant.bits": 3}),
    ],
)
def test_quantized_runs_load_generate_and_match_their_report(
    tmp_path: Path, tiny_llama: Path, corpus: Path, name: str, extra: dict
) -> None:
    report = run(tiny_llama, corpus, tmp_path / name, **{**Q4, "save_dtype": "float32", **extra})
    out = Path(report.output)
    info = compressed._compressed_config(out)["distill_lr"]["quant"]
    assert set(info["modules"]) == quantized_modules(out) and info["bits"] == extra.get("quant.bits", 4)
    assert report.size["bytes"] == sum(r.linear_bytes for r in report.layers) < 0.3 * report.size["dense_bytes"]
    if name == "distill-factors-rtn":
        assert all(m.endswith((".A", ".B")) for m in info["modules"]) and "model.layers.0.mlp.down_proj" not in info["modules"]
    if name == "qlr":
        assert len(info["corrections"]) == 7 * len(report.layers) and all(m.endswith(".base") for m in info["modules"])
    loaded = compressed.load_compressed(out)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == len(info["modules"])
    ids = torch.randint(3, 200, (1, 8))
    assert loaded.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 12)
    assert held_out_perplexity(loaded, tiny_llama, corpus) == pytest.approx(report.perplexity.compressed, rel=1e-4)  # = the run's student


@pytest.mark.parametrize("extra", [{"method": "whiten"}, {"method": "qlr", "quant.targets": "both", "quant.symmetric": False}])
def test_dense_export_of_a_quantized_folder_matches_it(tmp_path: Path, tiny_llama: Path, corpus: Path, extra: dict) -> None:
    report = run(tiny_llama, corpus, tmp_path / "out", export_dense=True, save_dtype="float32", **Q4, **extra)
    dense = AutoModelForCausalLM.from_pretrained(report.dense_export).eval()
    quantized = compressed.load_compressed(report.output)
    ids = torch.randint(3, 200, (1, 12))
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, quantized(ids).logits, atol=1e-4)


def test_int4_files_hold_under_a_third_of_the_bf16_bytes(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    plain = run(tiny_llama, corpus, tmp_path / "bf16", save_dtype="bfloat16", **{"ranks.target": "null"})
    int4 = run(tiny_llama, corpus, tmp_path / "int4", method="dense", save_dtype="bfloat16", **Q4)
    assert plain.size["bytes"] == plain.size["dense_bytes"] == int4.size["dense_bytes"]
    assert int4.size["ratio"] == pytest.approx((0.5 + 2 / 16) / 2, rel=0.02)  # half a byte and a bf16 scale per 16 entries

    def stored(folder: Path) -> int:
        return sum(f.stat().st_size for f in folder.glob("model-layer-*.safetensors"))

    assert stored(tmp_path / "int4") < 0.36 * stored(tmp_path / "bf16")  # the files, norms and headers included


def test_corrections_beat_quantization_alone_and_training_improves_them(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    bits = {"quant.bits": 2, "quant.group_size": 16}
    alone = run(tiny_llama, corpus, tmp_path / "alone", method="dense", **bits)
    corrected = run(tiny_llama, corpus, tmp_path / "qlr", method="qlr", **bits, **{"quant.correction_rank": 8})
    trained = run(
        tiny_llama, corpus, tmp_path / "trained", method="qlr", **bits, **{"quant.correction_rank": 8, "quant.correction_train": True}
    )
    errors = [r.layers[-1].err_student_input for r in (alone, corrected, trained)]
    assert errors[1] < 0.8 * errors[0] and errors[2] < errors[1]
    assert all(r.train is not None for r in trained.layers)


@pytest.mark.parametrize("extra", [{"method": "dense"}, {"method": "distill"}, {"method": "qlr", "quant.correction_train": True}])
def test_resumed_quantized_run_equals_unbroken_run(tmp_path: Path, corpus: Path, extra: dict, monkeypatch) -> None:
    model = save_tiny(tmp_path / "llama", num_hidden_layers=3)
    unbroken = run(model, corpus, tmp_path / "unbroken", **Q4, **extra)
    resumed = interrupted_then_resumed(monkeypatch, model, corpus, tmp_path / "resumed", **Q4, **extra)
    assert [r.resumed for r in resumed.layers] == [True, True, False]
    assert run_files(tmp_path / "unbroken") == run_files(tmp_path / "resumed")
    assert resumed.perplexity == unbroken.perplexity and resumed.size == unbroken.size


def test_remote_code_loads_a_quantized_folder_with_its_files_only(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    report = run(tiny_llama, corpus, tmp_path / "out", method="qlr", **Q4, **{"quant.targets": "both", "quant.correction_rank": 4})
    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(report.output, copy)
    ids = torch.randint(3, 200, (1, 12))
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    command = [sys.executable, "-c", REMOTE_LOAD, str(copy), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")]
    subprocess.run(command, check=True, env=env, cwd=tmp_path)
    with torch.no_grad():
        expected = compressed.load_compressed(report.output)(input_ids=ids).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["quant.bits=5"], "quant.bits must be 2, 3, 4, 8"),
        (["quant.bits=4", "quant.group_size=4"], "quant.group_size must be an integer >= 8"),
        (["quant.bits=4", "quant.method=awq"], "quant.method 'awq' is unknown"),
        (["quant.bits=4", "quant.targets=all"], "quant.targets 'all' is unknown"),
        (["e2e.enabled=true", "e2e.optimizer=sgd"], "e2e.optimizer must be one of"),
        (["method=qlr"], "method=qlr needs quant.bits"),
        (["method=dense"], "method=dense needs quant.bits"),
        (["method=qlr", "quant.bits=3", "quant.targets=factors"], "method=qlr quantizes the dense weights"),
        (["method=qlr", "quant.bits=3", "quant.correction_rank=0"], "quant.correction_rank = 0"),
        (["quant.bits=4", "quant.damping=0"], "quant.damping must be in (0, 1)"),
    ],
)
def test_bad_quantization_settings_are_refused_in_one_line(overrides: list[str], needle: str) -> None:
    with pytest.raises(UserInputError) as err:
        load_config(None, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_correction_above_the_matrix_is_refused_before_any_write_and_skip_leaves_it_uncorrected(
    tmp_path: Path, tiny_llama: Path, corpus: Path
) -> None:
    needle = "correction rank 100000 for layers.0.self_attn.q_proj is above min(out, in) = 64"
    fails(tiny_llama, corpus, tmp_path / "rule", needle, method="qlr", **Q4, **{"quant.correction_rules": '{"**.q_proj": 100000}'})
    fails(tiny_llama, corpus, tmp_path / "all", needle, method="qlr", **Q4, **{"quant.correction_rank": 100000})
    assert not (tmp_path / "rule").exists() and not (tmp_path / "all").exists()
    rules = {"quant.correction_rules": '{"**.mlp.*": skip, "**.q_proj": 40}'}
    with pytest.warns(UserWarning, match=r"at or above their break-even rank .* takes more bytes than its dense weight"):
        report = run(tiny_llama, corpus, tmp_path / "out", method="qlr", **Q4, **rules)
    corrections = report.layers[0].quant["corrections"]
    assert not any("mlp" in n for n in corrections) and corrections["self_attn.q_proj"] == 40  # 64x64: break-even 32


def test_a_group_wider_than_every_row_is_one_group_per_row_with_a_warning(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    with pytest.warns(UserWarning, match=r"quant.group_size=1000000 is wider than every linear's input \(at most 128 columns\)"):
        wide = run(tiny_llama, corpus, tmp_path / "wide", method="dense", **{**Q4, "quant.group_size": 1000000})
    per_row = run(tiny_llama, corpus, tmp_path / "row", method="dense", **{**Q4, "quant.group_size": 128})  # every row one group too
    assert layer_bytes(Path(wide.output)) == layer_bytes(Path(per_row.output))  # same integers and scales, no padded columns
    model = compressed.load_compressed(wide.output, dtype=torch.float32)
    q = model.model.layers[0].self_attn.q_proj
    assert q.scale.shape == (64, 1) and q.dequantized().shape == (64, 64)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_moe_expert_projections_are_quantized_per_expert_and_load_everywhere(tmp_path: Path, corpus: Path, arch: str) -> None:
    """Every expert's gate/up/down quantized on its own grid (GPTQ from its routed tokens): 4-bit expert bytes are at most
    27% of bf16, the folder loads with our loader and with plain remote code, and the dense export computes the same."""
    model = save_tiny(tmp_path / arch, arch)
    settings = {**Q4, "quant.group_size": 64}  # 4 bits and a bf16 scale per 64 weights: 26.6% of bf16
    report = run(model, corpus, tmp_path / "out", method="dense", save_dtype="bfloat16", export_dense=True, **settings)
    entry = report.layers[0].quant
    experts = [n for n in entry["modules"] if ".experts." in n]
    assert sorted(n.rpartition(".")[2] for n in experts) == ["down_proj", "gate_proj", "up_proj"]
    assert "experts_not_quantized" not in entry and len(entry["errors"]) > len(entry["modules"])  # one error per expert
    ours = compressed.load_compressed(report.output, dtype=torch.float32)
    projection = ours.get_submodule(f"model.layers.0.{experts[0]}")
    assert isinstance(projection, QuantExpertLinears)
    with safe_open(Path(report.output) / "model-layer-00000.safetensors", "pt") as fh:
        stored = sum(fh.get_tensor(k).nbytes for k in fh.keys() if ".experts." in k and not k.endswith("qshape"))
    original = AutoModelForCausalLM.from_pretrained(model)
    dense_bf16 = sum(2 * p.numel() for n, p in original.named_parameters() if "layers.0.mlp.experts" in n)
    spec = quant.QuantSpec(4, 64)
    modules = [ours.get_submodule(f"model.layers.0.{n}") for n in experts]
    assert stored == sum(m.num_experts * spec.bytes(m.expert_out_features, m.in_features, 2) for m in modules)
    assert stored <= (0.27 if arch == "mixtral" else 0.28) * dense_bf16  # qwen3_moe's down reads 32 inputs: a scale per 32
    remote = AutoModelForCausalLM.from_pretrained(report.output, trust_remote_code=True, dtype=torch.float32)
    dense = AutoModelForCausalLM.from_pretrained(report.dense_export, dtype=torch.float32)
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        expected = ours(ids).logits
        assert torch.allclose(remote(ids).logits, expected, atol=1e-5)
        assert torch.allclose(dense(ids).logits, expected, atol=2e-3)  # its dequantized weights rounded once to bf16
    assert held_out_perplexity(ours, model, corpus) == pytest.approx(report.perplexity.compressed, rel=1e-3)


def test_qlr_corrects_every_expert_and_the_corrections_are_trained(tmp_path: Path, corpus: Path) -> None:
    """qlr on a tiny Mixtral: every expert projection quantized with a correction per expert (whitened SVD of its
    residual); the corrections beat the integers alone, training them beats both, and the folder loads and exports."""
    model = save_tiny(tmp_path / "mixtral", "mixtral")
    settings = {**Q4, "save_dtype": "float32", "quant.correction_rank": 4}
    alone = run(model, corpus, tmp_path / "alone", method="dense", **settings)
    corrected = run(model, corpus, tmp_path / "corrected", method="qlr", export_dense=True, **settings)
    trained = run(model, corpus, tmp_path / "trained", method="qlr", **settings, **{"quant.correction_train": True})
    entry = corrected.layers[0].quant
    assert {n: r for n, r in entry["corrections"].items() if ".experts." in n} == {
        f"mlp.experts.{p}": 4 for p in ("down_proj", "gate_proj", "up_proj")
    }
    assert "experts_not_quantized" not in entry
    errors = [r.layers[-1].err_student_input for r in (alone, corrected, trained)]
    assert errors[1] < errors[0] and errors[2] < errors[1]
    ours = compressed.load_compressed(corrected.output)
    assert isinstance(ours.get_submodule("model.layers.0.mlp.experts.up_proj"), CorrectedExperts)
    dense = AutoModelForCausalLM.from_pretrained(corrected.dense_export)
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, ours(ids).logits, atol=1e-4)
    assert held_out_perplexity(ours, model, corpus) == pytest.approx(corrected.perplexity.compressed, rel=1e-3)


def test_expert_moments_are_recorded_a_few_experts_at_a_time_with_the_same_result(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPTQ's per-expert Hessians are held for a chunk of experts at a time, within the projection's own weight bytes
    (all of Mixtral-8x7B's down projections at once would be 13 GB of float64); chunks change nothing in the files."""
    down, gate = (ExpertLinears(8, inp, out, None, device="meta") for inp, out in ((14336, 4096), (4096, 14336)))
    assert quantize.expert_chunks(down) == [[e] for e in range(8)] and quantize.expert_chunks(gate) == [list(range(8))]
    # expert parallel: each of 2 processes records one of its own experts' moments per pass (0-3 and 4-7): 4 passes
    assert quantize.expert_chunks(down, world=2) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    model = save_tiny(tmp_path / "mixtral", "mixtral")
    settings = {**Q4, "method": "qlr", "quant.correction_rank": 4}
    together = run(model, corpus, tmp_path / "together", **settings)
    monkeypatch.setattr(quantize, "expert_chunks", lambda dense, world: [[e] for e in range(dense.num_experts)])
    one_by_one = run(model, corpus, tmp_path / "one-by-one", **settings)
    assert layer_bytes(Path(together.output)) == layer_bytes(Path(one_by_one.output))


def test_starved_experts_are_rounded_and_named(tmp_path: Path, corpus: Path) -> None:
    starving = {"ranks.min_expert_tokens": 10**6}
    report = run(save_tiny(tmp_path / "mixtral", "mixtral"), corpus, tmp_path / "out", method="dense", **Q4, **starving)
    rounded = report.layers[0].quant["rounded_experts"]
    assert list(rounded.values()) == [[0, 1, 2, 3]]  # every expert of the tiny model: none received a million tokens


@pytest.mark.parametrize("extra", [{"method": "dense"}, {"method": "qlr", "quant.correction_train": True}])
def test_resumed_run_with_quantized_experts_equals_unbroken_run(tmp_path: Path, corpus: Path, monkeypatch, extra: dict) -> None:
    model = save_tiny(tmp_path / "mixtral", "mixtral", num_hidden_layers=3)
    unbroken = run(model, corpus, tmp_path / "unbroken", **Q4, **extra)
    resumed = interrupted_then_resumed(monkeypatch, model, corpus, tmp_path / "resumed", **Q4, **extra)
    assert [r.resumed for r in resumed.layers] == [True, True, False]
    assert run_files(tmp_path / "unbroken") == run_files(tmp_path / "resumed")
    assert resumed.perplexity == unbroken.perplexity


def test_a_factors_hessians_are_its_inputs_moments(tiny_llama: Path) -> None:
    """GPTQ's Hessian of A is E[x xᵀ] of the layer's input; that of B is A E[x xᵀ] Aᵀ; q/k/v's A share theirs."""
    model, layers, layer = materialised_layer(tiny_llama)
    ids = torch.randint(3, 200, (4, 16))
    x, kwargs = capture_inputs(model, layers, ids)
    factorize_layer_(layer, {"self_attn.q_proj": 8, "self_attn.k_proj": 8}, "svd", {})
    names = ["self_attn.q_proj.A", "self_attn.q_proj.B", "self_attn.k_proj.A"]
    moments = input_moments(layer, names, x, kwargs[0], batch_size=2)
    assert moments["self_attn.q_proj.A"] is moments["self_attn.k_proj.A"]
    H = moments["self_attn.q_proj.A"].second_moment()
    A = layer.self_attn.q_proj.A.weight.double()
    assert torch.allclose(moments["self_attn.q_proj.B"].second_moment(), A @ H @ A.T, rtol=1e-4, atol=1e-6)
