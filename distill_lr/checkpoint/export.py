"""A compressed checkpoint in the formats other tools read, written file by file (never the whole model in memory).

- ``dense``: the original architecture, factors multiplied out and integers dequantized; any loader reads it.
- ``compressed-tensors``: the quantized linears as llm-compressor's ``pack-quantized`` format (int32-packed codes,
  per-group scales, ``quantization_config`` in ``config.json``), which transformers (with the compressed-tensors
  package) and vLLM load without remote code; float factor pairs are multiplied out and left unquantized.
- ``lora``: a ``qlr`` folder's low-rank corrections as a PEFT LoRA adapter (``lora_A = A``, ``lora_B = B``,
  ``alpha = r``: scale 1), to sit on the ``compressed-tensors`` export of the same folder.

Every export refuses a damaged source, writes into a new or empty folder (or over its own earlier export, whose
files alone it replaces) and records what it wrote in ``EXPORT_MARKER``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from distill_lr.checkpoint.compressed import _compressed_config, copy_side_files, verify_files, write_index
from distill_lr.checkpoint.files import check_apart, check_folder_path, save_tensors_atomic, write_json_atomic
from distill_lr.checkpoint.layout import EXPORT_MARKER, INDEX_NAME, TOKENIZER_FILES
from distill_lr.errors import UserInputError
from distill_lr.modeling import hf_modeling
from distill_lr.modeling.lowrank import LowRankExperts, QuantRecord, dequantize, unpack_codes

FORMATS = ("dense", "compressed-tensors", "lora")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


@dataclass
class Source:
    """A finished, verified compressed folder: its config as the base architecture's, its ranks, quantization and weight files."""

    folder: Path
    config: dict[str, Any]
    ranks: dict[str, int]
    quant: QuantRecord | None
    files: list[str]


def export(src: str | Path, dst: str | Path, fmt: str = "dense") -> str:
    """Write ``src`` (a finished distill_lr folder) to ``dst`` in ``fmt``; returns a line saying what was written and how to load it."""
    if fmt not in FORMATS:
        raise UserInputError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    data = _compressed_config(src)
    check_export_target(dst, src)
    verify_files(src)  # a damaged file is named, not exported
    info = data.pop(hf_modeling.CONFIG_KEY)
    data["model_type"] = info.get("base_model_type", data["model_type"])
    data.pop("auto_map", None)
    files = sorted(set(json.loads((src / INDEX_NAME).read_text())["weight_map"].values()))
    source = Source(src, data, info["ranks"], QuantRecord.of(info.get("quant")), files)
    return {"dense": _dense, "compressed-tensors": _compressed_tensors, "lora": _lora}[fmt](source, dst)


def export_dense(src: str | Path, dst: str | Path) -> None:
    """Multiply the factors out (and dequantize the integers) into a checkpoint of the original architecture (fused MoE
    experts included). ``dst`` may be new, empty, or an earlier export (only the files that export wrote are replaced)."""
    export(src, dst, "dense")


def _dense(src: Source, dst: Path) -> str:
    quant = src.quant

    def convert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if quant is not None:
            _dequantize_(tensors, quant)
        _multiply_out_(tensors, src.ranks)
        return tensors

    _write_model(src, dst, convert)
    return f"dense checkpoint of {src.folder} written to {dst}: AutoModelForCausalLM.from_pretrained('{dst}')"


