"""Spectra and layer metrics of every linear (and every MoE expert) of a checkpoint, streamed one layer at a time.

    distill-lr spectra                                      # the built-in model, with activation-aware spectra
    distill-lr spectra --compare /path/to/fine-tuned        # or a PEFT LoRA adapter folder
    distill-lr spectra --sweep docs/laser_sweep.json        # does any metric predict the sweep?

Per matrix (``distill_lr.analysis.spectra.metrics``): singular values, condition number, effective and stable
rank, energy and nuclear-norm fraction at every rank, break-even rank, and the rank and parameters
that keep 90 / 99% of the energy; the same for the activation-aware spectrum of W·S (S from the
calibration inputs; linears only, experts not). Between consecutive layers, the shared-subspace ratio
of each module type's right singular vectors. Writes ``spectra.json`` (every number), ``spectra.md``
(the printed tables) and PNG plots to ``--out``. ``--compare`` contrasts two checkpoints of one architecture, or the model with a LoRA
adapter merged (``W + scaling · B A``, scaling from the adapter's PEFT config); ``--sweep`` prints the
Spearman correlation of each metric with a LASER sweep's per-layer change in loss and accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from distill_lr.analysis import laser, spectra
from distill_lr.analysis.sweep import Model
from distill_lr.analysis.tables import markdown_table, save_results
from distill_lr.builtin import BUILTIN_MODEL, BUILTIN_TEXT, resolve_model_dir
from distill_lr.checkpoint.reader import CheckpointReader, LayerLoader
from distill_lr.data import build_token_sets, load_documents
from distill_lr.errors import check
from distill_lr.stats import collect_stats

OVERLAP_K = 16  # top singular vectors compared by --compare


def kind(name: str) -> str:
    """A matrix's module type across layers and experts: ``self_attn.q_proj``, ``mlp.experts.up``."""
    return re.sub(r"\.\d+\.", ".", name)


def activation_streams(args: argparse.Namespace, folder: Path) -> Model | None:
    if args.activations <= 0:
        return None
    from transformers import AutoTokenizer

    m = Model.open(folder, torch.device("cpu"), torch.float32, batch_size=8)
    tokens = build_token_sets(
        load_documents(args.data), AutoTokenizer.from_pretrained(folder), num_sequences=args.activations, seq_len=args.seq_len,
        eval_sequences=0, eval_fraction=0.1, seed=0,
    )  # fmt: skip
    m.add_stream("calibration", tokens.calibration)
    return m


