"""Reading a Hugging Face checkpoint folder tensor by tensor, and materialising one decoder layer at a time.

Nothing here loads a whole model: the architecture is built on the ``meta`` device and each
decoder layer is materialised from only its own tensors.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import MergeModulelist, WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from distill_lr.checkpoint.layout import INDEX_NAME
from distill_lr.errors import UserInputError, first_line
from distill_lr.modeling import hf_modeling

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # the tensor's bytes in the file
    end: int


@dataclass
class ParamSource:
    """The checkpoint tensors one model parameter is made of, and the converter that merges them (None: one tensor as is)."""

    converter: WeightConverter | None
    keys: list[str] = field(default_factory=list)  # on-disk names, in transformers' natural order
    renamed: list[str] = field(default_factory=list)  # the same after the renamings: what the converter matched
    patterns: list[str | None] = field(default_factory=list)  # the converter source pattern each matched


FINGERPRINT_SAMPLES = 4
FINGERPRINT_BLOCK = 4096


def _sample_starts(start: int, end: int) -> list[int]:
    """Where the fingerprint's blocks of one tensor's bytes begin: the first and last block and evenly between."""
    last = max(start, end - FINGERPRINT_BLOCK)
    return sorted({start + (last - start) * i // (FINGERPRINT_SAMPLES - 1) for i in range(FINGERPRINT_SAMPLES)})


def check_finite(state: dict[str, torch.Tensor], folder: Path, chunk: int = 1 << 24) -> None:
    """Refuse weights with NaN or inf before they are used, naming the tensor (a few million elements at a time)."""
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        flat = tensor.reshape(-1)
        bad = sum(int((~torch.isfinite(flat[i : i + chunk])).sum()) for i in range(0, len(flat), chunk))
        if bad:
            raise UserInputError(
                f"tensor '{name}' of checkpoint {folder} holds {bad:,} NaN or inf values: the checkpoint is broken "
                "(a diverged training or a bad conversion); repair or re-download it"
            )


def read_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header and check the file holds every byte the header promises; offsets from the file's start."""
    try:
        length, header = hf_modeling.safetensors_header(path)
    except hf_modeling.BrokenCheckpointError as err:
        raise UserInputError(f"{err}: re-download or re-copy it") from None
    for info in header.values():
        info["data_offsets"] = [8 + length + offset for offset in info["data_offsets"]]
    return header


def checkpoint_config(folder: Path) -> dict[str, Any]:
    """A checkpoint folder's ``config.json`` as a dict; one-line errors for a missing folder, a file, a missing or broken config."""
    if not folder.exists():
        raise UserInputError(f"model folder {folder} does not exist: give a folder with config.json and *.safetensors")
    if not folder.is_dir():
        raise UserInputError(f"{folder} is a file, not a model folder: give the folder that holds config.json and *.safetensors")
    path = folder / "config.json"
    if not path.is_file():
        raise UserInputError(f"{folder} has no config.json: give a Hugging Face checkpoint folder")
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise UserInputError(f"{path} is not valid JSON ({first_line(err)}): fix or replace it") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path} holds a JSON {type(data).__name__}, not a config object: fix or replace it")
    return data