def _compressed_tensors(src: Source, dst: Path) -> str:
    quant, ranks = src.quant, src.ranks
    try:
        import compressed_tensors  # noqa: F401  (its packer and config schema write the format)
    except ImportError:
        raise UserInputError("--format compressed-tensors needs the compressed-tensors package: pip install 'distill-lr[export]'") from None
    if quant is None or not quant.modules:
        raise UserInputError(
            f"{src.folder} has no quantized linears (compress with method=dense or method=qlr and quant.bits): "
            "compressed-tensors holds integer weights; use --format dense for a float checkpoint"
        )
    if not quant.symmetric:
        raise UserInputError(
            f"{src.folder} has an asymmetric grid: compressed-tensors packs its zero points, which transformers (with "
            "compressed-tensors 0.20) then fails to load; compress with quant.symmetric=true, or export --format dense"
        )
    targets = {m.removesuffix(".base") if m.removesuffix(".base") in quant.corrections else m: m for m in quant.modules}
    for target in targets:
        if target.rpartition(".")[0] in ranks:
            raise UserInputError(
                f"{target} is a quantized factor of a low-rank pair: compressed-tensors has no low-rank layer to hold it; "
                "export --format dense, or compress with method=dense or method=qlr for a compressed-tensors base"
            )
    linears = _linears(src.config)
    experts = [t for t in targets if t not in linears]  # not a linear of the base model: a fused experts' projection
    if experts:
        raise UserInputError(
            f"{experts[0]} is a quantized MoE expert projection: its export to compressed-tensors' fused-experts layout "
            "is not built; export --format dense"
        )
    strategy = _ct_strategy(src, quant, targets)

    def convert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for target, module in targets.items():
            if f"{module}.qweight" in tensors:
                tensors.update(_pack_ct(tensors, module, target, quant))
        for module in quant.corrections:  # the corrections go to the LoRA export
            tensors.pop(f"{module}.A.weight", None), tensors.pop(f"{module}.B.weight", None)
        _multiply_out_(tensors, ranks)  # float factor pairs, written as plain weights
        return tensors

    src.config["quantization_config"] = _ct_config(quant, strategy, sorted(linears - set(targets)))
    _write_model(src, dst, convert)
    note = "; export its corrections with --format lora to load on top of it" if quant.corrections else ""
    return f"compressed-tensors checkpoint of {src.folder} written to {dst} ({quant.bits}-bit, pack-quantized, {strategy}){note}"


def _lora(src: Source, dst: Path) -> str:
    quant = src.quant
    if quant is None or not quant.corrections:
        raise UserInputError(
            f"{src.folder} has no low-rank corrections (method=qlr writes them): a LoRA adapter holds a quantized base's corrections"
        )
    experts = sorted(set(quant.corrections) - _linears(src.config))
    if experts:
        raise UserInputError(
            f"{experts[0]} is a corrected MoE expert projection: LoRA adapters of fused experts are not built; export --format dense"
        )
    rank = max(quant.corrections.values())  # smaller corrections are padded with zero rows and columns: exact
    _clear_export(dst)
    dst.mkdir(parents=True, exist_ok=True)
    adapter: dict[str, torch.Tensor] = {}
    for name in src.files:
        tensors = load_file(src.folder / name)
        for module in [m for m in quant.corrections if f"{m}.A.weight" in tensors]:
            a, b = tensors[f"{module}.A.weight"], tensors[f"{module}.B.weight"]
            pad = rank - a.shape[0]
            adapter[f"base_model.model.{module}.lora_A.weight"] = nn.functional.pad(a, (0, 0, 0, pad)).contiguous()
            adapter[f"base_model.model.{module}.lora_B.weight"] = nn.functional.pad(b, (0, pad)).contiguous()
    save_tensors_atomic(adapter, dst / ADAPTER_WEIGHTS)
    config = _lora_config(rank, sorted(quant.corrections))
    write_json_atomic(config, dst / ADAPTER_CONFIG)
    write_json_atomic({"exported_from": str(src.folder), "files": [ADAPTER_WEIGHTS, ADAPTER_CONFIG]}, dst / EXPORT_MARKER)
    return (
        f"LoRA adapter (r = alpha = {rank}, {len(quant.corrections)} modules) of {src.folder} written to {dst}: "
        f"PeftModel.from_pretrained(base, '{dst}') over the compressed-tensors export; vLLM needs --max-lora-rank >= {rank}"
    )


