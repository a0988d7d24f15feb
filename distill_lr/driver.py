"""The bottom-up driver: compress a checkpoint one decoder layer at a time.

``compress`` reads as ``prepare`` -> for each layer ``compress_layer`` -> ``finish``. For layer i:
load its dense weights -> teacher outputs Y = layer(X_t) -> the method's steps build (and train) the
student -> write it -> X_t <- Y, X_s <- student(X_s). Only one layer's weights are ever materialised.
"""

from __future__ import annotations

import errno
import logging
import time
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from distill_lr import distributed, plots
from distill_lr.checkpoint import compressed, export, files
from distill_lr.checkpoint.layout import layer_file
from distill_lr.checkpoint.reader import LayerLoader, install_state_
from distill_lr.errors import UserInputError
from distill_lr.layerwise import error_sums, ratio, run_layer
from distill_lr.methods.base import LayerWork
from distill_lr.ranks import layer_ranks
from distill_lr.report import LayerReport, Perplexity, RunReport
from distill_lr.run import Run, dense_export_dir, open_input, prepare
from distill_lr.runtime import PhaseLog, overflow_message, release_freed_host_memory
from distill_lr.schema import CompressConfig
from distill_lr.streams import Stream, score

log = logging.getLogger("distill_lr")
ERROR_PROBE_SEQUENCES = 32  # calibration sequences on which the teacher-input error is reported
# Of this invocation: in report.json, never in config.json (a function of the settings).
RUN_FACTS = ("prepass_seconds", "prepass_peak_gib", "reused")


def compress(cfg: CompressConfig) -> RunReport:
    """Run a whole compression; its report is also written to ``<output>/report.json``."""
    with distributed.launched(cfg.device, cfg.dist_timeout_s) as group:
        opened = open_input(cfg)
        # one run per folder; a refused run leaves it as it was. Process 0 writes for all the processes of a launch.
        with files.claimed_folder(opened.out) if group.main else nullcontext():
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
            t0, phases = time.perf_counter(), PhaseLog(run.device)
            with phases("load"):
                layer = loader.load(i, run.device, run.dtype)  # waits for the read started during layer i-1, starts layer i+1's
            report = compress_layer(run, i, layer, phases)
            report.comm = distributed.group().take_traffic() if distributed.group().world > 1 else None
            layer.to("meta")
            release_freed_host_memory()
            run.report.layers.append(report)
            log.info("%s (%.1fs)", report.line(len(run.layers)), time.perf_counter() - t0)
    finally:
        loader.close()
        run.writer.close()  # also on a crash: the layers finished so far reach the disk and the manifest


def compress_layer(run: Run, index: int, layer: nn.Module, phases: PhaseLog) -> LayerReport:
    """Dense layer in, compressed layer written (or read back when a resumed run has it); advances every stream by one layer."""
    name = f"{run.prefix}{index}."
    ranks = layer_ranks(run.ranks, name)
    with phases("teacher"):
        outputs = [teacher_pass(run, layer, index, s) for s in run.streams]
    y = outputs[0]  # the target
    main = distributed.group().main
    done = distributed.group().broadcast_object(run.manifest.done(index) if main else None)  # process 0 reads the folder
    if done is not None:
        report, state = resumed_layer(run, layer, ranks, done)
    else:
        report, state = fresh_layer(run, index, layer, ranks, y, phases)
    install_state_(layer, state, name, run.device, run.dtype)  # as saved: fresh and resumed runs propagate the same student
    with phases("student"):
        advance_streams(run, index, layer, report, outputs)
    if done is None:
        report.seconds, report.peak_gib = phases.seconds, phases.peak_gib
        run.writer.submit(partial(run.manifest.mark_done, index, report.to_record()))
    return report