class CheckpointReader:
    """An input checkpoint folder: its config and a map from tensor name to shard, read lazily."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        config_path = self.folder / "config.json"
        if hf_modeling.CONFIG_KEY in checkpoint_config(self.folder):
            raise UserInputError(
                f"{self.folder} is a distill_lr compressed checkpoint, not a dense one: give the original model, or a dense "
                "export of this one (export_dense=true when compressing, or distill_lr.export_dense(src, dst))"
            )
        try:
            self.config: PretrainedConfig = AutoConfig.from_pretrained(self.folder, trust_remote_code=False)  # never a prompt
        except (ValueError, OSError, KeyError) as err:
            raise UserInputError(f"{config_path} cannot be read as a transformers config ({first_line(err)}): fix or replace it") from None
        if self.config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(self.config, "is_encoder_decoder", False):
            raise UserInputError(
                f"{config_path} describes a '{self.config.model_type}' model, not a decoder-only causal LM: give a causal LM checkpoint"
            )
        self.tensors = self._index()

    def _index(self) -> dict[str, TensorInfo]:
        index_path = self.folder / INDEX_NAME
        if index_path.is_file():
            try:
                files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise UserInputError(f"{index_path} is not a readable index ({first_line(err)}): re-download or re-copy it") from None
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise UserInputError(f"{self.folder} holds no *.safetensors weights: convert the checkpoint to safetensors first")
        tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise UserInputError(f"shard {name} listed in {INDEX_NAME} is missing from {self.folder}: copy it there")
            for key, info in read_header(path).items():
                if key in tensors:  # which copy is meant cannot be known: loaders differ in which one wins
                    raise UserInputError(
                        f"tensor '{key}' is stored twice, in {tensors[key].file.name} and in {name} of {self.folder}: "
                        "remove the stray copy (re-download or re-copy the checkpoint)"
                    )
                tensors[key] = TensorInfo(path, info["dtype"], tuple(info["shape"]), *info["data_offsets"])
        return tensors

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's floating-point storage dtype (the most common one among its tensors)."""
        counts: dict[str, int] = {}
        for info in self.tensors.values():
            if info.dtype in ("F32", "F16", "BF16"):
                counts[info.dtype] = counts.get(info.dtype, 0) + 1
        return _ST_DTYPES[max(counts, key=counts.__getitem__)] if counts else torch.float32

    def fingerprint(self) -> str:
        """A hash of the config, of every tensor's name, dtype, shape and file size, and of samples of its bytes.

        ``FINGERPRINT_SAMPLES`` blocks of ``FINGERPRINT_BLOCK`` bytes, spread evenly over each tensor, are
        read: other weights of the same shapes change them, while the cost stays a few MB of reads even
        for a 94 GB checkpoint (an edit that touches none of the sampled bytes goes unnoticed).
        """
        digest = hashlib.sha256((self.folder / "config.json").read_bytes())
        by_file: dict[Path, list[str]] = {}
        for key in sorted(self.tensors):
            by_file.setdefault(self.tensors[key].file, []).append(key)
        for path, keys in sorted(by_file.items()):
            with path.open("rb") as fh:
                for key in keys:
                    info = self.tensors[key]
                    digest.update(f"{key}|{info.dtype}|{info.shape}|{path.stat().st_size}".encode())
                    for start in _sample_starts(info.start, info.end):
                        fh.seek(start)
                        digest.update(fh.read(min(FINGERPRINT_BLOCK, info.end - start)))
        return digest.hexdigest()

    def read(self, names: Iterable[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Read the named tensors, opening each shard once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.tensors[name].file, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, keys in by_file.items():
            with safe_open(path, framework="pt", device=str(device)) as fh:
                for key in keys:
                    out[key] = fh.get_tensor(key)
        return out

    @cached_property
    def sources(self) -> dict[str, ParamSource]:
        """Model parameter name -> the checkpoint tensors it is made of, mapped as ``from_pretrained`` maps them.

        transformers 5 states per model type how on-disk names become parameters (``conversion_mapping.py``):
        renamings (Mixtral's ``block_sparse_moe`` -> ``mlp``) and converters that merge per-expert tensors
        into the fused experts' 3-D parameters. A checkpoint already in the fused layout maps one to one.
        """
        transforms = get_model_conversion_mapping(build_skeleton(self.config))
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        sources: dict[str, ParamSource] = {}
        for key in sorted(self.tensors, key=dot_natural_key):  # expert order, as transformers stacks them
            renamed, _ = rename_source_key(key, renamings, [])
            target, pattern = rename_source_key(renamed, [], converters)
            converter = None if pattern is None else next(c for c in converters if pattern in c.source_patterns)
            source = sources.setdefault(target, ParamSource(converter))
            source.keys.append(key)
            source.renamed.append(renamed)
            source.patterns.append(pattern)
        return sources

    def check(self, expected: dict[str, torch.Tensor]) -> None:
        """Fail on a model parameter (name -> meta tensor) the checkpoint lacks, or lacks an expert of, without reading."""
        missing = [name for name in expected if name not in self.sources]
        if missing:
            raise UserInputError(
                f"checkpoint {self.folder} has no tensor '{missing[0]}' ({len(missing)} missing): "
                "the shards are incomplete or belong to another architecture"
            )
        for name, meta in expected.items():
            self._check_experts(name, meta)

    def skeleton(self) -> tuple[PreTrainedModel, str, nn.ModuleList]:
        """The model of config.json on meta, its decoder stack's name prefix and layers: how every stage opens a checkpoint,
        checked against the tensors on disk first (``check_model``)."""
        model = build_skeleton(self.config)
        prefix, layers = decoder_layers(model)
        self.check_model(model, prefix)
        return model, prefix, layers

    def check_model(self, model: nn.Module, layer_prefix: str) -> None:
        """The model built from config.json and the tensors on disk agree, read without a weight: every decoder-layer
        parameter is there (every expert too), every tensor on disk has a use, and each one stored as it is has the shape
        the config implies. A config that describes fewer layers or other sizes than the weights is refused here."""
        expected = model.state_dict()
        self.check({k: v for k, v in expected.items() if k.startswith(layer_prefix)})
        for name, meta in expected.items():
            source = self.sources.get(name)
            if source is not None and source.converter is None and self.tensors[source.keys[0]].shape != tuple(meta.shape):
                raise UserInputError(
                    f"tensor '{source.keys[0]}' of checkpoint {self.folder} has shape {list(self.tensors[source.keys[0]].shape)} but "
                    f"config.json implies {list(meta.shape)}: the weights do not match the config; fix config.json or give the "
                    "matching checkpoint"
                )
        ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
        unused = [  # (parameter it would make, tensor on disk)
            (target, key)
            for target, source in self.sources.items()
            if target not in expected
            for key in source.keys
            if not any(p.search(key) or p.search(target) for p in ignored)
        ]
        if not unused:
            return
        count = model.config.num_hidden_layers
        layer_of = re.compile(re.escape(layer_prefix) + r"(\d+)\.")
        above = sorted({int(m[1]) for t, _ in unused if (m := layer_of.match(t)) and int(m[1]) >= count})
        if above:
            which = f"layer {above[0]}" if len(above) == 1 else f"layers {above[0]}..{above[-1]}"
            raise UserInputError(
                f"checkpoint {self.folder} holds tensors of decoder {which} but config.json has "
                f"num_hidden_layers={count}: the model would be cut short; set num_hidden_layers to the checkpoint's layer count "
                "or give the matching checkpoint"
            )
        raise UserInputError(
            f"checkpoint {self.folder} holds {len(unused)} tensor(s) that the '{model.config.model_type}' model of its config.json "
            f"does not use (e.g. '{unused[0][1]}'): config.json does not match the weights; fix it or give the "
            "matching checkpoint"
        )

    def read_state(self, expected: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The named model parameters read and converted, each checked against the shape of ``expected[name]``."""
        self.check(expected)
        loaded = self.read([key for name in expected for key in self.sources[name].keys], device)
        state = {}
        for name, meta in expected.items():
            state[name] = self._convert(name, loaded)
            if state[name].shape != meta.shape:
                raise UserInputError(
                    f"tensor '{name}' has shape {list(state[name].shape)} but config.json implies "
                    f"{list(meta.shape)}: the weights do not match the config"
                )
        check_finite(state, self.folder)
        return state

    def _convert(self, name: str, loaded: dict[str, torch.Tensor]) -> torch.Tensor:
        """Apply the parameter's converter (a fresh copy, as transformers does) to its tensors, freeing them as it goes."""
        source = self.sources[name]
        tensors = [loaded.pop(key) for key in source.keys]
        if source.converter is None:
            return tensors[0]
        converter = copy.deepcopy(source.converter)
        for key, pattern, tensor in zip(source.keys, source.patterns, tensors, strict=True):
            converter.add_tensor(name, key, pattern, tensor)
        value = converter.convert(name)[name]
        return value[0] if isinstance(value, list) else value

    def _check_experts(self, name: str, meta: torch.Tensor) -> None:
        """A parameter stacked from per-expert tensors needs every expert: name the first one missing on disk."""
        source = self.sources[name]
        merge = next((op for op in source.converter.operations if isinstance(op, MergeModulelist)), None) if source.converter else None
        if merge is None:
            return
        for pattern in [p.lstrip("^") for p in source.converter.source_patterns]:
            index = re.compile(re.escape(pattern).replace(r"\*", r"(\d+)"))
            found = {int(m[1]) for m in map(index.search, source.renamed) if m}
            absent = sorted(set(range(meta.shape[merge.dim])) - found)
            if absent:
                raise UserInputError(
                    f"checkpoint {self.folder} has no tensor '{self._expert_key(source, pattern, absent[0])}' "
                    f"(expert {absent[0]} of '{name}', {len(absent)} missing): the shards are incomplete or the tensor is misnamed; "
                    "re-download the checkpoint or rename the tensor"
                )

    @staticmethod
    def _expert_key(source: ParamSource, pattern: str, expert: int) -> str:
        """The on-disk name expert ``expert``'s tensor of ``pattern`` would have, modelled on a tensor that is there."""
        key, renamed, matched = source.keys[0], source.renamed[0], str(source.patterns[0]).lstrip("^")
        found = re.search(re.escape(matched).replace(r"\*", r"\d+"), renamed)
        assert found is not None  # the converter matched this key with this pattern
        tail = pattern.replace("*", str(expert)) + renamed[found.end() :]
        head = renamed[: found.start()]
        if key.endswith(renamed[found.start() :]):  # the renamings touched only the part before the experts
            head = key[: len(key) - len(renamed) + found.start()]
        return head + tail


class LayerLoader:
    """Materialises decoder layers from the checkpoint, reading layer i+1 on a worker thread while layer i computes.

    With ``read_ahead`` the host holds at most one extra layer (the next one, as stored on disk);
    a read error surfaces in the main thread when that layer is asked for.
    """

    def __init__(self, reader: CheckpointReader, layers: nn.ModuleList, prefix: str, read_ahead: bool = True) -> None:
        self.reader, self.layers, self.prefix, self.read_ahead = reader, layers, prefix, read_ahead
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distill_lr-reader")
        self._ahead: tuple[int, Future[dict[str, torch.Tensor]]] | None = None

    def _read(self, index: int) -> Callable[[], dict[str, torch.Tensor]]:
        expected = {f"{self.prefix}{index}.{k}": v for k, v in self.layers[index].state_dict().items()}  # meta, taken here
        return partial(self.reader.read_state, expected)

    def load(self, index: int, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
        """Layer ``index`` (on meta until now) with its weights on ``device`` in ``dtype``; starts reading the next one."""
        ahead, self._ahead = self._ahead, None
        state = ahead[1].result() if ahead is not None and ahead[0] == index else self._read(index)()
        if self.read_ahead and index + 1 < len(self.layers):
            self._ahead = (index + 1, self._pool.submit(self._read(index + 1)))
        install_state_(self.layers[index], state, f"{self.prefix}{index}.", device, dtype)
        return self.layers[index]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def install_state_(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """Materialise ``module`` (on meta) from tensors named ``prefix + key``: on ``device``, floating ones in ``dtype``, frozen.

    Moved before the cast, so a bf16 checkpoint crosses to the GPU at half the bytes of float32.
    """
    module.load_state_dict({k[len(prefix) :]: _cast(v.to(device), dtype) for k, v in state.items()}, strict=True, assign=True)
    module.requires_grad_(False)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def build_skeleton(config: PretrainedConfig) -> PreTrainedModel:
    """The architecture with parameters on ``meta`` and real buffers (rotary frequencies)."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layer stack and its name prefix (``model.layers.``)."""
    count = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and name.endswith("layers"):
            return f"{name}.", module
    raise UserInputError(
        f"{type(model).__name__} ({model.config.model_type}) is not a decoder-only LM that distill_lr can compress layer by layer: "
        f"it has no stack of {count} decoder layers ('model.layers'); give a decoder-only causal LM "
        "(Llama, Mistral, Qwen, Gemma, Mixtral...)"
    )


def non_layer_state(model: nn.Module, layer_prefix: str) -> list[str]:
    """State-dict keys outside the decoder layers (embeddings, final norm, head)."""
    return [k for k in model.state_dict() if not k.startswith(layer_prefix)]


def load_non_layer_(model: PreTrainedModel, reader: CheckpointReader, layer_prefix: str, device: torch.device, dtype: torch.dtype) -> None:
    """Materialise embeddings, final norm and head; a tied head shares the embedding."""
    keys = [k for k in non_layer_state(model, layer_prefix) if k in reader.tensors]
    state = reader.read(keys, device)
    check_finite(state, reader.folder)
    state = {k: _cast(v, dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(layer_prefix)]
    if still_meta:
        raise UserInputError(f"checkpoint {reader.folder} has no tensor '{still_meta[0]}': the shards are incomplete")
    model.requires_grad_(False)
