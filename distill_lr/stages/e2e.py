"""The end-to-end stage: after the layer-wise pass, every factor of the whole compressed model trains
together to match the dense model's next-token distribution on the calibration set (``e2e.loss=kl``), or
to predict the calibration text's own next tokens (``lm``: a target domain's data, Basis Selection's setting).

The teacher's logits come from the dense final hidden states the streamed pass already holds (the
teacher stream after the last layer), through the model's own final norm and head, one micro-batch at
a time: no vocabulary-sized tensor is ever stored. A held-out slice of the calibration sequences picks
the best factors and stops early; a step whose loss is not finite or explodes rolls back to the best.
Unlike the layer loop, this stage holds the whole compressed model, its gradients and the optimizer's state:
``estimate`` says how much before anything runs, and the stage refuses when it does not fit.

What trains is a ``Trainable``: the factor modules by default, another form where a method says so
(Basis Selection relearns σ of fixed bases here and prunes them). Resumable: at every held-out evaluation
the parameters, the best ones, the optimizer and the schedule go to ``E2E_STATE``; a run stopped in the
stage resumes it from there (the layer loop only replays its saved layers). Then the final factors go
there (a stop while the layer files are rewritten resumes from them); once they are written back into
the layer files, the manifest records the stage's settings and the state file goes.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import psutil
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from distill_lr import distributed
from distill_lr.checkpoint import compressed, files
from distill_lr.checkpoint.layout import E2E_STATE, layer_file
from distill_lr.checkpoint.manifest import RunManifest
from distill_lr.checkpoint.reader import install_state_
from distill_lr.distributed import local, whole
from distill_lr.errors import UserInputError
from distill_lr.fit import FactorSlots, FitState, fit, make_optimizer, schedule, split_holdout
from distill_lr.layerwise import embed, head_logits, run_layer
from distill_lr.modeling.lowrank import LowRankLinear, QuantLinear
from distill_lr.schema import CompressConfig, E2EConfig
from distill_lr.stages.base import FinishedLayers, RunStage
from distill_lr.stages.sharding import Shards, process_mesh, sharded_copy
from distill_lr.train import factor_modules, sequence_bounds, training_autocast

log = logging.getLogger("distill_lr")
FIT_SHARE = 0.9  # of the free memory the estimate may take
# a state file of another version lacks some
SAVED_KEYS = (*FitState.__dataclass_fields__, "finished", "factors", "optimizer", "scheduler", "trainable", "added")


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher ‖ p_student), in float32."""
    t = teacher_logits.float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean()


# Bytes of optimizer moments per trained parameter (Adafactor's factored second moments are a row and a column per
# matrix: counted as nothing).
MOMENT_BYTES = {"adamw": 8, "adafactor": 0}


@dataclass(frozen=True)
class Estimate:
    """Bytes the stage needs: weights (frozen in the compute dtype, factors in float32), gradients and optimizer
    moments of the factors, activations of one micro-batch (Korthikanti et al. 2022's per-layer count), logits."""

    weights: int
    optimizer: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations + self.logits

    def line(self) -> str:
        parts = ", ".join(f"{k} {files.human_bytes(v)}" for k, v in asdict(self).items())
        return f"{files.human_bytes(self.total)} ({parts})"