def advance_streams(run: Run, index: int, layer: nn.Module, report: LayerReport, outputs: list[torch.Tensor]) -> None:
    """Every stream one layer up (teacher <- the dense outputs, student <- the compressed layer's), and the layer's errors."""
    calibration, y, group = run.streams[0], outputs[0], distributed.group()
    if report.err_teacher_input is None:  # a diagnostic: a subset of the calibration set is enough (split over the processes)
        probe = calibration.teacher[: -(-ERROR_PROBE_SEQUENCES // group.world)]
        pred = run_layer(layer, probe, calibration.kwargs[index], run.cfg.batch_size)
        report.err_teacher_input = ratio(group.sum_floats(error_sums(pred, y[: len(probe)])))
    for s, out in zip(run.streams, outputs, strict=True):
        s.student, s.teacher = advance(run, layer, index, s), out
    if report.err_student_input is None:
        report.err_student_input = ratio(group.sum_floats(error_sums(calibration.student, y)))


def fresh_layer(
    run: Run, index: int, layer: nn.Module, ranks: dict[str, int], y: torch.Tensor, phases: PhaseLog
) -> tuple[LayerReport, dict[str, torch.Tensor]]:
    """Run the method's steps on the layer and queue its file; the report so far and the state as it will be saved."""
    s = run.streams[0]
    report = LayerReport(layer=index, linears=len(ranks))
    work = LayerWork(index, layer, ranks, s.teacher, s.student, y, s.kwargs[index], run.cfg, report, run.save_dtype)
    for step in run.method.steps:
        with phases(step.name):
            step.run(work)
    report.linear_bytes = compressed.linear_bytes(layer, run.save_dtype)
    state = compressed.layer_state(layer, f"{run.prefix}{index}.", run.save_dtype)
    with phases("save"):
        run.writer.drain()  # the previous layer's write, overlapped with this layer until now
    run.writer.submit(partial(run.manifest.save_layer, index, layer_file(index), state))
    return report, state


def resumed_layer(run: Run, layer: nn.Module, ranks: dict[str, int], done: dict[str, Any]) -> tuple[LayerReport, dict[str, torch.Tensor]]:
    """The layer as an earlier run of the same config wrote it: its report and its saved state."""
    run.method.prepare_resumed(layer, ranks, LayerReport.from_dict(done["report"]))
    state = load_file(run.out / done["file"])
    run.writer.drain()  # the teacher outputs being stored, if any: no stream is held past its layer
    return replace(LayerReport.from_dict(done["report"]), resumed=True), state


def teacher_pass(run: Run, layer: nn.Module, index: int, s: Stream) -> torch.Tensor:
    """The dense layer's outputs on one stream, in a fresh cache tensor: read from the teacher store when it has them."""
    out = run.cache.empty_like(s.teacher)
    store = run.teacher if run.teacher is not None and run.teacher.holds(s.name) else None
    if store is not None and store.load_into(index, s.name, out):
        return out
    run_layer(layer, s.teacher, s.kwargs[index], run.cfg.batch_size, out=out, overflow=partial(overflow_message, run.dtype, index, "dense"))
    if store is not None:  # read-only from here on: the writer may copy it while the next steps run
        run.writer.submit(partial(store.save, index, s.name, out))
    return out


def advance(run: Run, layer: nn.Module, index: int, s: Stream) -> torch.Tensor:
    """A stream's student states one layer up: in place once it has its own buffer (after layer 0 it aliases the teacher's)."""
    out = s.student if s.student is not s.teacher else run.cache.empty_like(s.student)
    overflow = partial(overflow_message, run.dtype, index, "compressed")
    return run_layer(layer, s.student, s.kwargs[index], run.cfg.batch_size, out=out, overflow=overflow)


def finish(run: Run) -> RunReport:
    """After the last layer: the method's stages, then index, side files and config (the folder is complete), evaluation, report."""
    cfg, out, report = run.cfg, run.out, run.report
    for stage in run.method.stages:
        stage.run(run)
    allocation = {k: v for k, v in (report.allocation or {}).items() if k not in RUN_FACTS}
    info = {**run.method.info, "allocation": allocation, **compressed.folder_structure(report.layers, run.prefix)}
    saved = [r.linear_bytes for r in report.layers]
    if all(b is not None for b in saved):  # layers written before the field was recorded have none
        dense = report.params.decoder_linear_before * run.save_dtype.itemsize
        report.size = {"bytes": sum(saved), "dense_bytes": dense, "ratio": round(sum(saved) / dense, 4), "dtype": str(run.save_dtype)}
    main = distributed.group().main
    if main:
        compressed.complete_folder(out, run.reader, len(run.layers), run.ranks, run.save_dtype, info, run.manifest)
    report.seconds = round(time.perf_counter() - run.start, 1)
    if run.teacher is not None:
        report.teacher_cache = {"folder": str(run.teacher.folder), "files_read": run.teacher.read, "files_written": run.teacher.written}
    for s in run.streams[1:]:  # the held-out text and the tasks, through the head of each stack
        dense, student = (score(run.model, run.layers, s, final) for final in (s.teacher, s.student))
        if s.task is None:
            report.perplexity = Perplexity.of(dense, student, len(run.tokens.evaluation), cfg.data.seq_len)
        else:
            report.tasks.append({"task": s.task.task.name, "dense": dense, "compressed": student})
    if not main:
        return report
    if cfg.export_dense:
        export.export_dense(out, dense_export_dir(out))
        report.dense_export = str(dense_export_dir(out))
    record = report.to_dict()
    files.write_json_atomic(record, out / "report.json")
    if cfg.plot:
        plots.draw_run(record, out / plots.REPORT_PNG)  # a picture of report.json
    return report


def disk_full(run: Run, err: OSError) -> UserInputError:
    """The one-line error for a disk that filled up mid-run: how much the checkpoint still needs, and that it resumes."""
    still = run.report.params.model_after * run.save_dtype.itemsize - files.folder_bytes(run.out)
    done = len(run.manifest.data["layers"])
    return UserInputError(
        f"the disk filled up while writing {err.filename or run.out} ({err.strerror}): the checkpoint still needs about "
        f"{files.human_bytes(max(still, 0))} at {run.out}; free that much and run the same command again: it resumes "
        f"after the {done} finished layer(s)"
    )
