"""The bottom-up driver: compress a checkpoint one decoder layer at a time.

For layer i: load its dense weights -> teacher outputs Y = layer(X_t) -> build the low-rank
student (SVD / PCA / whitened SVD) -> train it (``method: distill``) -> write it -> X_t <- Y,
X_s <- student(X_s). Only one layer's weights are ever materialised. ``compress(cfg)`` is the
entry point; ``python scripts/compress.py`` calls it.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import functools
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from distill_lr import checkpoint as ckpt
from distill_lr import moe
from distill_lr.builtin import resolve_model_dir
from distill_lr.cache import ActivationCache, TeacherStore, cache_bytes, choose_placement
from distill_lr.config import CompressConfig
from distill_lr.data import build_token_sets, load_documents
from distill_lr.errors import UserInputError
from distill_lr.hf_modeling import apply_low_rank_
from distill_lr.init import Moments, records_outputs
from distill_lr.layerwise import LayerKwargs, SharedInputs, capture_inputs, embed, head_nll, layer_device, run_layer
from distill_lr.lowrank import LowRankExperts, LowRankLinear, replace_linears_
from distill_lr.ranks import RankPlan, layer_ranks, plan_ranks
from distill_lr.train import distill_layer

log = logging.getLogger("distill_lr")
ERROR_PROBE_SEQUENCES = 32  # calibration sequences on which the teacher-input error is reported


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device '{name}' asked for but no CUDA GPU is visible: use device=cpu or device=auto")
    return device


def resolve_dtype(name: str, auto: torch.dtype) -> torch.dtype:
    return auto if name == "auto" else getattr(torch, name)


@dataclass
class Streams:
    """The activation caches that move up the stack: calibration and evaluation, teacher and student."""

    x_teacher: torch.Tensor
    x_student: torch.Tensor
    eval_teacher: torch.Tensor | None
    eval_student: torch.Tensor | None
    kwargs: list[LayerKwargs] = field(default_factory=list)


def linear_shapes(layers: nn.ModuleList, prefix: str) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear and every MoE expert's projection of every decoder layer, read on the meta device."""
    shapes = {}
    for i, layer in enumerate(layers):
        linears = {name: (m.out_features, m.in_features) for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        shapes.update({f"{prefix}{i}.{name}": shape for name, shape in (linears | moe.expert_shapes(layer)).items()})
    return shapes


def collect_stats(
    layer: nn.Module, names: list[str], inputs: torch.Tensor, kwargs: LayerKwargs, batch_size: int
) -> tuple[dict[str, Any], moe.Routing]:
    """Moments of the named modules over the calibration inputs (for ``pca`` and ``whiten``), and the MoE routing.

    A linear gets one ``Moments`` of its inputs (one object for linears that read the same tensor, as
    q/k/v do), or of its outputs when it has fewer (``init.records_outputs``: the smaller moment holds
    all pca/whiten need); an expert projection one per expert, over the tokens routed to it.
    The layer runs only when there is something to record.
    """
    modules = dict(layer.named_modules())
    device = layer_device(layer)  # the statistics live where the layer computes, wherever the caches are
    linears = [n for n in names if isinstance(modules[n], nn.Linear)]
    stats: dict[str, Any] = {}
    shared = SharedInputs(layer)

    def record(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        module = modules[name]
        if records_outputs(module.out_features, module.in_features):
            product = y if module.bias is None else y - module.bias  # the moments of W x
            stats.setdefault(name, Moments.empty(module.out_features, device, of_outputs=True)).update(product)
            return
        first = shared.first_reader(name, x)
        if first is not None:  # q/k/v (gate/up) read one tensor: one set of moments, computed once
            stats[name] = stats[first]
            return
        stats.setdefault(name, Moments.empty(module.in_features, device)).update(x)

    hooks = [modules[n].register_forward_hook(lambda _m, args, out, n=n: record(n, args[0], out)) for n in linears]
    hooks.append(shared.hook)
    experts = [n for n in names if n not in linears]
    try:
        with moe.record_routing(layer, experts, device) as routing:
            if names or any(isinstance(m, LowRankExperts) for m in modules.values()):
                run_layer(layer, inputs, kwargs, batch_size)
    finally:
        for hook in hooks:
            hook.remove()
    return stats | routing.stats, routing


def factorize_layer_(layer: nn.Module, ranks: dict[str, int], init: str, stats: dict[str, Any]) -> None:
    """Swap the layer's chosen linears and expert projections (unfused by ``moe.unfuse_experts_``) for factors initialised by ``init``."""

    def factory(name: str, linear: nn.Linear) -> LowRankLinear:
        return LowRankLinear.from_linear(linear, ranks[name], init=init, stats=stats.get(name))

    replace_linears_(layer, factory, predicate=lambda name, _: name in ranks)
    moe.factorize_experts_(layer, ranks, init, stats)


def layer_state(layer: nn.Module, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {prefix + k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in layer.state_dict().items()}


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up once (``find_library`` runs a subprocess); None elsewhere (musl, macOS)."""
    libc = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def release_freed_host_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``).

    glibc keeps the memory of freed tensors in its heap, fragmented; without a trim per layer the
    peak resident memory creeps up with depth (+16% from 4 to 24 layers in ``scripts/bench_memory.py``).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def relative_error(pred: torch.Tensor, target: torch.Tensor, chunk: int = 8) -> float:
    """‖pred − target‖ / ‖target‖, a few sequences at a time: no float32 copy of a whole cache."""
    err = ref = 0.0
    for start in range(0, len(target), chunk):
        t, p = target[start : start + chunk].float(), pred[start : start + chunk].float()
        err += float((p - t).square().sum())
        ref += float(t.square().sum())
    return math.sqrt(err) / max(math.sqrt(ref), 1e-12)


def _timed(times: dict[str, float], key: str, start: float) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU work is asynchronous: time it when it is done
    now = time.perf_counter()
    times[key] = round(now - start, 3)
    return now


@dataclass(frozen=True)
class Run:
    """What every layer of one run shares: settings, where to compute, where to write."""

    cfg: CompressConfig
    device: torch.device
    dtype: torch.dtype  # compute
    save_dtype: torch.dtype
    out: Path
    manifest: ckpt.RunManifest
    cache: ActivationCache
    writer: ckpt.BackgroundWriter
    teacher: TeacherStore | None  # dense outputs kept across runs (``teacher_cache``)


def teacher_pass(run: Run, layer: nn.Module, index: int, stream: str, x: torch.Tensor, kwargs: LayerKwargs) -> torch.Tensor:
    """The dense layer's outputs on one stream, in a fresh cache tensor: read from the teacher store when it has them."""
    out = run.cache.empty_like(x)
    if run.teacher is not None and run.teacher.load_into(index, stream, out):
        return out
    run_layer(layer, x, kwargs, run.cfg.batch_size, out=out)
    if run.teacher is not None:  # read-only from here on: the writer may copy it while the next steps run
        run.writer.submit(partial(run.teacher.save, index, stream, out))
    return out


def compress_layer(
    index: int, layer: nn.Module, prefix: str, ranks: dict[str, int], s: Streams, run: Run, times: dict[str, float]
) -> dict[str, Any]:
    """Dense layer in, compressed layer written; advances every stream by one layer."""
    cfg, out, manifest = run.cfg, run.out, run.manifest
    t = time.perf_counter()
    kwargs = s.kwargs[index]
    done = manifest.done(index)
    cache = run.cache
    y = teacher_pass(run, layer, index, "calibration", s.x_teacher, kwargs)
    eval_y = None if s.eval_teacher is None else teacher_pass(run, layer, index, "evaluation", s.eval_teacher, kwargs)
    t = _timed(times, "teacher", t)
    if done is not None:
        apply_low_rank_(layer, ranks)
        state = load_file(out / done["file"])
        report = dict(done["report"], resumed=True)
        run.writer.drain()  # the teacher outputs being stored, if any: no stream is held past its layer
    else:
        moe.unfuse_experts_(layer, ranks)
        needs_stats = cfg.factor_init in ("pca", "whiten")
        stats, routing = collect_stats(layer, list(ranks) if needs_stats else [], s.x_student, kwargs, cfg.batch_size)
        report = {"layer": index, "linears": len(ranks)}
        if routing.tokens:
            report["experts"] = moe.drop_starved_(routing, cfg.ranks.min_expert_tokens, where=f"layer {index}")
        factorize_layer_(layer, ranks, cfg.factor_init, stats)
        del stats, routing
        t = _timed(times, "init", t)
        if cfg.method == "distill" and ranks:
            frozen = {path: r["starved"] for path, r in report.get("experts", {}).items()}
            seed = cfg.seed * 100_003 + index
            result = distill_layer(layer, s.x_teacher, s.x_student, y, kwargs, cfg.train, seed=seed, frozen_experts=frozen)
            report["train"] = result.summary()
            t = _timed(times, "train", t)
        state = layer_state(layer, prefix, run.save_dtype)
        times["save"] = round(run.writer.drain(), 3)  # the previous layer's write, overlapped with this layer until now
        run.writer.submit(partial(ckpt.save_tensors_atomic, state, out / ckpt.layer_file(index)))
        t = time.perf_counter()
    ckpt.install_state_(layer, state, prefix, run.device, run.dtype)  # as saved: fresh and resumed runs propagate the same student
    if "err_teacher_input" not in report:  # a diagnostic: a subset of the calibration set is enough
        probe = slice(0, ERROR_PROBE_SEQUENCES)
        report["err_teacher_input"] = relative_error(run_layer(layer, s.x_teacher[probe], kwargs, cfg.batch_size), y[probe])

    def advance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The student stream one layer up: in place once it has its own buffer (after layer 0 it aliases the teacher's)."""
        out = student if student is not teacher else cache.empty_like(student)
        return run_layer(layer, student, kwargs, cfg.batch_size, out=out)

    s.x_student = advance(s.x_student, s.x_teacher)
    report.setdefault("err_student_input", relative_error(s.x_student, y))
    if eval_y is not None:
        s.eval_student = advance(s.eval_student, s.eval_teacher)
        s.eval_teacher = eval_y
    s.x_teacher = y
    _timed(times, "student", t)
    if done is None:
        report["seconds"] = times
        run.writer.submit(partial(manifest.mark_done, index, ckpt.layer_file(index), copy.deepcopy(report)))
    return report


def plan_cache(
    cfg: CompressConfig, shape: tuple[int, int, int], layers: nn.ModuleList, device: torch.device, dtype: torch.dtype, out: Path
) -> ActivationCache:
    """Place the activation caches (``shape``: all sequences, seq_len, hidden) where ``cache`` says, or from the free memory."""
    need = cache_bytes(*shape, dtype)
    layer_bytes = max(sum(p.numel() for p in layer.parameters()) for layer in layers) * dtype.itemsize
    placement = choose_placement(cfg.cache, need, device, layer_bytes)
    log.info("activation caches: %.2f GiB at their peak, on %s", need / 2**30, placement)
    return ActivationCache(placement, device, Path(cfg.cache_dir).expanduser() if cfg.cache_dir else out, need)


def compress(cfg: CompressConfig) -> dict[str, Any]:
    """Run a whole compression; returns the report that is also written to ``<output>/report.json``."""
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    model_dir = resolve_model_dir(cfg.model)
    reader = ckpt.CheckpointReader(model_dir)
    out = Path(cfg.output).expanduser()
    if out.resolve() == model_dir.resolve():
        raise UserInputError(f"output folder {out} is the input folder: choose another output folder")
    dtype = resolve_dtype(cfg.dtype, torch.float32 if device.type == "cpu" else torch.bfloat16)
    save_dtype = resolve_dtype(cfg.save_dtype, reader.dtype)
    torch.manual_seed(cfg.seed)

    model = ckpt.build_skeleton(reader.config)
    prefix, layers = ckpt.decoder_layers(model)
    reader.check({k: v for k, v in model.state_dict().items() if k.startswith(prefix)})  # before any work, not at layer i
    plan = plan_ranks(linear_shapes(layers, prefix), cfg.ranks, name_prefix=prefix[: -len("layers.")])
    ranks = moe.module_ranks(plan.ranks, moe.fused_experts(model))  # one rank per projection of all experts
    log.info("%s", describe_plan(plan))
    tokenizer = AutoTokenizer.from_pretrained(Path(cfg.tokenizer).expanduser() if cfg.tokenizer else model_dir)
    documents = load_documents(cfg.data.source, cfg.data.text_column, cfg.data.split, cfg.data.subset)
    tokens = build_token_sets(
        documents,
        tokenizer,
        num_sequences=cfg.data.num_sequences,
        seq_len=cfg.data.seq_len,
        eval_sequences=cfg.data.eval_sequences if cfg.evaluate else 0,
        eval_fraction=cfg.data.eval_fraction,
        seed=cfg.seed,
        text_column=cfg.data.text_column,
        max_positions=getattr(reader.config, "max_position_embeddings", None),
    )
    params = param_summary(plan, reader)
    hidden = reader.config.get_text_config().hidden_size
    cache = plan_cache(
        cfg, (len(tokens.calibration) + len(tokens.evaluation), tokens.calibration.shape[1], hidden), layers, device, dtype, out
    )
    needs = Counter({out: params["model_after"] * save_dtype.itemsize - ckpt.folder_bytes(out)})  # a resumed run wrote some
    needs[cache.folder] += cache.disk_bytes  # the same folder by default
    model_fingerprint = reader.fingerprint()  # one stat per tensor: computed once for the manifest and the teacher cache
    teacher = None
    if cfg.teacher_cache:
        streams = {"calibration": tokens.calibration, "evaluation": tokens.evaluation}
        streams = {name: ids for name, ids in streams.items() if len(ids)}
        teacher = TeacherStore(Path(cfg.teacher_cache).expanduser(), teacher_key(model_fingerprint, device, dtype, cfg.batch_size), streams)
        needs[teacher.folder] += teacher.missing_bytes(len(layers), {k: (*v.shape, hidden) for k, v in streams.items()}, dtype)
    ckpt.check_disk_space(needs)
    manifest = ckpt.RunManifest(out, cfg.result_fingerprint(), model_fingerprint, cfg.overwrite)

    ckpt.load_non_layer_(model, reader, prefix, device, dtype)
    other = ckpt.non_layer_state(model, prefix)
    ckpt.save_tensors_atomic(
        {k: v.to(save_dtype) for k, v in reader.read([k for k in other if k in reader.tensors]).items()}, out / ckpt.OTHER_FILE
    )
    calib, evaluation = tokens.calibration.to(device), tokens.evaluation.to(device)
    x = embed(model, layers, calib, cfg.batch_size, out=cache.empty((*calib.shape, hidden), dtype))
    e = embed(model, layers, evaluation, cfg.batch_size, out=cache.empty((*evaluation.shape, hidden), dtype)) if len(evaluation) else None
    s = Streams(x, x, e, e, capture_inputs(model, layers, calib[:1])[1])

    reports = []
    bar = tqdm(range(len(layers)), desc="layers", unit="layer")
    run = Run(cfg, device, dtype, save_dtype, out, manifest, cache, ckpt.BackgroundWriter(), teacher)
    loader = ckpt.LayerLoader(reader, layers, prefix, read_ahead=cfg.read_ahead)
    try:
        for i in bar:
            t0 = time.perf_counter()
            layer = loader.load(i, device, dtype)  # waits for the read started during layer i-1, starts layer i+1's
            name = f"{prefix}{i}."
            times: dict[str, float] = {}
            _timed(times, "load", t0)
            report = compress_layer(i, layer, name, layer_ranks(ranks, name), s, run, times)
            layer.to("meta")
            release_freed_host_memory()
            reports.append(report)
            log.info("%s (%.1fs)", layer_line(report, len(layers)), time.perf_counter() - t0)
    finally:
        loader.close()
        run.writer.close()  # also on a crash: the layers finished so far reach the disk and the manifest

    files = [ckpt.OTHER_FILE] + [ckpt.layer_file(i) for i in range(len(layers))]
    ckpt.write_index(out, files)
    ckpt.copy_side_files(model_dir, out)
    ckpt.write_compressed_config(reader.config, out, ranks, save_dtype, {"method": cfg.method, "init": cfg.factor_init})
    manifest.mark_complete()

    result: dict[str, Any] = {
        "config": cfg.to_dict(),
        "input": str(model_dir),
        "output": str(out),
        "params": params,
        "activation_cache": {"placement": cache.placement, "gib": round(cache.total_bytes / 2**30, 3)},
        "layers": reports,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if teacher is not None:
        result["teacher_cache"] = {"folder": str(teacher.folder), "files_read": teacher.read, "files_written": teacher.written}
    if s.eval_teacher is not None:
        dense = head_nll(model, layers, s.eval_teacher, evaluation)
        student = head_nll(model, layers, s.eval_student, evaluation)
        result["perplexity"] = {
            "dense": _ppl(dense),
            "compressed": _ppl(student),
            "eval_tokens": dense[1],
            "eval_sequences": len(evaluation),
            "seq_len": cfg.data.seq_len,
        }
    if cfg.export_dense:
        dense_dir = out.with_name(out.name + "-dense")
        ckpt.export_dense(out, dense_dir)
        result["dense_export"] = str(dense_dir)
    ckpt.write_json_atomic(result, out / "report.json")
    return result


def teacher_key(model_fingerprint: str, device: torch.device, dtype: torch.dtype, batch_size: int) -> dict[str, Any]:
    """What the dense layers' outputs depend on besides the token ids: the weights and the kernels that compute them."""
    kernels = torch.cuda.get_device_name(device) if device.type == "cuda" else torch.backends.cpu.get_cpu_capability()
    return {
        "model": model_fingerprint,
        "dtype": str(dtype),
        "device": device.type,
        "kernels": kernels,
        "batch_size": batch_size,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _ppl(nll: tuple[float, int]) -> float:
    return float(torch.exp(torch.tensor(nll[0] / nll[1])))


def param_summary(plan: RankPlan, reader: ckpt.CheckpointReader) -> dict[str, Any]:
    total = sum(int(torch.Size(t.shape).numel()) for t in reader.tensors.values())
    removed = plan.dense_params - plan.kept_params
    return {
        "counted": "weights of the decoder layers' linear projections (no embeddings, norms, head or biases)",
        "decoder_linear_before": plan.dense_params,
        "decoder_linear_after": plan.kept_params,
        "removed_fraction": round(plan.removed_fraction, 4),
        "model_before": total,
        "model_after": total - removed,
        "compressed_linears": len(plan.ranks),
    }


def describe_plan(plan: RankPlan) -> str:
    return (
        f"rank plan: {len(plan.ranks)} of {len(plan.shapes)} decoder linears low-rank; decoder-linear weights "
        f"{plan.dense_params:,} -> {plan.kept_params:,} ({plan.removed_fraction:.1%} removed; embeddings, norms and head not counted)"
    )


def layer_line(report: dict[str, Any], n_layers: int) -> str:
    parts = [f"layer {report['layer'] + 1}/{n_layers}", f"{report['linears']} low-rank"]
    if "train" in report:
        tr = report["train"]
        parts.append(
            f"loss {tr['init_loss']:.4f} -> {tr['final_loss']:.4f} (held-out {tr['best_holdout']:.4f}, cos {tr['holdout_cos']:.4f})"
        )
    parts.append(f"rel.err teacher-in {report['err_teacher_input']:.4f} student-in {report['err_student_input']:.4f}")
    starved = {path: r["starved"] for path, r in report.get("experts", {}).items() if r["starved"]}
    if starved:
        parts.append("starved experts " + " ".join(f"{path} {experts}" for path, experts in starved.items()))
    if "seconds" in report:
        parts.append(" ".join(f"{k} {v:.1f}s" for k, v in report["seconds"].items()))
    if report.get("resumed"):
        parts.append("(resumed)")
    return " | ".join(parts)
