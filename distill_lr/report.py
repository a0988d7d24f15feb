"""The typed record of a run: one ``LayerReport`` per decoder layer inside a ``RunReport``.

The CLI's closing table, the per-layer log line, ``report.json`` and the resume manifest are all
produced from these objects; ``to_dict`` gives the JSON form, leaving out what a run did not do.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from distill_lr.modeling.lowrank import QuantRecord
from distill_lr.ranks import RankPlan


def _without_empty(obj: Any) -> dict[str, Any]:
    """A dataclass as a dict, in field order, without the fields left at None (or False for flags)."""
    return {f.name: value for f in fields(obj) if (value := getattr(obj, f.name)) is not None and value is not False}


@dataclass
class LayerReport:
    """What happened to one decoder layer."""

    layer: int
    linears: int  # low-rank modules in the layer
    experts: dict[str, dict[str, Any]] | None = None  # MoE: per experts module, tokens per expert, the starved ones, moment bytes
    train: dict[str, Any] | None = None  # ``train.TrainResult.summary()`` when the method trains
    bases: dict[str, dict[str, int]] | None = None  # Basis Selection: per matrix the original bases kept, new bases, used
    err_teacher_input: float | None = None  # ‖student(X_t) − Y‖ / ‖Y‖ on a few calibration sequences
    err_student_input: float | None = None  # ‖student(X_s) − Y‖ / ‖Y‖ on the calibration set
    seconds: dict[str, float] | None = None  # per phase, for the run that computed the layer
    peak_gib: dict[str, dict[str, float]] | None = None  # per phase: peak host (and GPU) memory, as ``seconds``
    quant: dict[str, Any] | None = None  # a ``QuantRecord`` of the layer, plus its output errors (``methods.quantize.record``)
    linear_bytes: int | None = None  # bytes of the layer's linears in its file (``compressed.linear_bytes``)
    comm: dict[str, dict[str, float]] | None = None  # several processes: per phase, bytes and seconds of the collectives
    resumed: bool = False  # read back from an earlier run's file

    def to_dict(self) -> dict[str, Any]:
        return _without_empty(self)

    def to_record(self) -> dict[str, Any]:
        """What the resume manifest keeps (a copy): all but the timings, so two runs of one config write the same manifest."""
        return copy.deepcopy({k: v for k, v in self.to_dict().items() if k not in ("seconds", "peak_gib", "comm", "resumed")})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerReport:
        return cls(**data)

    def line(self, n_layers: int) -> str:
        """The per-layer log line."""
        parts = [f"layer {self.layer + 1}/{n_layers}", f"{self.linears} low-rank"]
        if self.train is not None:
            tr = self.train
            parts.append(
                f"loss {tr['init_loss']:.4f} -> {tr['final_loss']:.4f} (held-out {tr['best_holdout']:.4f}, cos {tr['holdout_cos']:.4f})"
            )
        parts.append(f"rel.err teacher-in {self.err_teacher_input:.4f} student-in {self.err_student_input:.4f}")
        if self.bases:
            kept, new, used = (sum(b[k] for b in self.bases.values()) for k in ("kept", "new", "new_used"))
            parts.append(f"bases kept {kept}, new {used}/{new} used")
        q = QuantRecord.of(self.quant)
        if q is not None:
            error = f", output err {self.quant['mean_error']:.4f}" if "mean_error" in self.quant else ""
            corrected = f", {len(q.corrections)} corrected" if q.corrections else ""
            parts.append(f"int{q.bits} g{q.group_size} {len(q.modules)} quantized{corrected}{error}")
        starved = {path: r["starved"] for path, r in (self.experts or {}).items() if r["starved"]}
        if starved:
            parts.append("starved experts " + " ".join(f"{path} {experts}" for path, experts in starved.items()))
        if self.seconds:
            parts.append(" ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()))
        if self.comm:
            spent = {k: sum(p[k] for p in self.comm.values()) for k in ("seconds", "bytes")}
            parts.append(f"collectives {spent['seconds']:.1f}s {spent['bytes'] / 2**20:.1f} MiB")
        if self.peak_gib:
            peaks = {where: max(p.get(where, 0.0) for p in self.peak_gib.values()) for where in ("host", "gpu")}
            parts.append("peak " + " ".join(f"{where} {gib:.1f} GiB" for where, gib in peaks.items() if gib))
        if self.resumed:
            parts.append("(resumed)")
        return " | ".join(parts)


@dataclass(frozen=True)
class ParamSummary:
    """Parameter counts before and after; the ratio counts the decoder layers' linear weights only."""

    decoder_linear_before: int
    decoder_linear_after: int
    removed_fraction: float
    model_before: int
    model_after: int
    compressed_linears: int
    factor_params: int = 0  # in the factor pairs of the rank plan
    added_params: int = 0  # float parameters a method adds outside the plan (qlr's corrections)
    counted: str = "weights of the decoder layers' linear projections (no embeddings, norms, head or biases)"

    @classmethod
    def of(cls, plan: RankPlan, model_params: int, added_params: int = 0) -> ParamSummary:
        return cls(
            decoder_linear_before=plan.dense_params,
            decoder_linear_after=plan.kept_params,
            removed_fraction=round(plan.removed_fraction, 4),
            model_before=model_params,
            model_after=model_params - (plan.dense_params - plan.kept_params),
            compressed_linears=len(plan.ranks),
            factor_params=sum(r * sum(plan.shapes[n]) for n, r in plan.ranks.items()),
            added_params=added_params,
        )

    @property
    def trainable(self) -> int:
        """What the end-to-end stage trains: the factor pairs and the added float parameters (quantization scales aside)."""
        return self.factor_params + self.added_params

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {"counted": data.pop("counted"), **data}


