"""LASER interventions (Sharma, Ash & Misra, ICLR 2024): chosen weight matrices replaced by a truncated SVD.

A matrix ``W = U Σ Vᵀ`` of full rank r keeps k of its components: the k largest (LASER) or, with
``higher``, the k smallest (dropping the largest ones, the "higher-order" variant). k is a fraction ρ
of r (LASER's ρ, rounded up) or an integer. A written checkpoint stores a linear factorised
(``LowRankLinear``) where k is below the break-even rank m·n/(m+n), which saves parameters, and
dense-shaped (``U_k Σ_k V_kᵀ`` in the original matrix, LASER's own convention) otherwise; MoE experts
are always dense-shaped. Matrices are named by module type: ``q``, ``k``, ``v``, ``o`` (attention) and
``mlp_in`` (gate and up), ``mlp_out`` (down), every expert's too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill_lr.checkpoint import compressed, files
from distill_lr.checkpoint.layout import layer_file
from distill_lr.checkpoint.manifest import RunManifest
from distill_lr.checkpoint.reader import CheckpointReader, LayerLoader
from distill_lr.errors import check
from distill_lr.factorize import balanced, break_even_rank
from distill_lr.modeling.lowrank import LowRankLinear, replace_linears_
from distill_lr.moe import fused_experts

MODULE_TYPES: dict[str, tuple[str, ...]] = {
    "q": ("self_attn.q_proj",),
    "k": ("self_attn.k_proj",),
    "v": ("self_attn.v_proj",),
    "o": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_out": ("mlp.down_proj",),
}
_EXPERT_PARTS = {"mlp_in": ("gate", "up"), "mlp_out": ("down",)}


def keep_rank(value: float | int, out_features: int, in_features: int) -> int:
    """Components kept: ``ceil(ρ · min(m, n))`` for a fraction ρ in (0, 1], or an integer rank as given."""
    full = min(out_features, in_features)
    if isinstance(value, float):
        check(0.0 < value <= 1.0, f"LASER's rho must be in (0, 1], got {value}: give a fraction of the full rank or an integer rank")
        return max(1, math.ceil(value * full))
    check(1 <= value <= full, f"rank {value} is outside [1, {full}] for a {out_features}x{in_features} matrix")
    return int(value)


def check_module_types(types: list[str]) -> None:
    unknown = [t for t in types if t not in MODULE_TYPES]
    check(not unknown, f"unknown module type {unknown[0] if unknown else ''!r}: use some of {tuple(MODULE_TYPES)}")


def weights(layer: nn.Module, module_type: str) -> dict[str, Tensor]:
    """The 2-D weight matrices of one module type in a decoder layer, by name: views that can be written in place.

    Each expert of a fused MoE module gives its own views (``mlp.experts.3.up``).
    """
    check_module_types([module_type])
    modules = dict(layer.named_modules())
    found = {name: modules[name].weight for name in MODULE_TYPES[module_type] if isinstance(modules.get(name), nn.Linear)}
    for path, experts in fused_experts(layer).items():
        gate, up = experts.gate_up_proj.chunk(2, dim=1)  # views: writing them writes the fused parameter
        parts = {"gate": gate, "up": up, "down": experts.down_proj}
        for part in _EXPERT_PARTS.get(module_type, ()):
            found.update({f"{path}.{e}.{part}": parts[part][e] for e in range(len(parts[part]))})
    return found


def all_weights(layer: nn.Module) -> dict[str, Tensor]:
    """Every 2-D weight of a decoder layer: each linear's (and router's), each expert's gate, up and down (``mlp.experts.3.up``)."""
    found = {
        name: m.weight for name, m in layer.named_modules() if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.ndim == 2
    }
    for module_type in _EXPERT_PARTS:
        found.update({name: w for name, w in weights(layer, module_type).items() if name not in found})
    return found


@dataclass(frozen=True)
class Spectrum:
    """The SVD of one matrix, in float32, computed once and truncated at any k."""

    U: Tensor
    S: Tensor
    Vh: Tensor

    @classmethod
    def of(cls, W: Tensor) -> Spectrum:
        U, S, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)
        return cls(U, S, Vh)

    def kept(self, keep: int, higher: bool) -> slice:
        return slice(len(self.S) - keep, None) if higher else slice(0, keep)

    def truncated(self, keep: int, higher: bool) -> Tensor:
        """``U_k Σ_k V_kᵀ`` over the kept components."""
        k = self.kept(keep, higher)
        return (self.U[:, k] * self.S[k]) @ self.Vh[k]

    def factors(self, keep: int, higher: bool) -> tuple[Tensor, Tensor]:
        """``(A, B)`` with ``B A = U_k Σ_k V_kᵀ``, each holding ``sqrt(Σ_k)``."""
        return balanced(self.U, self.S, self.Vh, self.kept(keep, higher))


