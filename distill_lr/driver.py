"""The bottom-up driver: compress a checkpoint one decoder layer at a time.

``compress`` reads as ``prepare`` -> for each layer ``compress_layer`` -> ``finish``. For layer i:
load its dense weights -> teacher outputs Y = layer(X_t) -> the method's steps build (and train) the
student -> write it -> X_t <- Y, X_s <- student(X_s). Only one layer's weights are ever materialised.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import hashlib
import logging
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedModel

from distill_lr import moe, plots, prepass
from distill_lr.allocation import kept_fractions
from distill_lr.builtin import resolve_model_dir
from distill_lr.cache import ActivationCache, TeacherStore, cache_bytes, choose_placement
from distill_lr.checkpoint import compressed, files
from distill_lr.checkpoint.layout import TOKENIZER_FILES, layer_file
from distill_lr.checkpoint.manifest import RunManifest
from distill_lr.checkpoint.reader import CheckpointReader, LayerLoader, install_state_, load_non_layer_
from distill_lr.data import TokenSets, bos_prefix, build_token_sets, held_out_documents, load_documents
from distill_lr.errors import UserInputError, check, first_line
from distill_lr.layerwise import LayerKwargs, capture_inputs, embed, head_nll, head_span_logprobs, relative_error, run_layer
from distill_lr.methods import e2e, get_method
from distill_lr.methods.base import LayerWork, Method
from distill_lr.ranks import RankPlan, free_matrices, layer_index, layer_ranks, linear_shapes, needs_prepass, plan_ranks
from distill_lr.report import LayerReport, ParamSummary, Perplexity, RunReport, describe_kept, describe_plan
from distill_lr.schema import CompressConfig
from distill_lr.tasks import EncodedTask, encode, load_tasks

log = logging.getLogger("distill_lr")
ERROR_PROBE_SEQUENCES = 32  # calibration sequences on which the teacher-input error is reported
RUN_FACTS = ("prepass_seconds", "reused")  # of this invocation: in report.json, never in config.json (a function of the settings)


@dataclass
class Streams:
    """The activation caches that move up the stack: calibration and evaluation, teacher and student."""

    x_teacher: torch.Tensor
    x_student: torch.Tensor
    eval_teacher: torch.Tensor | None
    eval_student: torch.Tensor | None
    kwargs: list[LayerKwargs] = field(default_factory=list)
    tasks: list[TaskStream] = field(default_factory=list)


@dataclass
class TaskStream:
    """One task's (example, choice) rows on their way up the dense and the compressed stack."""

    task: EncodedTask
    ids: torch.Tensor
    teacher: torch.Tensor
    student: torch.Tensor
    kwargs: list[LayerKwargs]  # for the rows' length


@dataclass
class Run:
    """What every layer of one run shares: settings, the model skeleton, the streams, where to write."""

    cfg: CompressConfig
    method: Method
    device: torch.device
    dtype: torch.dtype  # compute
    save_dtype: torch.dtype
    out: Path
    reader: CheckpointReader
    model: PreTrainedModel  # on meta but for the embeddings, final norm and head
    prefix: str  # of the decoder layers' names, "model.layers."
    layers: nn.ModuleList
    ranks: dict[str, int]  # full module name -> rank, one per projection of fused experts
    tokens: TokenSets
    tasks: list[EncodedTask]
    cache: ActivationCache
    manifest: RunManifest
    teacher: TeacherStore | None  # dense outputs kept across runs (``teacher_cache``)
    report: RunReport
    streams: Streams | None = None
    writer: files.BackgroundWriter = field(default_factory=files.BackgroundWriter)
    start: float = field(default_factory=time.perf_counter)


def compress(cfg: CompressConfig) -> RunReport:
    """Run a whole compression; its report is also written to ``<output>/report.json``."""
    opened = open_input(cfg)
    with files.claimed_folder(opened.out):  # one run per folder; a refused run leaves it as it was
        run = prepare(cfg, opened)
        try:
            compress_layers(run)
            return finish(run)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise disk_full(run, err) from err
            raise


def compress_layers(run: Run) -> None:
    """The loop: each decoder layer from the bottom, its weights read while the layer below computes."""
    loader = LayerLoader(run.reader, run.layers, run.prefix, read_ahead=run.cfg.read_ahead)
    try:
        for i in tqdm(range(len(run.layers)), desc="layers", unit="layer"):
            t0 = time.perf_counter()
            layer = loader.load(i, run.device, run.dtype)  # waits for the read started during layer i-1, starts layer i+1's
            times = {"load": _elapsed(t0)}
            report = compress_layer(run, i, layer, times)
            layer.to("meta")
            release_freed_host_memory()
            run.report.layers.append(report)
            log.info("%s (%.1fs)", report.line(len(run.layers)), time.perf_counter() - t0)
    finally:
        loader.close()
        run.writer.close()  # also on a crash: the layers finished so far reach the disk and the manifest