@dataclass(frozen=True)
class Perplexity:
    """Held-out perplexity of the dense and the compressed model, from one layer-by-layer pass."""

    dense: float
    compressed: float
    eval_tokens: int
    eval_sequences: int
    seq_len: int

    @classmethod
    def of(cls, dense: dict[str, Any], compressed: dict[str, Any], eval_sequences: int, seq_len: int) -> Perplexity:
        """From the two stacks' ``streams.score`` of the held-out text."""
        return cls(_ppl(dense["loss"]), _ppl(compressed["loss"]), dense["tokens"], eval_sequences, seq_len)


def _ppl(loss: float) -> float:
    return float(torch.exp(torch.tensor(loss)))


@dataclass
class RunReport:
    """A whole run; ``to_dict()`` is ``<output>/report.json``."""

    config: dict[str, Any]
    input: str
    output: str
    params: ParamSummary
    activation_cache: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    teacher_cache: dict[str, Any] | None = None  # folder, files read and written
    perplexity: Perplexity | None = None
    tasks: list[dict[str, Any]] = field(default_factory=list)  # per task: its name, dense and compressed scores
    allocation: dict[str, Any] | None = None  # how the ranks were chosen, and the kept fraction per layer and module
    e2e: dict[str, Any] | None = None  # the end-to-end stage: steps, held-out KL before and after, its curve
    size: dict[str, Any] | None = None  # bytes of the decoder linears as saved, against the dense ones in the save dtype
    dense_export: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in _without_empty(self).items() if v != []}
        data["params"] = self.params.to_dict()
        data["layers"] = [layer.to_dict() for layer in self.layers]
        if self.perplexity is not None:
            data["perplexity"] = asdict(self.perplexity)
        return data

    def summary_table(self) -> str:
        """The closing table: parameters, perplexity and time, before and after."""
        p = self.params
        rows = [
            ("decoder-linear weights", f"{p.decoder_linear_before:,}", f"{p.decoder_linear_after:,}"),
            ("all model parameters", f"{p.model_before:,}", f"{p.model_after:,}"),
        ]
        if self.perplexity is not None:
            ppl = self.perplexity
            rows.append((f"perplexity ({ppl.eval_tokens:,} held-out tokens)", f"{ppl.dense:.2f}", f"{ppl.compressed:.2f}"))
        for task in self.tasks:
            name = f"{task['task']} acc / acc_norm ({task['dense']['examples']} examples)"
            rows.append((name, *(f"{task[k]['acc']:.3f} / {task[k]['acc_norm']:.3f}" for k in ("dense", "compressed"))))
        if self.size is not None:
            rows.append(("decoder-linear bytes", f"{self.size['dense_bytes']:,}", f"{self.size['bytes']:,}"))
        rows.append(("wall time", "", f"{self.seconds:.1f} s"))
        width = max(len(r[0]) for r in rows)
        cols = [max(len(r[i]) for r in rows + [("", "before", "after")]) for i in (1, 2)]
        lines = [f"{'':{width}}  {'before':>{cols[0]}}  {'after':>{cols[1]}}"]
        lines += [f"{a:{width}}  {b:>{cols[0]}}  {c:>{cols[1]}}" for a, b, c in rows]
        lines.append(f"removed {p.removed_fraction:.1%} of the {p.counted}")
        lines.append(f"compressed checkpoint: {self.output}  (report: {self.output}/report.json)")
        return "\n".join(lines)


def describe_plan(plan: RankPlan) -> str:
    return (
        f"rank plan: {len(plan.ranks)} of {len(plan.shapes)} decoder linears low-rank; decoder-linear weights "
        f"{plan.dense_params:,} -> {plan.kept_params:,} ({plan.removed_fraction:.1%} removed; embeddings, norms and head not counted)"
    )


def describe_kept(kept: dict[str, dict[str, float]]) -> str:
    """The plan per layer and module as a table of kept parameter fractions (1 = dense)."""
    modules = list(dict.fromkeys(m for row in kept.values() for m in row))
    short = [m.removeprefix("self_attn.").removeprefix("mlp.").removeprefix("block_sparse_moe.") for m in modules]
    width = max(6, *(len(s) for s in short)) if short else 6
    lines = ["kept fraction of each matrix's parameters:", "layer " + " ".join(f"{s:>{width}}" for s in short)]
    for layer, row in kept.items():
        lines.append(f"{layer:>5} " + " ".join(f"{row[m]:>{width}.2f}" if m in row else " " * width for m in modules))
    return "\n".join(lines)
