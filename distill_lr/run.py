"""A compression run before its first layer: the input, the output folder, the text, the rank plan and the caches
checked and set up (``prepare``), then the streams embedded; ``Run`` is what every layer of the run shares.

Every check comes before the output folder's first write: a refused run leaves the folder as it was.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from distill_lr import distributed, moe
from distill_lr.builtin import resolve_model_dir
from distill_lr.cache import ActivationCache, TeacherStore, plan_cache
from distill_lr.checkpoint import compressed, export, files
from distill_lr.checkpoint.manifest import RunManifest
from distill_lr.checkpoint.reader import CheckpointReader, load_non_layer_
from distill_lr.data import TokenSets
from distill_lr.errors import check
from distill_lr.layerwise import embed
from distill_lr.methods import get_method
from distill_lr.methods.base import Method
from distill_lr.plan import plan_layers
from distill_lr.ranks import needs_prepass
from distill_lr.report import ParamSummary, RunReport
from distill_lr.runtime import resolve_device, resolve_dtype
from distill_lr.schema import CompressConfig
from distill_lr.stages import e2e
from distill_lr.streams import Stream, open_streams, tokenize

log = logging.getLogger("distill_lr")


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
    cache: ActivationCache
    manifest: RunManifest
    teacher: TeacherStore | None  # dense outputs kept across runs (``teacher_cache``)
    report: RunReport
    streams: list[Stream]  # the calibration text first, then the held-out text and each task's rows
    writer: files.BackgroundWriter = field(default_factory=files.BackgroundWriter)
    start: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class Opened:
    """The device, the method, the input checkpoint and the output folder, checked before anything is written."""

    device: torch.device
    method: Method
    reader: CheckpointReader
    out: Path


def open_input(cfg: CompressConfig) -> Opened:
    """Resolve the device, the method and the input; refuse an output path that cannot be a separate folder."""
    device = process_device(resolve_device(cfg.device), cfg.device)
    method = get_method(cfg)
    check_processes(cfg, method)
    reader = CheckpointReader(resolve_model_dir(cfg.model))
    out = Path(cfg.output).expanduser()
    apart = {"the input folder": reader.folder, "the teacher cache": cfg.teacher_cache, "the cache folder": cfg.cache_dir}
    files.check_apart(out, "output folder", {what: None if p is None else Path(p) for what, p in apart.items()})
    if cfg.cache_dir:
        files.check_folder_path(Path(cfg.cache_dir).expanduser(), "cache_dir")
    if cfg.export_dense:  # written at the end: refused now rather than after the run
        export.check_export_target(dense_export_dir(out), out, "dense export folder")
    return Opened(device, method, reader, out)


def process_device(device: torch.device, asked: str) -> torch.device:
    """Each process of a launch on the GPU of its ``LOCAL_RANK``; a single process where the settings say."""
    g = distributed.group()
    if g.world == 1 or device.type != "cuda":
        return device
    check(
        asked in ("auto", "cuda"),
        f"device={asked} with {g.world} processes: use device=cuda (each process takes the GPU of its LOCAL_RANK; "
        "CUDA_VISIBLE_DEVICES picks which GPUs)",
    )
    return torch.device("cuda", g.local_rank)


def check_processes(cfg: CompressConfig, method: Method) -> None:
    """Refuse, with several processes, what does not run spread over them yet (before anything is read or written)."""
    g = distributed.group()
    if g.world == 1:
        return
    fix = f"launch one process (without torchrun or accelerate launch) to run it; {g.world} processes run"
    serial = [s.name for s in [*method.steps, *method.stages] if not s.data_parallel]
    check(not serial, f"method '{cfg.method}' has steps or stages that do not run in several processes yet ({', '.join(serial)}): {fix}")
    check(
        not (cfg.e2e.enabled and cfg.e2e.optimizer == "adafactor"),
        f"e2e.optimizer=adafactor does not run sharded over several processes yet: set e2e.optimizer=adamw (FSDP splits it) or {fix}",
    )
    check(not (cfg.evaluate and cfg.eval.tasks), f"eval.tasks are not scored in several processes yet: set eval.tasks=[] or {fix}")
    check(cfg.teacher_cache is None, f"teacher_cache is not kept by several processes yet: set teacher_cache=null or {fix}")


def check_shards(tokens: TokenSets, cfg: CompressConfig) -> None:
    """Every process gets at least one sequence of each text and of the pre-pass (a process without one would have nothing to run)."""
    world = distributed.group().world
    texts = [(tokens.calibration, "calibration", "data.num_sequences"), (tokens.evaluation, "held-out", "data.eval_sequences")]
    if needs_prepass(cfg.ranks):
        texts.append((tokens.calibration[: cfg.ranks.allocation_sequences], "pre-pass", "ranks.allocation_sequences"))
    for ids, what, setting in texts:
        check(
            len(ids) >= world or (what == "held-out" and len(ids) == 0),
            f"{len(ids)} {what} sequences cannot be split over {world} processes: raise {setting} to at least {world}, or launch fewer",
        )


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
    group = distributed.group()
    # reads and checks; writes nothing yet (and never outside process 0)
    manifest = RunManifest(out, cfg.result_fingerprint(), fingerprint, cfg.overwrite, writes=group.main)
    e2e.check_folder(manifest, cfg)
    tokens, tasks = tokenize(cfg, reader)
    check_shards(tokens, cfg)
    manifest.check_text(hashlib.sha256(tokens.calibration.numpy().tobytes()).hexdigest())  # what the layer files are trained on
    load_non_layer_(model, reader, prefix, device, dtype)
    streams = open_streams(tokens, tasks, model, layers, device)
    plan, allocated = plan_layers(cfg, method, reader, model, (prefix, layers), tokens, (device, dtype), manifest.plan)
    plan = replace(plan, ranks=group.broadcast_object(plan.ranks))  # process 0's, should a pre-pass differ in the last bit
    ranks = moe.module_ranks(plan.ranks, moe.fused_experts(model))  # one rank per projection of all experts
    added = method.added_params(cfg, layers) if method.added_params is not None else 0
    params = ParamSummary.of(plan, sum(int(torch.Size(t.shape).numel()) for t in reader.tensors.values()), added)
    hidden = reader.config.get_text_config().hidden_size
    cache_folder = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else out
    cache = plan_cache(cfg.cache, cache_folder, sum(s.ids.numel() for s in streams), hidden, layers, (device, dtype))
    writes = params.model_after * save_dtype.itemsize + (e2e.state_bytes(params.trainable, cfg.e2e) if cfg.e2e.enabled else 0)
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
        cache=cache,
        manifest=manifest,
        teacher=teacher,
        report=report,
        streams=streams,
        writer=files.BackgroundWriter(discard=not group.main),
        start=start,
    )
    for step in method.steps:
        step.check(cfg, layers)
    for stage in method.stages:
        stage.check(run)
    group.barrier()  # every process has read the folder as it was
    manifest.start(plan.ranks)  # the first write into the output folder, once every check has passed
    embed_streams(run)
    return run


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


def embed_streams(run: Run) -> None:
    """Write the non-layer weights (materialised by ``prepare``), then embed every stream: the layer-0 inputs of both stacks."""
    if distributed.group().main:
        compressed.write_non_layer(run.reader, run.model, run.prefix, run.out, run.save_dtype, run.manifest)
    hidden = run.reader.config.get_text_config().hidden_size
    for s in run.streams:
        x = run.cache.empty((*s.ids.shape, hidden), run.dtype)
        s.teacher = s.student = embed(run.model, run.layers, s.ids, run.cfg.batch_size, out=x)
