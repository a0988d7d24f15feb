"""Loading code for compressed checkpoints, saved beside the weights as ``modeling_distill_lr.py``.

It imports only torch, transformers and the ``lowrank.py`` saved next to it, so a compressed folder
loads on a machine without distill_lr::

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

``config.json`` names the model type ``distill_lr``, which transformers does not know: without
``trust_remote_code`` loading fails with transformers' own "requires trust_remote_code" error instead
of building a dense model with random projections. With it, ``DistillLRConfig`` rebuilds the original
architecture's config, the original class is built, the modules listed in ``config.distill_lr["ranks"]``
are swapped for empty low-rank ones, and then transformers loads the factors as usual. Loading a local
folder first checks its weight files (``verify_files``: present, complete and, with the run's manifest
beside them, the content the run wrote); ``distill_lr_verify=False`` skips that read. ``distill_lr_dense_above=f``
multiplies out the factor pairs that keep at least a fraction ``f`` of their dense weight (``multiply_out_``).

``ranks`` maps module names to ranks. A name of an ``nn.Linear`` (``model.layers.0.self_attn.q_proj``)
becomes a ``LowRankLinear``; ``<experts>.gate_proj`` / ``.up_proj`` / ``.down_proj`` under a fused MoE
experts module (``model.layers.0.mlp.experts.down_proj``) gives that projection of all its experts the
rank, and the experts module becomes a ``LowRankExperts`` whose unnamed projections stay dense.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import transformers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .lowrank import (
    EXPERT_PROJECTIONS,
    CorrectedExperts,
    CorrectedLinear,
    ExpertLinears,
    LowRankExperts,
    LowRankLinear,
    QuantExpertLinears,
    QuantLinear,
    QuantRecord,
    is_fused_experts,
    multiply_out_,
    replace_experts_,
    replace_linears_,
)

CONFIG_KEY = "distill_lr"
MODEL_TYPE = "distill_lr"  # unknown to transformers: plain from_pretrained refuses the folder
INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "distill_lr_manifest.json"  # the run's record, with the sha256 of every weight file it wrote


class BrokenCheckpointError(ValueError):
    """A weight file of a compressed folder is missing, truncated or not what the run wrote."""


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(length, header) of a safetensors file, after checking that the file holds every byte the header promises."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > size - 8:
                raise ValueError
            header = json.loads(fh.read(length))
        header.pop("__metadata__", None)
        end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    except (ValueError, struct.error, KeyError, TypeError, IndexError, AttributeError):
        raise BrokenCheckpointError(f"{path} is not a readable safetensors file") from None
    if 8 + length + end > size:
        raise BrokenCheckpointError(f"{path} is truncated ({size:,} bytes, its header needs {8 + length + end:,})")
    return length, header


def verify_files(folder: Path) -> None:
    """Every weight file the index names is there and complete, and, when the run's manifest is beside them, has the sha256
    the run recorded (one read of the weights). Raises ``BrokenCheckpointError`` naming the first bad file."""
    index = folder / INDEX_NAME
    if not index.is_file():
        raise BrokenCheckpointError(f"{folder} has no {INDEX_NAME}: the folder is incomplete; rerun the compression into it")
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        recorded = {}
        if (folder / MANIFEST_NAME).is_file():
            data = json.loads((folder / MANIFEST_NAME).read_text())
            recorded = {entry["file"]: entry["sha256"] for entry in [*data["layers"].values(), data.get("other", {})] if entry}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise BrokenCheckpointError(
            f"{folder}'s {INDEX_NAME} or {MANIFEST_NAME} is unreadable ({err!r}): rerun the compression into it"
        ) from None
    for name in names:
        path = folder / name
        if not path.is_file():
            raise BrokenCheckpointError(f"{path}, named in {INDEX_NAME}, is missing: rerun the compression into this folder to rewrite it")
        safetensors_header(path)
        if name in recorded and file_sha256(path) != recorded[name]:
            raise BrokenCheckpointError(
                f"{path} has changed since it was written (its sha256 does not match {MANIFEST_NAME}): "
                "rerun the same compression command into this folder, which recomputes that layer"
            )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def base_config(config_dict: dict[str, Any], **kwargs: Any) -> Any:
    """The original architecture's config from a compressed ``config.json`` (``from_dict``'s return, kwargs and all)."""
    data = dict(config_dict)
    data["model_type"] = data[CONFIG_KEY].get("base_model_type", data["model_type"])  # folders written before the type
    return CONFIG_MAPPING[data["model_type"]].from_dict(data, **kwargs)


def load_config(folder: Any, **kwargs: Any) -> PretrainedConfig:
    """The original architecture's config of a compressed folder, read without remote code."""
    config_dict, unused = PretrainedConfig.get_config_dict(folder, **kwargs)
    return base_config(config_dict, **unused)


