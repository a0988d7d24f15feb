"""The compressed checkpoint: its file layout, index and ``config.json``, loading it, and the dense export.

The index and ``config.json`` are written last, so a folder that has them is complete.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from distill_lr.checkpoint.files import save_tensors_atomic, write_json_atomic
from distill_lr.checkpoint.layout import CODE_FILES, INDEX_NAME, OTHER_FILE, TOKENIZER_FILES, layer_file
from distill_lr.checkpoint.manifest import RunManifest
from distill_lr.checkpoint.reader import CheckpointReader, checkpoint_config
from distill_lr.errors import UserInputError
from distill_lr.modeling import hf_modeling
from distill_lr.modeling.lowrank import ExpertLinears, QuantLinear, QuantRecord, multiply_out_
from distill_lr.report import LayerReport


def layer_state(layer: nn.Module, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A compressed layer's tensors as its file holds them: full names, floating ones in ``dtype``, on the host."""
    return {prefix + k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in layer.state_dict().items()}


def linear_bytes(layer: nn.Module, dtype: torch.dtype) -> int:
    """Bytes the layer's linears (plain, factors, quantized, experts' projections) take in its file, floating tensors in ``dtype``."""
    total = 0
    for module in layer.modules():
        if isinstance(module, nn.Linear | QuantLinear | ExpertLinears):
            for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                total += t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
    return total


def folder_structure(layers: list[LayerReport], prefix: str) -> dict[str, Any]:
    """What ``config.json`` records of the quantization: its settings, the quantized linears and the corrections, by full name."""
    records = [(f"{prefix}{r.layer}.", record) for r in layers if (record := QuantRecord.of(r.quant)) is not None]
    if not records:
        return {}
    first = records[0][1]  # the grid is the run's: the same in every layer
    modules = [p + n for p, q in records for n in q.modules]
    corrections = {p + n: rank for p, q in records for n, rank in q.corrections.items()}
    return {"quant": QuantRecord(first.bits, first.group_size, first.symmetric, first.method, modules, corrections).to_dict()}


def write_non_layer(reader: CheckpointReader, model: nn.Module, prefix: str, out: Path, dtype: torch.dtype, manifest: RunManifest) -> None:
    """The embeddings, final norm and head, read from the checkpoint into ``OTHER_FILE`` in ``dtype``; its hash into the manifest."""
    names = [k for k in model.state_dict() if not k.startswith(prefix) and k in reader.tensors]
    digest = save_tensors_atomic({k: v.to(dtype) for k, v in reader.read(names).items()}, out / OTHER_FILE)
    manifest.record_other(OTHER_FILE, digest)


def complete_folder(
    out: Path,
    reader: CheckpointReader,
    n_layers: int,
    ranks: dict[str, int],
    dtype: torch.dtype,
    info: dict[str, Any],
    manifest: RunManifest,
) -> None:
    """Once every layer file is written: the index, the side files and ``config.json`` (the folder is then complete)."""
    write_index(out, [OTHER_FILE] + [layer_file(i) for i in range(n_layers)])
    copy_side_files(reader.folder, out)
    write_compressed_config(reader.config, out, ranks, dtype, info)
    manifest.mark_complete()


def copy_side_files(src: Path, dst: Path, modeling: bool = True) -> None:
    """Tokenizer and generation files travel with the weights; the loading code goes beside them."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    if not modeling:
        return
    here = Path(hf_modeling.__file__).parent
    for source, name in zip(("hf_modeling.py", "lowrank.py"), CODE_FILES, strict=True):
        shutil.copyfile(here / source, dst / name)


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
    data["model_type"] = hf_modeling.MODEL_TYPE
    data["dtype"] = str(save_dtype).removeprefix("torch.")
    entry = "modeling_distill_lr.DistillLR"
    data["auto_map"] = {"AutoConfig": f"{entry}Config", "AutoModelForCausalLM": f"{entry}ForCausalLM"}
    base = {"base_architecture": _architecture(config), "base_model_type": config.model_type}
    data[hf_modeling.CONFIG_KEY] = {**base, "ranks": ranks, **info}
    write_json_atomic(data, folder / "config.json")


def _architecture(config: PretrainedConfig) -> str:
    if config.architectures:
        return config.architectures[0]
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]


def _compressed_config(folder: Path) -> dict[str, Any]:
    data = checkpoint_config(folder)
    if hf_modeling.CONFIG_KEY not in data:
        raise UserInputError(
            f"{folder} is not a finished distill_lr checkpoint (no '{hf_modeling.CONFIG_KEY}' in config.json): "
            "finish or resume the run first"
        )
    return data


def verify_files(folder: Path) -> None:
    """Every file the index names is there and complete, and (with the run's manifest) has the content the run wrote."""
    try:
        hf_modeling.verify_files(folder)
    except hf_modeling.BrokenCheckpointError as err:
        raise UserInputError(str(err)) from None


def load_compressed(
    folder: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
    dense_above: float | None = None,
) -> PreTrainedModel:
    """A transformers model with the low-rank modules in place (the same code as ``trust_remote_code``).

    ``verify`` checks the files first (``verify_files``): one read of the checkpoint, which loading reads anyway.
    ``dense_above``: multiply out the factor pairs that keep at least this fraction of their dense weight's parameters
    (faster where two matmuls cost more than they save; ``lowrank.multiply_out_``).
    """
    folder = Path(folder).expanduser()
    _compressed_config(folder)
    if verify:
        verify_files(folder)
    config = hf_modeling.load_config(folder)
    model_class = hf_modeling.low_rank_class(hf_modeling.base_architecture(config))
    model = model_class.from_pretrained(folder, config=config, dtype=dtype)
    if dense_above is not None:
        multiply_out_(model, dense_above)
    return model.to(device).eval()
