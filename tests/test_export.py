"""Exports other tools read: compressed-tensors (transformers loads it with no remote code and computes our logits) and
a PEFT LoRA adapter of a qlr folder's corrections (PEFT over the compressed-tensors base computes the qlr model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run
from peft import PeftModel
from transformers import AutoModelForCausalLM

from distill_lr.checkpoint import compressed
from distill_lr.checkpoint.export import ADAPTER_CONFIG, decompress_for_peft, export
from distill_lr.errors import UserInputError
from distill_lr.testing import save_tiny

Q4 = {"quant.bits": 4, "quant.group_size": 16, "save_dtype": "float32"}


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    "extra",
    [{}, {"quant.bits": 8, "quant.group_size": 1000}],  # int4 by groups, int8 per channel
)
def test_compressed_tensors_export_loads_without_remote_code_and_computes_our_logits(
    tmp_path: Path, tiny_llama: Path, corpus: Path, extra: dict
) -> None:
    report = run(tiny_llama, corpus, tmp_path / "out", method="dense", **{**Q4, **extra})
    print(export(report.output, tmp_path / "ct", "compressed-tensors"))
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config and config["quantization_config"]["format"] == "pack-quantized"
    assert "lm_head" in config["quantization_config"]["ignore"]
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()  # no trust_remote_code
    assert torch.allclose(logits(theirs), logits(compressed.load_compressed(report.output)), atol=1e-4)


@pytest.mark.parametrize("save_dtype", ["float32", "bfloat16"])
def test_lora_adapter_over_the_compressed_tensors_base_computes_the_qlr_model(
    tmp_path: Path, tiny_llama: Path, corpus: Path, save_dtype: str
) -> None:
    """Both sides computed in float32, from float32 or bfloat16 files."""
    rules = '{"**.q_proj": 2}'  # ranks differ: the adapter pads the smaller corrections to the largest, exactly
    settings = {**Q4, "save_dtype": save_dtype, "quant.correction_rank": 4, "quant.correction_rules": rules}
    report = run(tiny_llama, corpus, tmp_path / "out", method="qlr", **settings)
    export(report.output, tmp_path / "ct", "compressed-tensors")
    export(report.output, tmp_path / "lora", "lora")
    adapter = json.loads((tmp_path / "lora" / ADAPTER_CONFIG).read_text())
    corrections = json.loads((Path(report.output) / "config.json").read_text())["distill_lr"]["quant"]["corrections"]
    assert adapter["r"] == adapter["lora_alpha"] == 4 and sorted(adapter["target_modules"]) == sorted(corrections)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    decompress_for_peft(base)
    without = logits(base)
    corrected = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    ours = logits(compressed.load_compressed(report.output, dtype=torch.float32))
    assert torch.allclose(logits(corrected), ours, atol=1e-3)
    assert not torch.allclose(without, ours, atol=1e-3)  # the corrections matter


def test_exports_refuse_what_their_format_cannot_hold(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    def refused(src: str, fmt: str, needle: str, dst: Path | None = None) -> None:
        with pytest.raises(UserInputError) as err:
            export(src, dst or tmp_path / f"x-{fmt}", fmt)
        assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)

    ragged = run(tiny_llama, corpus, tmp_path / "ragged", method="dense", **{**Q4, "quant.group_size": 48}).output  # 64 = 48 + 16
    refused(ragged, "compressed-tensors", "inputs, not a multiple of quant.group_size=48: compressed-tensors has no shorter last group")
    mixed = run(tiny_llama, corpus, tmp_path / "mixed", method="dense", **{**Q4, "quant.group_size": 64}).output  # 64 | 128
    refused(mixed, "compressed-tensors", "one group per row while")
    asymmetric = run(tiny_llama, corpus, tmp_path / "asymmetric", method="dense", **{**Q4, "quant.symmetric": False}).output
    refused(asymmetric, "compressed-tensors", "has an asymmetric grid")
    lowrank = run(tiny_llama, corpus, tmp_path / "lowrank", method="whiten").output
    refused(lowrank, "compressed-tensors", "has no quantized linears")
    refused(lowrank, "lora", "has no low-rank corrections")
    factors = run(tiny_llama, corpus, tmp_path / "factors", method="whiten", **Q4).output
    refused(factors, "compressed-tensors", "is a quantized factor of a low-rank pair")
    refused(lowrank, "onnx", "unknown export format 'onnx'")
    moe = run(save_tiny(tmp_path / "mixtral", "mixtral"), corpus, tmp_path / "moe", method="dense", **Q4).output
    refused(moe, "compressed-tensors", "mlp.experts.down_proj is a quantized MoE expert projection")
    moe_qlr = run(save_tiny(tmp_path / "mixtral", "mixtral"), corpus, tmp_path / "moe-qlr", method="qlr", **Q4).output
    refused(moe_qlr, "lora", "mlp.experts.down_proj is a corrected MoE expert projection")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    refused(lowrank, "dense", "is not empty and holds no distill_lr export", tmp_path / "full")
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep"