def apply_low_rank_(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace the named linears and experts' projections by uninitialised low-rank modules of the given ranks."""
    experts = {name for name, module in model.named_modules() if is_fused_experts(module)}
    expert_ranks: dict[str, dict[str, int]] = {}
    for name, rank in ranks.items():
        parent, _, projection = name.rpartition(".")
        if parent in experts and projection in EXPERT_PROJECTIONS:
            expert_ranks.setdefault(parent, {})[projection] = rank

    def factory(name: str, linear: nn.Linear) -> nn.Module:
        return LowRankLinear(
            linear.in_features,
            linear.out_features,
            ranks[name],
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )

    swapped = set(replace_linears_(model, factory, predicate=lambda name, _: name in ranks))
    for parent in replace_experts_(model, lambda name, m: LowRankExperts.like(m, expert_ranks[name]), lambda name, _: name in expert_ranks):
        swapped.update(f"{parent}.{projection}" for projection in expert_ranks[parent])
    missing = sorted(set(ranks) - swapped)
    if missing:
        raise ValueError(f"compressed checkpoint names modules the model does not have: {missing[:3]}")


def apply_compressed_(model: nn.Module, ranks: dict[str, int], quant: dict[str, Any] | None = None) -> None:
    """Install empty compressed modules: low-rank ones (``ranks``), then, from the quantization record (``QuantRecord``'s
    JSON form, ``config.distill_lr["quant"]``), the quantized weights with a correction of the given rank and the
    quantized linears (``<name>.A``, ``<name>.base``, ...)."""
    apply_low_rank_(model, ranks)
    record = QuantRecord.of(quant)
    if record is None:
        return
    parents = {name.removesuffix(".base").rpartition(".")[0] for name in [*record.modules, *record.corrections]}
    replace_experts_(model, lambda _, m: LowRankExperts.like(m), lambda name, _: name in parents)  # fused: dense projections
    grid = (record.bits, record.group_size, record.symmetric)
    for name, rank in record.corrections.items():
        module = model.get_submodule(name)
        if isinstance(module, ExpertLinears):
            model.set_submodule(name, CorrectedExperts(QuantExpertLinears.like(module, *grid), rank))
        else:
            model.set_submodule(name, CorrectedLinear(module, rank))
    for name in record.modules:
        module = model.get_submodule(name)
        if isinstance(module, QuantExpertLinears):  # a corrected experts projection's base, installed above
            continue
        if isinstance(module, ExpertLinears) and module.rank is None:
            model.set_submodule(name, QuantExpertLinears.like(module, *grid))
        elif isinstance(module, nn.Linear):
            model.set_submodule(name, QuantLinear.like(module, *grid))
        else:
            raise ValueError(f"compressed checkpoint quantizes {name}, which is not a linear of the model")


def low_rank_class(base: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """A subclass of the original architecture whose constructor installs the low-rank modules."""

    def __init__(self: PreTrainedModel, config: transformers.PretrainedConfig, *args: object, **kwargs: object) -> None:
        base.__init__(self, config, *args, **kwargs)
        info = getattr(config, CONFIG_KEY)
        apply_compressed_(self, info["ranks"], info.get("quant"))

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})


def base_architecture(config: transformers.PretrainedConfig) -> type[PreTrainedModel]:
    return getattr(transformers, getattr(config, CONFIG_KEY)["base_architecture"])


class DistillLRConfig:
    """``AutoConfig`` entry point named in ``auto_map``: returns the original architecture's config class, filled in.

    A plain class, never instantiated, like ``DistillLRForCausalLM``: one serves every architecture.
    """

    @classmethod
    def register_for_auto_class(cls, auto_class: object = "AutoConfig") -> None:
        """Called by ``AutoConfig`` on remote classes; the config this one returns is a transformers class."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
        kwargs.pop("trust_remote_code", None)
        return load_config(pretrained_model_name_or_path, **kwargs)


class DistillLRForCausalLM:
    """Entry point named in ``auto_map``: dispatches to the low-rank variant of the original class.

    A plain class rather than a ``PreTrainedModel``: it is never instantiated, and it serves every
    architecture's config class (transformers 5.17's ``AutoModel.register`` rejects a model class whose
    ``config_class`` is not the config's).
    """

    @classmethod
    def register_for_auto_class(cls, auto_class: object = "AutoModelForCausalLM") -> None:
        """Called by ``AutoModelForCausalLM`` on remote classes; the class this one returns needs no registering."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):  # type: ignore[override]
        kwargs.pop("trust_remote_code", None)
        kwargs.pop("adapter_kwargs", None)
        if kwargs.pop("distill_lr_verify", True) and Path(pretrained_model_name_or_path).is_dir():
            verify_files(Path(pretrained_model_name_or_path))  # a damaged file is named here, not loaded
        above = kwargs.pop("distill_lr_dense_above", None)
        if config is None:
            config = load_config(pretrained_model_name_or_path)
        model_class = low_rank_class(base_architecture(config))
        model = model_class.from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
        if above is not None:
            multiply_out_(model, above)
        return model
