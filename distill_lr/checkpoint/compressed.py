"""The compressed checkpoint: its file layout, index and ``config.json``, loading it, and the dense export.

The index and ``config.json`` are written last, so a folder that has them is complete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from distill_lr.checkpoint.files import save_tensors_atomic, write_json_atomic
from distill_lr.checkpoint.reader import INDEX_NAME
from distill_lr.errors import UserInputError
from distill_lr.modeling import hf_modeling
from distill_lr.modeling.lowrank import LowRankExperts

OTHER_FILE = "model-other.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def layer_file(index: int) -> str:
    return f"model-layer-{index:05d}.safetensors"


def layer_state(layer: nn.Module, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A compressed layer's tensors as its file holds them: full names, floating ones in ``dtype``, on the host."""
    return {prefix + k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in layer.state_dict().items()}


def copy_side_files(src: Path, dst: Path, modeling: bool = True) -> None:
    """Tokenizer and generation files travel with the weights; the loading code goes beside them."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    if not modeling:
        return
    here = Path(hf_modeling.__file__).parent
    shutil.copyfile(here / "hf_modeling.py", dst / "modeling_distill_lr.py")
    shutil.copyfile(here / "lowrank.py", dst / "lowrank.py")


def write_index(folder: Path, files: Iterable[str]) -> None:
    weight_map: dict[str, str] = {}
    total = 0
    for name in files:
        with safe_open(folder / name, framework="pt") as fh:
            for key in fh.keys():
                weight_map[key] = name
        total += (folder / name).stat().st_size
    write_json_atomic({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, folder / INDEX_NAME)


def write_compressed_config(
    config: PretrainedConfig, folder: Path, ranks: dict[str, int], save_dtype: torch.dtype, info: dict[str, Any]
) -> None:
    """``config.json`` of the compressed model: the original plus the ranks and the remote-code entry point."""
    data = config.to_dict()
    data.pop("auto_map", None)
    data["dtype"] = str(save_dtype).removeprefix("torch.")
    data["auto_map"] = {"AutoModelForCausalLM": "modeling_distill_lr.DistillLRForCausalLM"}
    data[hf_modeling.CONFIG_KEY] = {"base_architecture": _architecture(config), "ranks": ranks, **info}
    write_json_atomic(data, folder / "config.json")


def _architecture(config: PretrainedConfig) -> str:
    if config.architectures:
        return config.architectures[0]
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]


def _compressed_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    if hf_modeling.CONFIG_KEY not in data:
        raise UserInputError(
            f"{folder} is not a finished distill_lr checkpoint (no '{hf_modeling.CONFIG_KEY}' in config.json): "
            "finish or resume the run first"
        )
    return data


def load_compressed(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A transformers model with the low-rank modules in place (the same code as ``trust_remote_code``)."""
    folder = Path(folder).expanduser()
    _compressed_config(folder)
    config = AutoConfig.from_pretrained(folder)
    model_class = hf_modeling.low_rank_class(hf_modeling.base_architecture(config))
    model = model_class.from_pretrained(folder, config=config, dtype=dtype)
    return model.to(device).eval()


def export_dense(src: Path, dst: Path) -> None:
    """Multiply the factors out, file by file, into a checkpoint of the original architecture (fused MoE experts included)."""
    data = _compressed_config(src)
    ranks = data.pop(hf_modeling.CONFIG_KEY)["ranks"]
    data.pop("auto_map", None)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    files = sorted(set(json.loads((src / INDEX_NAME).read_text())["weight_map"].values()))
    for name in files:
        tensors = load_file(src / name)
        for module in [m for m in ranks if f"{m}.A.weight" in tensors]:
            a, b = tensors.pop(f"{module}.A.weight"), tensors.pop(f"{module}.B.weight")
            tensors[f"{module}.weight"] = (b.float() @ a.float()).to(b.dtype)
            if f"{module}.B.bias" in tensors:
                tensors[f"{module}.bias"] = tensors.pop(f"{module}.B.bias")
        for experts in sorted({m.rpartition(".")[0] for m in ranks if f"{m}.A" in tensors}):  # a LowRankExperts
            local = {k[len(experts) + 1 :]: tensors.pop(k) for k in [k for k in tensors if k.startswith(experts + ".")]}
            tensors.update({f"{experts}.{k}": v for k, v in LowRankExperts.fused_state(local).items()})
        save_tensors_atomic(tensors, dst / name)
    write_index(dst, files)
    copy_side_files(src, dst, modeling=False)
    write_json_atomic(data, dst / "config.json")