@dataclass(frozen=True)
class Opened:
    """The device, the method, the input checkpoint and the output folder, checked before anything is written."""

    device: torch.device
    method: Method
    reader: CheckpointReader
    out: Path


def open_input(cfg: CompressConfig) -> Opened:
    """Resolve the device, the method and the input; refuse an output path that cannot be a separate folder."""
    device = resolve_device(cfg.device)
    method = get_method(cfg)
    reader = CheckpointReader(resolve_model_dir(cfg.model))
    out = Path(cfg.output).expanduser()
    apart = {"the input folder": reader.folder, "the teacher cache": cfg.teacher_cache, "the cache folder": cfg.cache_dir}
    files.check_apart(out, "output folder", {what: None if p is None else Path(p) for what, p in apart.items()})
    if cfg.cache_dir:
        files.check_folder_path(Path(cfg.cache_dir).expanduser(), "cache_dir")
    if cfg.export_dense:  # written at the end: refused now rather than after the run
        compressed.check_export_target(dense_export_dir(out), out)
    return Opened(device, method, reader, out)


def dense_export_dir(out: Path) -> Path:
    """Where ``export_dense=true`` writes: beside the output folder, ``<output>-dense``."""
    return out.with_name(out.name + "-dense")


def prepare(cfg: CompressConfig, opened: Opened) -> Run:
    """Everything before the first layer: checks of input and output, text, rank plan, caches, then the folder's first writes."""
    start = time.perf_counter()
    device, method, reader, out = opened.device, opened.method, opened.reader, opened.out
    dtype = resolve_dtype(cfg.dtype, torch.float32 if device.type == "cpu" else torch.bfloat16)
    save_dtype = resolve_dtype(cfg.save_dtype, reader.dtype)
    torch.manual_seed(cfg.seed)
    model, prefix, layers = reader.skeleton()  # checked against the tensors before any work, not at layer i
    fingerprint = reader.fingerprint()  # one stat per tensor: computed once for the manifest and the teacher cache
    manifest = RunManifest(out, cfg.result_fingerprint(), fingerprint, cfg.overwrite)  # reads and checks; writes nothing yet
    e2e.check_folder(manifest, cfg)
    tokens, tasks = tokenize(cfg, reader.folder, reader)
    manifest.check_text(hashlib.sha256(tokens.calibration.numpy().tobytes()).hexdigest())  # what the layer files are trained on
    load_non_layer_(model, reader, prefix, device, dtype)
    plan, allocated = plan_layers(cfg, method, reader, model, (prefix, layers), tokens, (device, dtype), manifest.plan)
    ranks = moe.module_ranks(plan.ranks, moe.fused_experts(model))  # one rank per projection of all experts
    params = ParamSummary.of(plan, sum(int(torch.Size(t.shape).numel()) for t in reader.tensors.values()))
    rows = [tokens.calibration, tokens.evaluation, *(task.input_ids for task in tasks)]
    cache = plan_cache(cfg, sum(ids.numel() for ids in rows), reader.config.get_text_config().hidden_size, layers, (device, dtype), out)
    writes = params.model_after * save_dtype.itemsize + (e2e.state_bytes(params.factor_params) if cfg.e2e.enabled else 0)
    teacher = open_teacher(cfg, reader, out, cache, writes, tokens, (device, dtype), fingerprint)
    placement = {"placement": cache.placement, "gib": round(cache.total_bytes / 2**30, 3)}
    report = RunReport(cfg.to_dict(), str(reader.folder), str(out), params, placement, allocation=allocated)
    run = Run(
        cfg=cfg,
        method=method,
        device=device,
        dtype=dtype,
        save_dtype=save_dtype,
        out=out,
        reader=reader,
        model=model,
        prefix=prefix,
        layers=layers,
        ranks=ranks,
        tokens=tokens,
        tasks=tasks,
        cache=cache,
        manifest=manifest,
        teacher=teacher,
        report=report,
        start=start,
    )
    for step in method.steps:
        step.check(cfg, layers)
    for stage in method.stages:
        stage.check(run)
    manifest.start(plan.ranks)  # the first write into the output folder, once every check has passed
    run.streams = embed_streams(run)
    return run