class Other:
    """What ``--compare`` contrasts: another checkpoint of the same architecture, or a LoRA adapter on this one."""

    def __init__(self, path: Path, reader: CheckpointReader, layers: Any, prefix: str) -> None:
        self.path, self.prefix = path, prefix
        self.adapter: dict[str, torch.Tensor] = {}
        if (path / "adapter_config.json").is_file():
            from peft import PeftConfig

            config = PeftConfig.from_pretrained(path)
            self.scaling = config.lora_alpha / (math.sqrt(config.r) if getattr(config, "use_rslora", False) else config.r)
            files = sorted(path.glob("adapter_model*.safetensors"))
            check(bool(files), f"{path} has adapter_config.json but no adapter_model.safetensors")
            for file in files:
                self.adapter.update({k.removeprefix("base_model.model."): v for k, v in load_file(file).items()})
            self.loader = None
        else:
            other = CheckpointReader(path)
            mine = {k: v.shape for k, v in reader.tensors.items()}
            theirs = {k: v.shape for k, v in other.tensors.items()}
            check(
                other.config.model_type == reader.config.model_type and mine == theirs,
                f"--compare {path} is a checkpoint of another architecture ({other.config.model_type}, {len(theirs)} tensors; "
                f"this one: {reader.config.model_type}, {len(mine)}): compare checkpoints of one architecture",
            )
            _, skeleton_prefix, other_layers = other.skeleton()
            self.loader = LayerLoader(other, other_layers, skeleton_prefix)

    def weights(self, index: int, mine: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.loader is not None:
            return laser.all_weights(self.loader.load(index, "cpu", torch.float32))
        out = {}
        for name, W in mine.items():
            a = self.adapter.get(f"{self.prefix}{index}.{name}.lora_A.weight")
            b = self.adapter.get(f"{self.prefix}{index}.{name}.lora_B.weight")
            out[name] = W if a is None else W + self.scaling * (b.float() @ a.float())
        return out


def compare(W: torch.Tensor, W_other: torch.Tensor, mine: dict[str, Any]) -> dict[str, Any]:
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    U2, S2, Vh2 = torch.linalg.svd(W_other.double(), full_matrices=False)
    theirs = spectra.metrics(S2, tuple(W.shape))
    return {
        "effective_rank_change": theirs["effective_rank"] - mine["effective_rank"],
        "stable_rank_change": theirs["stable_rank"] - mine["stable_rank"],
        "spectrum_change": float((S2 - S).norm() / S.norm()),
        "weight_change": float((W_other.double() - W.double()).norm() / W.double().norm()),
        "left_overlap": spectra.subspace_overlap(U, U2, OVERLAP_K),
        "right_overlap": spectra.subspace_overlap(Vh.T, Vh2.T, OVERLAP_K),
    }


def analyse(args: argparse.Namespace) -> dict[str, Any]:
    folder = resolve_model_dir(args.model)
    reader = CheckpointReader(folder)
    _, prefix, layers = reader.skeleton()
    loader = LayerLoader(reader, layers, prefix)
    acts = activation_streams(args, folder)
    hidden = acts.embedded() if acts else {}
    other = Other(Path(args.compare).expanduser(), reader, layers, prefix) if args.compare else None
    result: dict[str, Any] = {"model": str(args.model), "layers": [], "shared_subspace": {}}
    previous_v: dict[str, torch.Tensor] = {}
    for index in tqdm(range(len(layers)), desc="spectra", unit="layer"):
        layer = loader.load(index, "cpu", torch.float32)
        weights = laser.all_weights(layer)
        stats: dict[str, Any] = {}
        if acts is not None:
            modules = dict(layer.named_modules())
            linears = [n for n in weights if isinstance(modules.get(n), torch.nn.Linear)]
            stats, _ = collect_stats(layer, linears, hidden["calibration"], acts.streams[0].kwargs[index], acts.batch_size)
            acts.forward_(layer, index, hidden)
        theirs = other.weights(index, weights) if other else {}
        entry: dict[str, Any] = {}
        for name, W in weights.items():
            _, S, Vh = torch.linalg.svd(W.detach().double(), full_matrices=False)
            entry[name] = spectra.metrics(S, tuple(W.shape))
            if name in stats:
                entry[name]["activation"] = spectra.metrics(spectra.activation_singular_values(W, stats[name]), tuple(W.shape))
            if name in theirs:
                entry[name]["compare"] = compare(W, theirs[name], entry[name])
            if "experts" not in name:
                if name in previous_v:
                    ratio = spectra.shared_subspace_ratio(previous_v[name], Vh.T, args.subspace_threshold)
                    result["shared_subspace"].setdefault(name, {})[index] = ratio
                previous_v[name] = Vh.T
        result["layers"].append(entry)
        layer.to("meta")
    loader.close()
    return result


def layer_metric(result: dict[str, Any], module_type: str, index: int, metric: str, value: float | int) -> float:
    """One number per (layer, LASER module type): the mean over its matrices of ``metric`` (at the sweep's ρ)."""
    names = [n for n in result["layers"][index] if kind(n) in laser.MODULE_TYPES[module_type] or _expert_of(n, module_type)]
    values = []
    for name in names:
        m = result["layers"][index][name]
        keep = laser.keep_rank(value, *m["shape"])
        lookup = {
            "effective_rank": m["effective_rank"],
            "stable_rank": m["stable_rank"],
            "log10_condition_number": math.log10(m["condition_number"]) if math.isfinite(m["condition_number"]) else math.inf,
            "energy_kept": m["energy"][keep - 1],
            "nuclear_fraction_kept": m["nuclear_fraction"][keep - 1],
            "activation_energy_kept": m["activation"]["energy"][keep - 1] if "activation" in m else math.nan,
            "shared_subspace_ratio": result["shared_subspace"].get(name, {}).get(index, math.nan),
        }
        values.append(lookup[metric])
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _expert_of(name: str, module_type: str) -> bool:
    return "experts" in name and name.rsplit(".", 1)[-1] in laser._EXPERT_PARTS.get(module_type, ())


METRICS = (
    "effective_rank",
    "stable_rank",
    "log10_condition_number",
    "energy_kept",
    "nuclear_fraction_kept",
    "activation_energy_kept",
    "shared_subspace_ratio",
)


def correlations(result: dict[str, Any], sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """Spearman's ρ over layers between each metric and the sweep's change in loss (and accuracy), per type and value."""
    rows = []
    dense = sweep["dense"]
    task = next(iter(dense.get("tasks", {})), None)
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for row in sweep["rows"]:
        groups.setdefault((row["type"], row["value"]), []).append(row)
    for (module_type, value), group in groups.items():
        layers = [r["layer"] for r in group]
        d_loss = [r["loss"] - dense["loss"] for r in group]
        d_acc = [r["tasks"][task]["acc"] - dense["tasks"][task]["acc"] for r in group] if task else []
        for metric in METRICS:
            x = [layer_metric(result, module_type, i, metric, value) for i in layers]
            entry = {"type": module_type, "value": value, "metric": metric, "layers": len(layers), "vs_loss": spectra.spearman(x, d_loss)}
            if task:
                entry["vs_acc"] = spectra.spearman(x, d_acc)
            rows.append(entry)
    return rows


def plots(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = len(result["layers"])
    kinds = list(dict.fromkeys(kind(n) for entry in result["layers"] for n in entry if "experts" not in n or ".0." in n))
    colours = plt.cm.viridis
    with_acts = any("activation" in m for entry in result["layers"] for m in entry.values())
    rows = 2 if with_acts else 1
    fig, axes = plt.subplots(rows, len(kinds), figsize=(2.8 * len(kinds), 2.6 * rows), squeeze=False)
    fig2, axes2 = plt.subplots(1, len(kinds), figsize=(2.8 * len(kinds), 2.6), squeeze=False)
    for col, k in enumerate(kinds):
        for index, entry in enumerate(result["layers"]):
            for name, m in entry.items():
                if kind(name) != k or ("experts" in name and ".0." not in name):
                    continue  # experts: expert 0 stands for them in the plots
                colour = colours(index / max(1, depth - 1))
                for row, spectrum in enumerate([m, m.get("activation")][:rows]):
                    if spectrum:
                        sigma = torch.tensor(spectrum["singular_values"])
                        axes[row][col].semilogy(torch.linspace(0, 1, len(sigma)), sigma / sigma[0], color=colour, lw=0.8)
                axes2[0][col].plot(torch.linspace(0, 1, len(m["energy"])), m["energy"], color=colour, lw=0.8)
        axes[0][col].set_title(k, fontsize=8)
        axes2[0][col].set_title(k, fontsize=8)
        axes[-1][col].set_xlabel("rank / full rank", fontsize=7)
        axes2[0][col].set_xlabel("rank / full rank", fontsize=7)
    axes[0][0].set_ylabel("σ / σ₁ (weights)", fontsize=7)
    if with_acts:
        axes[1][0].set_ylabel("σ / σ₁ (W·S, activations)", fontsize=7)
    axes2[0][0].set_ylabel("energy kept", fontsize=7)
    for f, name in ((fig, "spectra_by_depth.png"), (fig2, "energy_curves.png")):
        f.colorbar(plt.cm.ScalarMappable(cmap=colours, norm=plt.Normalize(0, depth - 1)), ax=f.axes, label="layer", shrink=0.8)
        f.savefig(out / name, dpi=110)
    fig3, axes3 = plt.subplots(1, 2, figsize=(10, 3.4))
    for k in kinds:
        series = [[m for n, m in entry.items() if kind(n) == k] for entry in result["layers"]]
        cond = [sum(math.log10(m["condition_number"]) for m in ms) / len(ms) if ms else math.nan for ms in series]
        eff = [sum(m["effective_rank"] / min(m["shape"]) for m in ms) / len(ms) if ms else math.nan for ms in series]
        axes3[0].plot(cond, label=k)
        axes3[1].plot(eff, label=k)
    axes3[0].set(xlabel="layer", ylabel="log10 condition number")
    axes3[1].set(xlabel="layer", ylabel="effective rank / full rank")
    axes3[1].legend(fontsize=6)
    fig3.tight_layout()
    fig3.savefig(out / "condition_effective_rank.png", dpi=110)


def summary(result: dict[str, Any]) -> str:
    rows = []
    for k in dict.fromkeys(kind(n) for entry in result["layers"] for n in entry):
        ms = [m for entry in result["layers"] for n, m in entry.items() if kind(n) == k]
        acts = [m["activation"] for m in ms if "activation" in m]
        mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
        rows.append(
            [
                k,
                len(ms),
                f"{mean([m['effective_rank'] / min(m['shape']) for m in ms]):.3f}",
                f"{mean([m['effective_rank'] / min(m['shape']) for m in acts]):.3f}" if acts else "-",
                f"{mean([m['rank_for_90pct_energy']['rank'] / min(m['shape']) for m in ms]):.3f}",
                f"{mean([m['rank_for_90pct_energy']['rank'] / min(m['shape']) for m in acts]):.3f}" if acts else "-",
                f"{mean([m['rank_for_90pct_energy']['vs_dense'] for m in ms]):.2f}",
                f"{mean([math.log10(m['condition_number']) for m in ms]):.2f}",
            ]
        )
    header = [
        "module",
        "matrices",
        "eff. rank / r",
        "eff. rank / r (W·S)",
        "90% energy rank / r",
        "same (W·S)",
        "params at 90% / dense",
        "log10 cond.",
    ]
    return markdown_table(header, rows)


HELP = "weight and activation spectra of a checkpoint, compared with another or with a LASER sweep"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=BUILTIN_MODEL)
    parser.add_argument("--out", type=Path, default=Path("runs/spectra"), help="where spectra.{json,md} and the plots go")
    parser.add_argument("--activations", type=int, default=16, help="calibration sequences for the W·S spectra (0: none)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--data", default=BUILTIN_TEXT)
    parser.add_argument("--compare", help="another checkpoint of the same architecture, or a PEFT LoRA adapter folder")
    parser.add_argument("--sweep", type=Path, help="laser_sweep.json of distill-lr laser sweep on the same model")
    parser.add_argument("--subspace-threshold", type=float, default=spectra.SUBSPACE_THRESHOLD, help="t of the shared-subspace ratio")


def run(args: argparse.Namespace) -> int:
    result = analyse(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        result["sweep_correlations"] = correlations(result, json.loads(args.sweep.read_text()))
    save_results(result, args.out / "spectra.json")
    plots(result, args.out)
    text = [summary(result)]
    print(text[0])
    if args.compare:
        changes = [(n, m["compare"]) for entry in result["layers"] for n, m in entry.items() if "compare" in m]
        moved = sorted(changes, key=lambda c: -c[1]["weight_change"])[:8]
        cells = [
            (n, f"{c['weight_change']:.3g}", f"{c['effective_rank_change']:+.2f}", f"{c['left_overlap']:.3f}", f"{c['right_overlap']:.3f}")
            for n, c in moved
        ]
        print(f"\nmost changed matrices against {args.compare} (top-{OVERLAP_K} subspace overlap: 1 = unchanged):")
        print(markdown_table(("matrix", "‖ΔW‖/‖W‖", "Δ effective rank", "left overlap", "right overlap"), cells))
    if args.sweep:
        cells = [
            (c["type"], c["value"], c["metric"], f"{c['vs_loss']:+.2f}", f"{c.get('vs_acc', math.nan):+.2f}")
            for c in result["sweep_correlations"]
        ]
        text.append(markdown_table(("type", "ρ", "metric", "vs Δ loss", "vs Δ acc"), cells, align="llrrr"))
        print("\nSpearman correlation over the swept layers of each metric with the change in loss / accuracy (nan: a constant metric):")
        print(text[-1])
    (args.out / "spectra.md").write_text("\n\n".join(text) + "\n")
    print(f"\nspectra.json and plots in {args.out}")
    return 0