@torch.no_grad()
def intervene_(matrix: Tensor, value: float | int, higher: bool = False, spectrum: Spectrum | None = None) -> int:
    """Replace ``matrix`` in place by its truncated SVD; returns the components kept. Full rank leaves it bit-for-bit as it is."""
    keep = keep_rank(value, *matrix.shape)
    if keep < min(matrix.shape):
        matrix.copy_((spectrum or Spectrum.of(matrix)).truncated(keep, higher).to(matrix.dtype))
    return keep


@dataclass(frozen=True)
class Intervention:
    """One LASER intervention: module types of one layer, at ρ (or a rank), lower or higher order."""

    layer: int
    types: tuple[str, ...]
    value: float | int
    higher: bool = False

    def name(self) -> str:
        order = "higher" if self.higher else "lower"
        return f"layer {self.layer} {'+'.join(self.types)} rho={self.value} ({order})"


def apply_(layer: nn.Module, intervention: Intervention) -> dict[str, dict[str, Any]]:
    """Apply to a materialised decoder layer; returns per matrix how it is stored and the parameters it takes.

    Linears below their break-even rank become ``LowRankLinear`` (factorised); the rest keep their shape.
    """
    stored: dict[str, dict[str, Any]] = {}
    factored: dict[str, tuple[Tensor, Tensor]] = {}
    for module_type in intervention.types:
        for name, matrix in weights(layer, module_type).items():
            out_f, in_f = matrix.shape
            spectrum = Spectrum.of(matrix)
            keep = keep_rank(intervention.value, out_f, in_f)
            linear = "experts" not in name
            if linear and keep < break_even_rank(out_f, in_f):
                factored[name] = spectrum.factors(keep, intervention.higher)
                stored[name] = {"rank": keep, "stored": "factorised", "params": keep * (out_f + in_f), "dense_params": out_f * in_f}
            else:
                intervene_(matrix, intervention.value, intervention.higher, spectrum)
                stored[name] = {"rank": keep, "stored": "dense-shaped", "params": out_f * in_f, "dense_params": out_f * in_f}

    def factory(name: str, linear: nn.Linear) -> LowRankLinear:
        A, B = factored[name]
        bias = None if linear.bias is None else linear.bias.detach()
        return LowRankLinear.from_factors(A.to(linear.weight.dtype), B.to(linear.weight.dtype), bias)

    replace_linears_(layer, factory, lambda name, _: name in factored)
    return stored


def _write_layers(
    reader: CheckpointReader,
    model: nn.Module,
    stack: tuple[str, nn.ModuleList],
    out: Path,
    intervention: Intervention,
    manifest: RunManifest,
) -> dict[str, dict[str, Any]]:
    """Every layer's file, the intervened one changed; what was stored of each intervened matrix, by full name."""
    prefix, layers = stack
    compressed.write_non_layer(reader, model, prefix, out, reader.dtype, manifest)
    loader = LayerLoader(reader, layers, prefix)
    stored: dict[str, dict[str, Any]] = {}
    try:
        for i in range(len(layers)):
            layer = loader.load(i, "cpu", torch.float32)
            if i == intervention.layer:
                stored = {f"{prefix}{i}.{name}": info for name, info in apply_(layer, intervention).items()}
            manifest.save_layer(i, layer_file(i), compressed.layer_state(layer, f"{prefix}{i}.", reader.dtype))
            manifest.mark_done(i, {"layer": i})
            layer.to("meta")
    finally:
        loader.close()
    return stored


def write_intervened(model_dir: str | Path, output: str | Path, intervention: Intervention, overwrite: bool = False) -> dict[str, Any]:
    """Stream a checkpoint through one intervention into a folder that loads like a compressed one; returns its report."""
    reader = CheckpointReader(model_dir)
    out = Path(output).expanduser()
    files.check_apart(out, "output folder", {"the input folder": reader.folder})
    model, prefix, layers = reader.skeleton()
    check(0 <= intervention.layer < len(layers), f"layer {intervention.layer} is outside the model's {len(layers)} decoder layers")
    matched = [name for t in intervention.types for name in weights(layers[intervention.layer], t)]
    check(bool(matched), f"{intervention.name()} matches no matrix of this model: check the module types")
    settings = {"laser": {"layer": intervention.layer, "types": list(intervention.types), "value": intervention.value}}
    with files.claimed_folder(out):
        manifest = RunManifest(out, {**settings, "higher": intervention.higher}, reader.fingerprint(), overwrite)
        manifest.start()
        stored = _write_layers(reader, model, (prefix, layers), out, intervention, manifest)
        ranks = {name: info["rank"] for name, info in stored.items() if info["stored"] == "factorised"}
        info = {"method": "laser", "intervention": {**settings["laser"], "higher": intervention.higher}}
        compressed.complete_folder(out, reader, len(layers), ranks, reader.dtype, info, manifest)
        change = sum(s["params"] - s["dense_params"] for s in stored.values())
        report = {"intervention": intervention.name(), "matrices": stored, "parameter_change": change}
        files.write_json_atomic(report, out / "report.json")
    return report