def plan_layers(
    cfg: CompressConfig,
    method: Method,
    reader: CheckpointReader,
    model: PreTrainedModel,
    stack: tuple[str, nn.ModuleList],
    tokens: TokenSets,
    compute: tuple[torch.device, torch.dtype],
    saved: dict[str, int] | None,
) -> tuple[RankPlan, dict[str, Any]]:
    """The rank plan, after the loss-aware pre-pass when the allocation needs one (``saved``: the plan a resumed run recorded), and
    its record (``RUN_FACTS`` only in report.json)."""
    (prefix, layers), name_prefix = stack, stack[0][: -len("layers.")]
    shapes = linear_shapes(layers, prefix)
    record: dict[str, Any] = {"allocation": cfg.ranks.allocation if cfg.ranks.target is not None else "rules"}
    if not method.factorizes:
        plan = RankPlan(ranks={}, shapes=shapes)
        record["allocation"] = f"none (method {method.name})"
    elif needs_prepass(cfg.ranks):
        ids = tokens.calibration[: cfg.ranks.allocation_sequences]
        record["prepass_sequences"] = len(ids)
        if saved is not None:
            plan = RankPlan(ranks=saved, shapes=shapes)
            record["reused"] = True
        else:
            plan, record["prepass_seconds"] = measured_plan(cfg, (model, reader, prefix, layers), shapes, ids, compute)
    else:
        plan = plan_ranks(shapes, cfg.ranks, name_prefix)
    record["kept"] = kept_fractions(shapes, plan.ranks, {n: layer_index(n[len(name_prefix) :]) for n in shapes})
    log.info("%s\n%s", describe_plan(plan), describe_kept(record["kept"]))
    return plan, record


def measured_plan(
    cfg: CompressConfig,
    source: tuple[PreTrainedModel, CheckpointReader, str, nn.ModuleList],
    shapes: dict[str, tuple[int, int]],
    ids: torch.Tensor,
    compute: tuple[torch.device, torch.dtype],
) -> tuple[RankPlan, float]:
    """The loss-aware plan from the pre-pass's measurements on ``ids``, and the pre-pass's seconds."""
    model, reader, prefix, layers = source
    if len(ids) < cfg.ranks.allocation_sequences:
        warnings.warn(
            f"ranks.allocation_sequences={cfg.ranks.allocation_sequences} is more than the {len(ids)} calibration sequences "
            f"(data.num_sequences): the pre-pass measures on all {len(ids)}",
            stacklevel=3,
        )
    name_prefix = prefix[: -len("layers.")]
    free = free_matrices(shapes, cfg.ranks, name_prefix)
    overflow = partial(overflow_message, compute[1])
    sensitivity = prepass.measure(model, reader, prefix, layers, free, ids, compute, cfg.batch_size, overflow)
    return plan_ranks(shapes, cfg.ranks, name_prefix, sensitivity), sensitivity.seconds