def decompress_for_peft(model: torch.nn.Module) -> None:
    """Unpack a compressed-tensors model's integers into float weights in its own dtype, in place, so that PEFT (which
    wraps linears by their ``weight``) can sit on it. transformers' ``CompressedTensorsConfig(dequantize=True)`` would
    compute them in the checkpoint's dtype instead: bf16 scales give bf16-rounded weights in a float32 model."""
    model.hf_quantizer.compressor.decompress_model(model)


def _lora_config(rank: int, modules: list[str]) -> dict[str, Any]:
    """PEFT's own ``LoraConfig`` when peft is installed (every field its loader expects), else the fields it requires."""
    settings = {"r": rank, "lora_alpha": rank, "target_modules": modules, "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}
    try:
        from peft import LoraConfig
    except ImportError:
        return {"peft_type": "LORA", **settings}
    return json.loads(json.dumps(LoraConfig(**settings).to_dict(), default=sorted))


def _write_model(src: Source, dst: Path, convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    """Each weight file of ``src`` through ``convert`` into ``dst``, then the index, the side files and ``config.json``."""
    _clear_export(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in src.files:
        save_tensors_atomic(convert(load_file(src.folder / name)), dst / name)
    write_index(dst, src.files)
    copy_side_files(src.folder, dst, modeling=False)
    write_json_atomic(src.config, dst / "config.json")
    written = [*src.files, INDEX_NAME, "config.json", *(name for name in TOKENIZER_FILES if (dst / name).is_file())]
    write_json_atomic({"exported_from": str(src.folder), "files": written}, dst / EXPORT_MARKER)


def _multiply_out_(tensors: dict[str, torch.Tensor], ranks: dict[str, int]) -> None:
    """Factor pairs of one file (linears and fused experts' projections) as the dense weights they stand for."""
    for module in [m for m in ranks if f"{m}.A.weight" in tensors]:
        a, b = tensors.pop(f"{module}.A.weight"), tensors.pop(f"{module}.B.weight")
        tensors[f"{module}.weight"] = (b.float() @ a.float()).to(b.dtype)
        if f"{module}.B.bias" in tensors:
            tensors[f"{module}.bias"] = tensors.pop(f"{module}.B.bias")
    lowrank_experts = {k.rsplit(".", 2)[0] for k, v in tensors.items() if v.ndim == 3 and k.endswith((".down_proj.weight", ".down_proj.A"))}
    for experts in sorted(lowrank_experts):  # a LowRankExperts (factor pairs or dequantized integers) as the fused module
        local = {k[len(experts) + 1 :]: tensors.pop(k) for k in [k for k in tensors if k.startswith(experts + ".")]}
        tensors.update({f"{experts}.{k}": v for k, v in LowRankExperts.fused_state(local).items()})


def _dequantize_(tensors: dict[str, torch.Tensor], quant: QuantRecord) -> None:
    """Quantized linears of one file as float weights, then each corrected weight as ``base + B A`` (a dense export)."""
    for module in [m for m in quant.modules if f"{m}.qweight" in tensors]:
        *rows, in_features = tensors.pop(f"{module}.qshape").tolist()  # (out, in), or (experts, out, in)
        scale, zero = tensors.pop(f"{module}.scale"), tensors.pop(f"{module}.zero", None)
        weight = dequantize(tensors.pop(f"{module}.qweight"), scale, zero, quant.bits, quant.group_size, in_features)
        tensors[f"{module}.weight"] = weight.reshape(*rows, in_features).to(scale.dtype)
    for module in [m for m in quant.corrections if f"{m}.base.weight" in tensors]:
        factor = "weight" if f"{module}.A.weight" in tensors else ""  # a linear's A.weight, or an experts' A (E, r, in)
        a, b = (tensors.pop(".".join(filter(None, (module, f, factor)))) for f in ("A", "B"))
        base = tensors.pop(f"{module}.base.weight")
        tensors[f"{module}.weight"] = (base.float() + b.float() @ a.float()).to(base.dtype)
        if f"{module}.base.bias" in tensors:
            tensors[f"{module}.bias"] = tensors.pop(f"{module}.base.bias")


def _ct_strategy(src: Source, quant: QuantRecord, targets: dict[str, str]) -> str:
    """``group`` when every quantized linear's columns split into whole groups, ``channel`` when one group spans every
    row; compressed-tensors has no shorter last group, so anything else is refused, naming the module."""
    kinds: dict[str, str] = {}
    for name in src.files:
        with safe_open(src.folder / name, framework="pt") as fh:
            for target, module in targets.items():
                if f"{module}.qshape" in fh.keys():
                    in_features = int(fh.get_tensor(f"{module}.qshape")[1])
                    if quant.group_size >= in_features:
                        kinds.setdefault("channel", target)
                    elif in_features % quant.group_size == 0:
                        kinds.setdefault("group", target)
                    else:
                        raise UserInputError(
                            f"{target} has {in_features} inputs, not a multiple of quant.group_size={quant.group_size}: "
                            "compressed-tensors has no shorter last group; compress with a group size that divides every "
                            "quantized linear's inputs (e.g. 64 or 32), or export --format dense"
                        )
    if len(kinds) > 1:
        raise UserInputError(
            f"{kinds['channel']} has one group per row while {kinds['group']} has several: one compressed-tensors scheme "
            f"cannot hold both; compress with a quant.group_size that divides every quantized linear's inputs"
        )
    return next(iter(kinds))


def _pack_ct(tensors: dict[str, torch.Tensor], module: str, target: str, quant: QuantRecord) -> dict[str, torch.Tensor]:
    """One symmetric ``QuantLinear``'s tensors (popped from ``tensors``) as compressed-tensors' ``weight_packed``,
    ``weight_scale`` and ``weight_shape``: the same integers, signed, packed by compressed-tensors' own packer."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out_features, in_features = tensors.pop(f"{module}.qshape").tolist()
    mid = 1 << (quant.bits - 1)
    codes = unpack_codes(tensors.pop(f"{module}.qweight"), quant.bits, in_features)
    packed = {
        f"{target}.weight_packed": pack_to_int32((codes.to(torch.int16) - mid).to(torch.int8), quant.bits),
        f"{target}.weight_scale": tensors.pop(f"{module}.scale"),
        f"{target}.weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if f"{module}.bias" in tensors:
        packed[f"{target}.bias"] = tensors.pop(f"{module}.bias")
    return packed


def _linears(config: dict[str, Any]) -> set[str]:
    """The names of the base architecture's ``nn.Linear`` modules, from a model built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _ct_config(quant: QuantRecord, strategy: str, ignore: list[str]) -> dict[str, Any]:
    """compressed-tensors' ``QuantizationConfig`` for these integers: one scheme over every ``Linear`` but ``ignore``."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=quant.bits,
        type="int",
        symmetric=quant.symmetric,
        strategy=strategy,
        group_size=quant.group_size if strategy == "group" else None,
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, format="pack-quantized")
    result = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized", quantization_status="compressed", ignore=ignore)
    return result.model_dump(mode="json")


def check_export_target(dst: Path, src: Path, role: str = "export folder") -> None:
    """Refuse an export folder that is a file, lies in or around ``src``, or holds anything but an earlier export."""
    check_apart(dst, role, {"the compressed checkpoint": src})
    check_folder_path(dst, role)
    if dst.is_dir() and any(dst.iterdir()) and not (dst / EXPORT_MARKER).is_file():
        found = ", ".join(sorted(p.name for p in dst.iterdir())[:5])
        raise UserInputError(f"{role} {dst} is not empty and holds no distill_lr export (it has {found}): choose a new or empty folder")


def _clear_export(dst: Path) -> None:
    """Delete an earlier export's files from ``dst`` (``check_export_target`` has passed)."""
    marker = dst / EXPORT_MARKER
    if not marker.is_file():
        return
    for name in json.loads(marker.read_text())["files"]:
        (dst / name).unlink(missing_ok=True)
    marker.unlink()