def estimate(
    factor_params: int,
    other_params: int,
    compute_bytes: int,
    model: dict[str, int],
    cfg: E2EConfig,
    seq_len: int,
    placement: tuple[int, int] = (1, 0),
) -> Estimate:
    """Per process. ``model``: hidden, layers, heads, vocab. Activations: ``s·b·h·(34 + 5·a·s/h)`` bytes per layer in 16
    bits (scaled to ``compute_bytes``); with gradient checkpointing one layer's worth plus each layer's input.

    ``placement``: (processes, replicated parameters). With several processes FSDP splits the decoder layers' weights,
    the factors' gradients and the optimizer's moments over them; the ``replicated`` parameters outside the layers
    (embeddings, final norm, head) are whole in each, and so are two average layers gathered in the compute dtype (the
    one computing and the next). Activations and logits are each process's own micro-batch."""
    processes, replicated = placement
    tokens = cfg.micro_batch_size * seq_len
    hidden, layers, heads, vocab = model["hidden"], model["layers"], model["heads"], model["vocab"]
    per_layer = tokens * (34 * hidden + 5 * heads * seq_len) * compute_bytes // 2
    activations = per_layer + tokens * hidden * compute_bytes * layers if cfg.gradient_checkpointing else per_layer * layers
    in_layers = other_params - replicated
    gathered = 2 * (in_layers + factor_params) * compute_bytes // layers if processes > 1 else 0
    return Estimate(
        weights=-(-(in_layers * compute_bytes + factor_params * 4) // processes) + replicated * compute_bytes + gathered,
        optimizer=-(-factor_params * (4 + MOMENT_BYTES[cfg.optimizer]) // processes),  # the float32 gradient and the moments
        activations=activations,
        logits=tokens * vocab * 4 * 4,  # teacher and student logits, their log-softmax, the gradient
    )


def state_bytes(factor_params: int, cfg: E2EConfig) -> int:
    """Disk the resumable state takes at its largest: the factors, the best factors and the optimizer's moments, float32."""
    return (8 + MOMENT_BYTES[cfg.optimizer]) * factor_params


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def check_folder(manifest: RunManifest, cfg: CompressConfig) -> None:
    """A folder whose layer files an earlier run trained end to end resumes only with the same stage settings."""
    done = manifest.stage(EndToEnd.name)
    # a setting added since the folder was trained is recorded as its default: that is how the stage ran
    if done is not None and (not cfg.e2e.enabled or {**asdict(E2EConfig()), **done["settings"]} != asdict(cfg.e2e)):
        raise UserInputError(
            f"{manifest.folder} holds layers trained by the end-to-end stage with other settings "
            f"({'e2e.enabled=false now' if not cfg.e2e.enabled else 'changed e2e.* values'}): run with the same e2e settings, "
            "a new output folder, or overwrite=true"
        )


class Trainable:
    """What the end-to-end stage trains: by default every factor module as the layer-wise pass left it. A method whose
    student has another form in this stage (Basis Selection's relearned σ) subclasses it and gives its class to
    ``EndToEnd(trainable=...)``; whatever it trains, it leaves ordinary factor modules in the layers at the end."""

    def __init__(self, cfg: CompressConfig) -> None:
        self.cfg = cfg

    def install(self, run: FinishedLayers) -> tuple[dict[str, nn.Module], list[float] | None]:
        """The modules to train, installed in the layers, by ``<layer>.<name>``; one learning-rate scale per parameter
        (None: each parameter's own RMS, ``fit.param_groups``)."""
        return {f"{i}.{n}": m for i, layer in enumerate(run.layers) for n, m in stage_modules(layer, self.cfg.e2e).items()}, None

    def on_step(self, state: FitState, total: int) -> None:
        """After each optimizer step of ``total``."""

    def state(self) -> dict[str, Any]:
        """What a resumable state keeps besides the trained parameters."""
        return {}

    def load(self, saved: dict[str, Any]) -> None:
        """Restore what ``state`` returned."""

    def finish(self, run: FinishedLayers) -> tuple[dict[str, Any], bool]:
        """With the best parameters installed: leave factor modules in the layers. What the stage's report adds, and
        whether the installed model differs from the best state evaluated (its held-out figures are then taken again)."""
        return {}, False

    def layer_record(self, index: int, record: dict[str, Any], added: dict[str, Any]) -> dict[str, Any]:
        """Layer ``index``'s manifest record once its file is rewritten, given what ``finish`` added to the report."""
        return record


def stage_modules(layer: nn.Module, cfg: E2EConfig) -> dict[str, nn.Module]:
    """What the stage trains in a layer, by name: the factor modules (float pairs, corrections over frozen integers, the
    biases beside them) and, with ``e2e.train_scales``, every other quantized weight (its scales)."""
    found = factor_modules(layer)
    if cfg.train_scales:
        inside = tuple(f"{n}." for n in found)
        found |= {n: m for n, m in layer.named_modules() if isinstance(m, QuantLinear) and not n.startswith(inside)}
    return found


def scales_trainable_(modules: Iterable[nn.Module], trainable: bool) -> None:
    """Each quantized weight's scales under ``modules`` as a parameter (trained; its integer codes stay buffers, never
    touched) or as a buffer again: the saved tensors are the same either way."""
    for module in modules:
        for q in module.modules():
            if isinstance(q, QuantLinear):
                scale = q.scale.detach()
                del q.scale
                if trainable:
                    q.scale = nn.Parameter(scale)
                else:
                    q.register_buffer("scale", scale)


@dataclass(frozen=True)
class EndToEnd(RunStage):
    """The stage as a ``RunStage``: the methods' registry adds it to every method when ``e2e.enabled``."""

    name: ClassVar[str] = "e2e"
    trainable: type[Trainable] = Trainable

    @property
    def data_parallel(self) -> bool:
        """The factor modules train sharded over several processes; another form of the student does not yet."""
        return self.trainable is Trainable

    def check(self, run: FinishedLayers) -> None:
        cfg, text, processes = run.cfg, run.reader.config.get_text_config(), distributed.group().world
        shape = {"hidden": text.hidden_size, "layers": text.num_hidden_layers, "heads": text.num_attention_heads, "vocab": text.vocab_size}
        p = run.report.params
        replicated = sum(t.numel() for n, t in run.model.named_parameters() if not n.startswith(run.prefix))
        sizes = (p.trainable, p.model_after - p.factor_params, run.dtype.itemsize)
        need = estimate(*sizes, shape, cfg.e2e, cfg.data.seq_len, (processes, replicated))
        free = free_memory(run.device)
        each = f" per process ({processes} processes)" if processes > 1 else ""
        log.info("end-to-end stage: needs about %s%s; %s free on %s", need.line(), each, files.human_bytes(free), run.device)
        if need.total > FIT_SHARE * free:
            raise UserInputError(
                f"the end-to-end stage needs about {need.line()}{each} but {run.device} has {files.human_bytes(free)} free: set "
                "e2e.gradient_checkpointing=true and e2e.micro_batch_size=1, use a device with more memory"
                f"{' or more processes' if self.data_parallel else ''}, or e2e.enabled=false"
            )

    def run(self, run: FinishedLayers) -> None:
        done = run.manifest.stage(self.name)
        if done is not None:  # an earlier run wrote the trained layers; the loop has just replayed them
            run.report.e2e = done["report"]
            return
        trainable, skeletons, g = self.trainable(run.cfg), list(run.layers), distributed.group()
        try:
            start = time.perf_counter()
            with g.failures():  # FSDP's collectives
                record, added, final = train_end_to_end(run, trainable)
            run.report.e2e = {**record, "seconds": round(time.perf_counter() - start, 1)}  # this invocation's: report.json only
            for i, skeleton in enumerate(skeletons):  # with several processes the stage trained sharded copies: they go
                run.layers[i] = skeleton
            write_trained(run, trainable, added, final)
            run.manifest.record_stage(self.name, asdict(run.cfg.e2e), record)
            if g.main:
                (run.out / E2E_STATE).unlink(missing_ok=True)
        finally:
            for i, skeleton in enumerate(skeletons):
                run.layers[i] = skeleton.to("meta")


def load_layers(run: FinishedLayers) -> None:
    """The whole compressed model from the layer files, its stage modules in float32: in place in one process; with several,
    FSDP copies (``sharding``) take the layers' places, each process holding its part of every layer."""

    def load(i: int) -> Callable[[nn.Module], None]:
        return lambda layer: load_layer_(run, i, layer)

    def trained(layer: nn.Module) -> list[nn.Module]:
        return list(stage_modules(layer, run.cfg.e2e).values())

    processes = distributed.group().world
    mesh = process_mesh(run.device, processes) if processes > 1 else None
    for i, layer in enumerate(run.layers):
        if mesh is None:
            load(i)(layer)
        else:
            run.layers[i] = sharded_copy(layer, load(i), trained, (mesh, run.dtype))


def load_layer_(run: FinishedLayers, i: int, layer: nn.Module) -> None:
    """Materialise layer ``i`` (on meta) from its file, as the layer loop wrote it (or the stage rewrote it)."""
    install_state_(layer, load_file(run.out / layer_file(i)), f"{run.prefix}{i}.", run.device, run.dtype)


def train_end_to_end(run: FinishedLayers, trainable: Trainable) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """Train what ``trainable`` installs on the loss ``e2e.loss`` names. Returns the stage's report, what
    ``trainable.finish`` added to it, and the best factors, whole (``_final_factors``; also saved in ``E2E_STATE``)."""
    saved = _load_state(run)
    if saved is not None and saved["finished"]:  # the final factors are saved: a stop while they were written resumes here
        state, added, final = FitState(**{k: saved[k] for k in FitState.__dataclass_fields__}), saved["added"], saved["factors"]
    else:
        load_layers(run)
        state, added, final = _fit(run, trainable, saved)
    return {**_report(state, run.cfg.e2e.loss), **added}, added, final


def write_trained(run: FinishedLayers, trainable: Trainable, added: dict[str, Any], final: dict[str, torch.Tensor]) -> None:
    """Each layer in turn: its trained tensors (a layer on meta is loaded from its file with ``final`` installed), its file
    rewritten (by process 0), the evaluation and task streams moved through it; then it goes back to meta."""
    main = distributed.group().main
    states = [embed(run.model, run.layers, s.ids, run.cfg.batch_size, out=s.student) for s in run.streams[1:]]
    for i, layer in enumerate(run.layers):
        if next(layer.parameters()).is_meta:
            load_layer_(run, i, layer)
            _install_final(run, i, layer, final)
        modules = stage_modules(layer, run.cfg.e2e).values()
        scales_trainable_(modules, False)
        for module in modules:
            module.to(run.dtype).requires_grad_(False)
        if main:
            run.manifest.save_layer(i, layer_file(i), compressed.layer_state(layer, f"{run.prefix}{i}.", run.save_dtype))
            run.manifest.mark_done(i, trainable.layer_record(i, run.manifest.data["layers"][str(i)]["report"], added))
        for s, x in zip(run.streams[1:], states, strict=True):
            run_layer(layer, x, s.kwargs[i], run.cfg.batch_size, out=x)
        layer.to("meta")
    for s, x in zip(run.streams[1:], states, strict=True):
        s.student = x


def _fit(
    run: FinishedLayers, trainable: Trainable, saved: dict[str, Any] | None
) -> tuple[FitState, dict[str, Any], dict[str, torch.Tensor]]:
    """``e2e.optimizer`` from the layer-wise factors or an unfinished ``saved`` state; the final factors are saved before returning."""
    cfg = run.cfg.e2e
    run.model.requires_grad_(False)
    modules, scales = trainable.install(run)
    scales_trainable_(modules.values(), cfg.train_scales)
    for module in modules.values():
        module.float().requires_grad_(True)
    factors = FactorSlots(modules)
    # what this process holds of the layers' weights: a 1/processes part of each layer once FSDP has sharded them
    held = {"processes": distributed.group().world, "layer_bytes_per_process": sum(local(t).nbytes for t in run.layers.parameters())}
    if not factors.params:
        raise UserInputError(
            "the end-to-end stage has nothing to train: every weight is quantized and no float factor or bias is left; set "
            "e2e.train_scales=true (train the quantization scales), quant.targets=dense (keep the factors float), or e2e.enabled=false"
        )
    if cfg.gradient_checkpointing:
        run.model.gradient_checkpointing_enable()
        run.model.train()  # transformers checkpoints only in training mode
    autocast = training_autocast(run.device, run.cfg.train.autocast)
    calibration = run.streams[0]  # this process's block of the calibration sequences
    bounds = sequence_bounds(len(calibration.ids))  # [0, n] in a single process
    objective = sharded(Objective(run.model, run.layers, calibration.ids, calibration.teacher, autocast, cfg), bounds)
    hold, train = split_holdout(bounds[-1], cfg.holdout_fraction, torch.Generator().manual_seed(run.cfg.seed))
    steps_per_epoch, total, _ = schedule(cfg, len(train))
    optimizer = make_optimizer(factors.params, cfg, total, scales, cfg.optimizer)
    shards = Shards(factors.params)
    state = _open_state(run, (factors, shards), objective, hold, optimizer, trainable, saved)
    start = time.perf_counter()

    def order(epoch: int) -> torch.Tensor:  # a function of the epoch alone: a resumed run draws the same
        drawn = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(run.cfg.seed * 1000 + epoch))]
        return distributed.interleaved(drawn, bounds, cfg.batch_size)  # an even share of each process's sequences per step

    def on_eval(s: FitState) -> None:
        _save_state(run, s, shards, shards.full(factors.snapshot()), optimizer, trainable=trainable.state())
        log.info("%s (%.0fs)", _line(s, (s.step - 1) // steps_per_epoch + 1, cfg.epochs, cfg.loss), time.perf_counter() - start)

    fit(objective, factors, (train, hold, order), cfg, optimizer, state, on_eval, desc="e2e", on_step=trainable.on_step)
    if math.isfinite(state.best["loss"]):  # else no held-out evaluation counts (a method's schedule reset it): the end stays
        factors.restore(state.best_factors)
    added, changed = trainable.finish(run)
    added = {**held, **added}
    if changed or not math.isfinite(state.best["loss"]):  # the figures of what is installed
        state.best, state.best_step = objective.evaluate(hold), state.step
    if cfg.gradient_checkpointing:
        run.model.gradient_checkpointing_disable()
    run.model.eval()
    state.best_factors = []
    final = _final_factors(run)
    _save_state(run, state, shards, final, added=added)
    return state, added, final


def _final_factors(run: FinishedLayers) -> dict[str, torch.Tensor]:
    """Every factor module's tensors, whole, by ``<layer>.<name>.<tensor>``, on the host."""
    return {
        f"{i}.{k}": whole(v.detach()).cpu().clone()
        for i, layer in enumerate(run.layers)
        for n, m in stage_modules(layer, run.cfg.e2e).items()
        for k, v in m.state_dict(prefix=f"{n}.").items()
    }


def _install_final(run: FinishedLayers, i: int, layer: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Install layer ``i``'s tensors of ``_final_factors``; a low-rank linear whose saved rank differs (a layer file not
    yet rewritten by a method that changes ranks in the stage) is rebuilt at the saved rank first."""
    for n, m in stage_modules(layer, run.cfg.e2e).items():
        tensors = {k[len(f"{i}.{n}.") :]: v for k, v in saved.items() if k.startswith(f"{i}.{n}.")}
        if isinstance(m, LowRankLinear) and "A.weight" in tensors and tensors["A.weight"].shape != m.A.weight.shape:
            bias = tensors.get("B.bias")
            m = LowRankLinear.from_factors(tensors["A.weight"], tensors["B.weight"], bias).to(run.device)
            layer.set_submodule(n, m)
        m.load_state_dict(tensors)


@dataclass
class Objective:
    """On calibration sequences: KL of the compressed model's next-token distribution to the dense one's (``kl``), or
    the compressed model's next-token cross-entropy of the text itself (``lm``: the target data's own loss)."""

    model: nn.Module
    layers: nn.ModuleList
    input_ids: torch.Tensor
    teacher_hidden: torch.Tensor  # the dense final hidden states (the teacher stream after the last layer)
    autocast: torch.autocast
    cfg: E2EConfig

    @property
    def name(self) -> str:
        return self.cfg.loss

    def loss(self, idx: torch.Tensor, backward: bool) -> torch.Tensor:
        """Mean loss over the sequences ``idx`` (a step's batch, or the whole held-out slice), one micro-batch at a
        time; with ``backward`` the gradients accumulate."""
        total = torch.zeros((), device=self.input_ids.device)
        for start in range(0, len(idx), self.cfg.micro_batch_size):
            part = idx[start : start + self.cfg.micro_batch_size]
            total = total + self.micro_batch(part, len(part) / len(idx), backward)
        return total

    def micro_batch(self, part: torch.Tensor, weight: float, backward: bool, grad_scale: float = 1.0) -> torch.Tensor:
        """``weight`` times the mean loss of the sequences ``part``; with ``backward`` its gradient times ``grad_scale`` accumulates."""
        device = self.input_ids.device
        ids = self.input_ids[part].to(device)
        with torch.set_grad_enabled(backward), self.autocast:
            student = self.model(input_ids=ids, use_cache=False).logits
        if self.cfg.loss == "lm":
            value = F.cross_entropy(student[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()) * weight
        else:
            teacher = head_logits(self.model, self.layers, self.teacher_hidden[part].to(device), ids)
            value = kl_to_teacher(student, teacher) * weight
        if backward:
            (value * grad_scale if grad_scale != 1 else value).backward()
        return value.detach()

    def evaluate(self, idx: torch.Tensor) -> dict[str, float]:
        return {"loss": float(self.loss(idx, backward=False))}


@dataclass
class ShardedLoss:
    """The stage's objective when the calibration sequences are spread over processes and the layers sharded by FSDP.

    Every process is given the same global indices and computes its own sequences' share of the batch's mean loss.
    FSDP gathers a layer's parameters from all processes in each forward and backward, so every process runs as many
    micro-batches as the busiest one: where it has none left it runs one of its own sequences at weight zero. FSDP
    averages the gradients over the processes; each share's gradient is scaled by their number, so the sum is the
    gradient of the whole batch's mean loss, as in one process. The loss is summed too: every decision is the same everywhere.
    """

    inner: Objective
    bounds: list[int]  # where each process's block of sequences starts in the global indices, and the total
    group: distributed.Group

    @property
    def name(self) -> str:
        return self.inner.name

    def loss(self, idx: torch.Tensor, backward: bool) -> torch.Tensor:
        g, micro = self.group, self.inner.cfg.micro_batch_size
        blocks = list(zip(self.bounds, self.bounds[1:], strict=False))
        calls = max(-(-len(distributed.in_block(idx, block)) // micro) for block in blocks)
        mine = distributed.in_block(idx, blocks[g.rank])
        total = torch.zeros((), device=self.inner.input_ids.device)
        for k in range(calls):
            part = mine[k * micro : (k + 1) * micro]
            value = self.inner.micro_batch(part if len(part) else mine.new_zeros(1), len(part) / len(idx), backward, grad_scale=g.world)
            total = total + value if len(part) else total
        total = total.float()
        g.sum_([total], tag="step" if backward else "")
        return total

    def evaluate(self, idx: torch.Tensor) -> dict[str, float]:
        return {"loss": float(self.loss(idx, backward=False))}


def sharded(objective: Objective, bounds: list[int]) -> Objective | ShardedLoss:
    """The objective over every process's sequences (itself in a single process)."""
    g = distributed.group()
    return objective if g.world == 1 else ShardedLoss(objective, bounds, g)


def _open_state(
    run: FinishedLayers,
    factors: tuple[FactorSlots, Shards],
    objective: Objective | ShardedLoss,
    hold: torch.Tensor,
    optimizer: tuple[torch.optim.Optimizer, Any],
    trainable: Trainable,
    saved: dict[str, Any] | None,
) -> FitState:
    """The saved unfinished state (parameters, optimizer, schedule and the trainable's own state restored; whole tensors
    cut into this process's parts), else a fresh one from the layer-wise factors."""
    slots, shards = factors
    if saved is None:
        return FitState.start(objective, hold, slots.snapshot())
    slots.restore(shards.part(saved["factors"]))
    optimizer[0].load_state_dict(shards.part_optimizer(saved["optimizer"]))
    optimizer[1].load_state_dict(saved["scheduler"])
    trainable.load(saved["trainable"])
    log.info("end-to-end stage: resumed at step %d from %s", saved["step"], run.out / E2E_STATE)
    return FitState(**{k: saved[k] for k in FitState.__dataclass_fields__} | {"best_factors": shards.part(saved["best_factors"])})


def _save_state(
    run: FinishedLayers,
    state: FitState,
    shards: Shards,
    params: Any,
    optimizer: tuple[torch.optim.Optimizer, Any] | None = None,
    trainable: dict[str, Any] | None = None,
    added: dict[str, Any] | None = None,
) -> None:
    """Unfinished: the trained parameters (whole), the optimizer and the trainable's own state. Finished (``added``
    given): the final factor tensors and what the trainable added to the report. Every process gathers; process 0 writes."""
    saved = {k: getattr(state, k) for k in FitState.__dataclass_fields__} | {"finished": added is not None, "factors": params}
    saved["best_factors"] = shards.full(state.best_factors) if state.best_factors else []
    saved |= (
        {"optimizer": {}, "scheduler": {}}
        if optimizer is None
        else {"optimizer": shards.full_optimizer(optimizer[0].state_dict()), "scheduler": optimizer[1].state_dict()}
    )
    if not distributed.group().main:
        return
    saved |= {"trainable": trainable or {}, "added": added or {}, "settings": asdict(run.cfg.e2e), "layers": _layer_hashes(run)}
    with files.atomic_file(run.out / E2E_STATE) as tmp:
        torch.save(saved, tmp)


def _line(state: FitState, epoch: int, epochs: int, loss: str) -> str:
    last = state.curve[-1] if state.curve else {f"train_{loss}": float("nan"), f"holdout_{loss}": float("nan")}
    return (
        f"e2e epoch {epoch}/{epochs} | step {state.step} | train {loss} {last[f'train_{loss}']:.4f} | held-out {loss} "
        f"{last[f'holdout_{loss}']:.4f} (start {state.init_holdout['loss']:.4f}, best {state.best['loss']:.4f} at step {state.best_step})"
    )


def _report(state: FitState, loss: str) -> dict[str, Any]:
    return {
        "loss": loss,
        "init_holdout": state.init_holdout["loss"],
        "best_holdout": state.best["loss"],
        "steps": state.step,
        "best_step": state.best_step,
        "stopped_early": state.stopped_early,
        "rolled_back": state.rolled_back,
        "curve": state.curve,
    }


def _layer_hashes(run: FinishedLayers) -> dict[str, str]:
    return {k: v["sha256"] for k, v in sorted(run.manifest.data["layers"].items())}


def _load_state(run: FinishedLayers) -> dict[str, Any] | None:
    """The saved state, if it is readable and belongs to this run (process 0 decides, from the manifest it keeps; every
    process then reads the file)."""
    g, path = distributed.group(), run.out / E2E_STATE
    state = _check_state(run) if g.main else None
    if not g.broadcast_object(state is not None):
        return None
    return state if g.main else torch.load(path, weights_only=True)


def _check_state(run: FinishedLayers) -> dict[str, Any] | None:
    """The state file, if it belongs to this run: its settings, and the layer-wise files it started from (a finished
    state: its best factors are final, whatever the layer files already rewritten)."""
    path = run.out / E2E_STATE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # a truncated or foreign file: never used
        warnings.warn(f"{path} cannot be read ({type(err).__name__}): the end-to-end stage starts over", stacklevel=4)
        return None
    same = isinstance(state, dict) and state.get("settings") == asdict(run.cfg.e2e) and all(k in state for k in SAVED_KEYS)
    if not (same and (state.get("finished") or state.get("layers") == _layer_hashes(run))):
        warnings.warn(f"{path} belongs to other settings or other layer files: the end-to-end stage starts over", stacklevel=4)
        return None
    return state