def tokenize(cfg: CompressConfig, model_dir: Path, reader: CheckpointReader) -> tuple[TokenSets, list[EncodedTask]]:
    """The calibration and held-out token windows of the configured text, and the tasks' token rows."""
    folder = Path(cfg.tokenizer).expanduser() if cfg.tokenizer else model_dir
    if not any((folder / name).is_file() for name in TOKENIZER_FILES[:7]):
        raise UserInputError(
            f"{folder} has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...): "
            "copy the model's tokenizer files there, or give tokenizer=<folder with them>"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as err:
        problem = f"the tokenizer in {folder} cannot be loaded ({first_line(err)})"
        raise UserInputError(f"{problem}: fix its files or give tokenizer=<folder>") from None
    documents = load_documents(cfg.data.source, cfg.data.text_column, cfg.data.split, cfg.data.subset)
    max_positions = getattr(reader.config, "max_position_embeddings", None)
    tokens = build_token_sets(
        documents,
        tokenizer,
        num_sequences=cfg.data.num_sequences,
        seq_len=cfg.data.seq_len,
        eval_sequences=cfg.data.eval_sequences if cfg.evaluate else 0,
        eval_fraction=cfg.data.eval_fraction,
        seed=cfg.seed,
        text_column=cfg.data.text_column,
        max_positions=max_positions,
    )
    vocab = reader.config.get_text_config().vocab_size
    top = max(int(ids.max()) for ids in (tokens.calibration, tokens.evaluation) if ids.numel())
    check(
        top < vocab,
        f"the tokenizer in {folder} gives token id {top} but the model's vocabulary has {vocab} entries (vocab_size in "
        "config.json): give the model's own tokenizer with tokenizer=<folder>",
    )
    if not (cfg.evaluate and cfg.eval.tasks):
        return tokens, []
    held_out = held_out_documents(len(documents), cfg.data.eval_fraction, cfg.seed)
    tasks = load_tasks(cfg.eval.tasks, documents, held_out, cfg.eval.task_examples, cfg.seed)
    return tokens, [encode(task, tokenizer, bos_prefix(tokenizer), max_positions) for task in tasks]


def open_teacher(
    cfg: CompressConfig,
    reader: CheckpointReader,
    out: Path,
    cache: ActivationCache,
    checkpoint_bytes: int,
    tokens: TokenSets,
    compute: tuple[torch.device, torch.dtype],
    model_fingerprint: str,
) -> TeacherStore | None:
    """The teacher store (``teacher_cache``), once the disk is known to hold what the run will still write."""
    needs = Counter({out: checkpoint_bytes - files.folder_bytes(out)})  # a resumed run wrote some
    needs[cache.folder] += cache.disk_bytes  # the same folder by default
    teacher = None
    if cfg.teacher_cache:
        streams = {name: ids for name, ids in {"calibration": tokens.calibration, "evaluation": tokens.evaluation}.items() if len(ids)}
        key = TeacherStore.key(model_fingerprint, *compute, cfg.batch_size)
        teacher = TeacherStore(Path(cfg.teacher_cache).expanduser(), key, streams)
        hidden = reader.config.get_text_config().hidden_size
        layers = reader.config.get_text_config().num_hidden_layers
        needs[teacher.folder] += teacher.missing_bytes(layers, {k: (*v.shape, hidden) for k, v in streams.items()}, compute[1])
    files.check_disk_space(needs)
    return teacher


def embed_streams(run: Run) -> Streams:
    """Write the non-layer weights (materialised by ``prepare``), then embed the calibration and evaluation tokens: the layer-0 inputs."""
    cfg, model, layers, hidden = run.cfg, run.model, run.layers, run.reader.config.get_text_config().hidden_size
    compressed.write_non_layer(run.reader, model, run.prefix, run.out, run.save_dtype, run.manifest)
    calib, evaluation = run.tokens.calibration.to(run.device), run.tokens.evaluation.to(run.device)
    x = embed(model, layers, calib, cfg.batch_size, out=run.cache.empty((*calib.shape, hidden), run.dtype))
    e = None
    if len(evaluation):
        e = embed(model, layers, evaluation, cfg.batch_size, out=run.cache.empty((*evaluation.shape, hidden), run.dtype))
    tasks = []
    for task in run.tasks:
        ids = task.input_ids.to(run.device)
        t = embed(model, layers, ids, cfg.batch_size, out=run.cache.empty((*ids.shape, hidden), run.dtype))
        tasks.append(TaskStream(task, ids, t, t, capture_inputs(model, layers, ids[:1])[1]))
    return Streams(x, x, e, e, capture_inputs(model, layers, calib[:1])[1], tasks)


def compress_layer(run: Run, index: int, layer: nn.Module, times: dict[str, float]) -> LayerReport:
    """Dense layer in, compressed layer written (or read back when a resumed run has it); advances every stream by one layer."""
    s, name = run.streams, f"{run.prefix}{index}."
    assert s is not None
    ranks = layer_ranks(run.ranks, name)
    t = time.perf_counter()
    y = teacher_pass(run, layer, index, "calibration", s.x_teacher)
    eval_y = None if s.eval_teacher is None else teacher_pass(run, layer, index, "evaluation", s.eval_teacher)
    overflow = partial(overflow_message, run.dtype, index, "dense")
    task_y = [run_layer(layer, ts.teacher, ts.kwargs[index], run.cfg.batch_size, overflow=overflow) for ts in s.tasks]
    times["teacher"] = _elapsed(t)
    done = run.manifest.done(index)
    if done is not None:
        report, state = resumed_layer(run, layer, ranks, done)
    else:
        report, state = fresh_layer(run, index, layer, ranks, y, times)
    install_state_(layer, state, name, run.device, run.dtype)  # as saved: fresh and resumed runs propagate the same student
    t = time.perf_counter()
    kwargs = s.kwargs[index]
    if report.err_teacher_input is None:  # a diagnostic: a subset of the calibration set is enough
        probe = slice(0, ERROR_PROBE_SEQUENCES)
        report.err_teacher_input = relative_error(run_layer(layer, s.x_teacher[probe], kwargs, run.cfg.batch_size), y[probe])
    s.x_student = advance(run, layer, index, s.x_student, s.x_teacher)
    if report.err_student_input is None:
        report.err_student_input = relative_error(s.x_student, y)
    if eval_y is not None:
        s.eval_student = advance(run, layer, index, s.eval_student, s.eval_teacher)
        s.eval_teacher = eval_y
    for ts, ty in zip(s.tasks, task_y, strict=True):
        ts.student, ts.teacher = advance(run, layer, index, ts.student, ts.teacher, ts.kwargs[index]), ty
    s.x_teacher = y
    times["student"] = _elapsed(t)
    if done is None:
        report.seconds = times
        run.writer.submit(partial(run.manifest.mark_done, index, report.to_record()))
    return report


def fresh_layer(
    run: Run, index: int, layer: nn.Module, ranks: dict[str, int], y: torch.Tensor, times: dict[str, float]
) -> tuple[LayerReport, dict[str, torch.Tensor]]:
    """Run the method's steps on the layer and queue its file; the report so far and the state as it will be saved."""
    s = run.streams
    assert s is not None
    report = LayerReport(layer=index, linears=len(ranks))
    work = LayerWork(index, layer, ranks, s.x_teacher, s.x_student, y, s.kwargs[index], run.cfg, report, run.save_dtype)
    for step in run.method.steps:
        t = time.perf_counter()
        step.run(work)
        times[step.name] = _elapsed(t)
    report.linear_bytes = compressed.linear_bytes(layer, run.save_dtype)
    state = compressed.layer_state(layer, f"{run.prefix}{index}.", run.save_dtype)
    times["save"] = round(run.writer.drain(), 3)  # the previous layer's write, overlapped with this layer until now
    run.writer.submit(partial(run.manifest.save_layer, index, layer_file(index), state))
    return report, state


def resumed_layer(run: Run, layer: nn.Module, ranks: dict[str, int], done: dict[str, Any]) -> tuple[LayerReport, dict[str, torch.Tensor]]:
    """The layer as an earlier run of the same config wrote it: its report and its saved state."""
    run.method.prepare_resumed(layer, ranks, LayerReport.from_dict(done["report"]))
    state = load_file(run.out / done["file"])
    run.writer.drain()  # the teacher outputs being stored, if any: no stream is held past its layer
    return replace(LayerReport.from_dict(done["report"]), resumed=True), state


def teacher_pass(run: Run, layer: nn.Module, index: int, stream: str, x: torch.Tensor) -> torch.Tensor:
    """The dense layer's outputs on one stream, in a fresh cache tensor: read from the teacher store when it has them."""
    assert run.streams is not None
    out = run.cache.empty_like(x)
    if run.teacher is not None and run.teacher.load_into(index, stream, out):
        return out
    overflow = partial(overflow_message, run.dtype, index, "dense")
    run_layer(layer, x, run.streams.kwargs[index], run.cfg.batch_size, out=out, overflow=overflow)
    if run.teacher is not None:  # read-only from here on: the writer may copy it while the next steps run
        run.writer.submit(partial(run.teacher.save, index, stream, out))
    return out


def advance(
    run: Run, layer: nn.Module, index: int, student: torch.Tensor, teacher: torch.Tensor, kwargs: LayerKwargs | None = None
) -> torch.Tensor:
    """A student stream one layer up: in place once it has its own buffer (after layer 0 it aliases the teacher's)."""
    assert run.streams is not None
    out = student if student is not teacher else run.cache.empty_like(student)
    overflow = partial(overflow_message, run.dtype, index, "compressed")
    kwargs = run.streams.kwargs[index] if kwargs is None else kwargs
    return run_layer(layer, student, kwargs, run.cfg.batch_size, out=out, overflow=overflow)


def finish(run: Run) -> RunReport:
    """After the last layer: the method's stages, then index, side files and config (the folder is complete), evaluation, report."""
    cfg, out, report, s = run.cfg, run.out, run.report, run.streams
    assert s is not None
    for stage in run.method.stages:
        stage.run(run)
    allocation = {k: v for k, v in (report.allocation or {}).items() if k not in RUN_FACTS}
    info = {**run.method.info, "allocation": allocation, **compressed.folder_structure(report.layers, run.prefix)}
    saved = [r.linear_bytes for r in report.layers]
    if all(b is not None for b in saved):  # layers written before the field was recorded have none
        dense = report.params.decoder_linear_before * run.save_dtype.itemsize
        report.size = {"bytes": sum(saved), "dense_bytes": dense, "ratio": round(sum(saved) / dense, 4), "dtype": str(run.save_dtype)}
    compressed.complete_folder(out, run.reader, len(run.layers), run.ranks, run.save_dtype, info, run.manifest)
    report.seconds = round(time.perf_counter() - run.start, 1)
    if run.teacher is not None:
        report.teacher_cache = {"folder": str(run.teacher.folder), "files_read": run.teacher.read, "files_written": run.teacher.written}
    if s.eval_teacher is not None:
        evaluation = run.tokens.evaluation.to(run.device)
        dense = head_nll(run.model, run.layers, s.eval_teacher, evaluation)
        student = head_nll(run.model, run.layers, s.eval_student, evaluation)
        report.perplexity = Perplexity.of(dense, student, len(evaluation), cfg.data.seq_len)
    for ts in s.tasks:
        scores = [head_span_logprobs(run.model, run.layers, h, ts.ids, ts.task.spans) for h in (ts.teacher, ts.student)]
        report.tasks.append({"task": ts.task.task.name, "dense": ts.task.score(scores[0]), "compressed": ts.task.score(scores[1])})
    if cfg.export_dense:
        compressed.export_dense(out, dense_export_dir(out))
        report.dense_export = str(dense_export_dir(out))
    record = report.to_dict()
    files.write_json_atomic(record, out / "report.json")
    if cfg.plot:
        plots.draw_run(record, out / plots.REPORT_PNG)  # a picture of report.json
    return report


def overflow_message(compute_dtype: torch.dtype, index: int, which: str) -> str:
    """What to say when decoder layer ``index``'s dense or compressed outputs are not finite, for the dtype in use."""
    dtype = str(compute_dtype).removeprefix("torch.")
    if compute_dtype == torch.float32:
        advice = "that is not a rounding overflow: check the checkpoint's weights and the calibration text"
    else:
        advice = f"the layer overflows {dtype}: run with dtype=float32"
    if which == "compressed":
        advice += f", or keep the layer dense with the rule '\"layers.{index}.**\": skip'"
    return f"decoder layer {index}'s {which} outputs hold inf or NaN in {dtype}: {advice}"


def disk_full(run: Run, err: OSError) -> UserInputError:
    """The one-line error for a disk that filled up mid-run: how much the checkpoint still needs, and that it resumes."""
    still = run.report.params.model_after * run.save_dtype.itemsize - files.folder_bytes(run.out)
    done = len(run.manifest.data["layers"])
    return UserInputError(
        f"the disk filled up while writing {err.filename or run.out} ({err.strerror}): the checkpoint still needs about "
        f"{files.human_bytes(max(still, 0))} at {run.out}; free that much and run the same command again: it resumes "
        f"after the {done} finished layer(s)"
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserInputError(f"device '{name}' is not a torch device: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device '{name}' asked for but no CUDA GPU is visible: use device=cpu or device=auto")
    return device


def resolve_dtype(name: str, auto: torch.dtype) -> torch.dtype:
    return auto if name == "auto" else getattr(torch, name)


def plan_cache(
    cfg: CompressConfig, tokens: int, hidden: int, layers: nn.ModuleList, compute: tuple[torch.device, torch.dtype], out: Path
) -> ActivationCache:
    """Place the activation caches (``tokens`` of all streams: calibration, evaluation, tasks) where ``cache`` says, or by free memory."""
    device, dtype = compute
    need = cache_bytes(tokens, 1, hidden, dtype)
    layer_bytes = max(sum(p.numel() for p in layer.parameters()) for layer in layers) * dtype.itemsize
    placement = choose_placement(cfg.cache, need, device, layer_bytes)
    log.info("activation caches: %.2f GiB at their peak, on %s", need / 2**30, placement)
    return ActivationCache(placement, device, Path(cfg.cache_dir).expanduser() if cfg.cache_dir else out, need)


def _elapsed(start: float) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU work is asynchronous: time it when it is done
    return round(time.perf_counter() - start, 3)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up once (``find_library`` runs a subprocess); None elsewhere (musl, macOS)."""
    libc = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def release_freed_host_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``).

    glibc keeps the memory of freed tensors in its heap, fragmented; without a trim per layer the
    peak resident memory creeps up with depth (``benchmarks/bench_memory.py`` measures it).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
