"""The run configuration's typed schema: one dataclass per section, each checking its values in ``__post_init__``.

``distill_lr.config.load_config`` merges it with YAML files and ``key=value`` overrides. The method
name is checked there, against the method registry, which itself builds on this schema.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from distill_lr.allocation import ALLOCATIONS
from distill_lr.builtin import BUILTIN_MODEL, BUILTIN_TEXT
from distill_lr.cache import PLACEMENTS
from distill_lr.errors import check
from distill_lr.factorize import INITS

TRAIN_INPUTS = ("teacher", "student", "teacher+student")
AUTOCASTS = ("auto", "bfloat16", "float32")
DTYPES = ("auto", "float32", "bfloat16", "float16")

# Fields that change how a run is carried out or reported, not the layer files it writes:
# a resumed run may change them freely.
RUN_ONLY_FIELDS = (
    "output",
    "overwrite",
    "evaluate",
    "export_dense",
    "plot",
    "device",
    "data.eval_sequences",
    "cache",
    "cache_dir",
    "teacher_cache",
    "read_ahead",
    "eval.tasks",
    "eval.task_examples",
    "dist_timeout_s",
)


@dataclass
class EvalConfig:
    """Task accuracy before and after, computed layer by layer like the perplexity (see ``distill_lr.tasks``)."""

    # builtin:wiki-lastword (held-out Wikipedia cloze) and/or .jsonl files of {prompt, choices, answer}
    tasks: list[str] = field(default_factory=list)
    task_examples: int = 200  # examples of the built-in task

    def __post_init__(self) -> None:
        check(self.task_examples > 0, f"eval.task_examples must be > 0, got {self.task_examples}")


@dataclass
class DataConfig:
    """Calibration and held-out text (see ``distill_lr.data``)."""

    # builtin:wikipedia, builtin:python (the standard library's code), a .txt/.json/.jsonl/.parquet file or folder, or a dataset
    source: str = BUILTIN_TEXT
    text_column: str = "text"
    split: str = "train"
    subset: str | None = None
    num_sequences: int = 64
    seq_len: int = 512
    eval_sequences: int = 64
    eval_fraction: float = 0.1  # share of documents held out for evaluation, never used to calibrate

    def __post_init__(self) -> None:
        check(self.num_sequences > 0, f"data.num_sequences must be > 0, got {self.num_sequences}")
        check(self.seq_len > 1, f"data.seq_len must be > 1, got {self.seq_len}")
        check(self.eval_sequences >= 0, f"data.eval_sequences must be >= 0, got {self.eval_sequences}")
        check(0.0 <= self.eval_fraction < 1.0, f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")


@dataclass
class RankConfig:
    """Which linears become low-rank, and at which rank (see ``distill_lr.ranks``)."""

    # Fraction of the decoder layers' linear parameters to remove from the modules that no rule sets;
    # null: only the rules apply.
    target: float | None = 0.2
    # How `target` is spread (distill_lr.allocation): loss-aware (a streamed pre-pass estimates each matrix's
    # damage to the model's loss), uniform (the same kept fraction everywhere) or bottom (Lillama's greedy baseline).
    allocation: str = "loss-aware"
    floor: float = 0.1  # loss-aware and bottom: every matrix keeps at least this fraction of its parameters
    bottom_step: float = 0.1  # bottom: kept fraction lowered per step, layer by layer from the first
    allocation_sequences: int = 16  # calibration sequences of the loss-aware pre-pass
    # pattern -> int rank | float fraction of the matrix's parameters to keep | "skip".
    # Patterns match dotted module names segment by segment: "*" one segment, "**" any number,
    # "0-3" a layer range. When several rules match, the last one wins.
    rules: dict[str, Any] = field(default_factory=dict)
    # Linears that are never compressed (MoE routers).
    exclude: list[str] = field(default_factory=lambda: ["**.gate", "**.router", "**.shared_expert_gate"])
    rank_multiple: int = 1  # round ranks down to a multiple (8 suits tensor cores)
    # MoE: an expert routed fewer calibration tokens than this keeps its SVD init (no pca/whiten statistics)
    # and is not trained.
    min_expert_tokens: int = 16

    def __post_init__(self) -> None:
        if self.target is not None:
            check(0.0 < self.target < 1.0, f"ranks.target must be in (0, 1) or null, got {self.target}")
        check(self.allocation in ALLOCATIONS, f"ranks.allocation '{self.allocation}' is unknown: use one of {ALLOCATIONS}")
        check(0.0 < self.floor < 1.0, f"ranks.floor must be in (0, 1), got {self.floor}")
        check(0.0 < self.bottom_step < 1.0, f"ranks.bottom_step must be in (0, 1), got {self.bottom_step}")
        check(self.allocation_sequences > 0, f"ranks.allocation_sequences must be > 0, got {self.allocation_sequences}")
        check(self.rank_multiple >= 1, f"ranks.rank_multiple must be >= 1, got {self.rank_multiple}")
        check(self.min_expert_tokens >= 1, f"ranks.min_expert_tokens must be >= 1, got {self.min_expert_tokens}")
        for pattern, value in self.rules.items():
            ok = value == "skip" or (isinstance(value, int) and not isinstance(value, bool) and value > 0)
            ok = ok or (isinstance(value, float) and 0.0 < value <= 1.0)
            check(ok, f"ranks.rules['{pattern}'] = {value!r}: use a rank > 0, a fraction in (0, 1], or 'skip'")


def check_optimisation(section: Any, name: str) -> None:
    """The checks the layer-wise training and the end-to-end stage share: epochs, steps, batch, schedule, early stopping."""
    s = section
    check(s.epochs > 0, f"{name}.epochs must be > 0, got {s.epochs}")
    check(s.max_steps is None or s.max_steps > 0, f"{name}.max_steps must be > 0 or null, got {s.max_steps}")
    check(s.batch_size > 0, f"{name}.batch_size must be > 0, got {s.batch_size}")
    check(s.lr > 0, f"{name}.lr must be > 0, got {s.lr}")
    check(0.0 <= s.warmup_fraction < 1.0, f"{name}.warmup_fraction must be in [0, 1), got {s.warmup_fraction}")
    check(0.0 <= s.min_lr_ratio <= 1.0, f"{name}.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
    check(0.0 < s.holdout_fraction < 1.0, f"{name}.holdout_fraction must be in (0, 1), got {s.holdout_fraction}")
    check(s.evals_per_epoch > 0, f"{name}.evals_per_epoch must be > 0, got {s.evals_per_epoch}")
    check(s.patience > 0, f"{name}.patience must be > 0, got {s.patience}")
    check(s.divergence_factor > 1.0, f"{name}.divergence_factor must be > 1, got {s.divergence_factor}")
    check(s.check_every > 0, f"{name}.check_every must be > 0, got {s.check_every}")


@dataclass
class TrainConfig:
    """Feature distillation of each decoder layer (``method: distill``, see ``distill_lr.train``)."""

    inputs: str = "teacher+student"
    epochs: int = 2
    max_steps: int | None = None  # per layer; caps epochs
    batch_size: int = 4
    micro_batch_size: int | None = None  # sequences per forward/backward (gradients accumulate); null: batch_size
    # With relative_lr (default) each factor's step size is lr times its RMS at init, so one lr means the same
    # for every model's weight scale (the measurements behind the defaults: docs/measurements.md).
    lr: float = 1e-2
    relative_lr: bool = True
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0
    # Train each factor in coordinates where its input is white (precondition.Whitened).
    precondition: bool = True
    precondition_damping: float = 1e-2  # added to the input Gram matrix, times its mean eigenvalue
    precondition_max_features: int = 8192  # wider inputs (e.g. Mixtral's expert down projections) train unpreconditioned
    holdout_fraction: float = 0.125  # calibration sequences held out per layer to pick the best factors
    evals_per_epoch: int = 2
    # Held-out evaluations without improvement before stopping early. Preconditioned steps sometimes make the
    # first evaluations worse than the init, then better: patience must outlast that.
    patience: int = 4
    divergence_factor: float = 10.0  # roll back when the loss exceeds this multiple of the initial loss
    # Steps between reads of the training loss on the host (divergence test, progress bar): each read waits for the GPU.
    check_every: int = 8
    # Compute dtype of the training steps (the factors stay float32): auto = bfloat16 on a GPU, float32 on a CPU;
    # bfloat16 also on a CPU pays where it has native bf16 matmuls (AVX512-BF16, AMX; emulated elsewhere, slower).
    autocast: str = "auto"

    def __post_init__(self) -> None:
        check(self.inputs in TRAIN_INPUTS, f"train.inputs '{self.inputs}' is unknown: use one of {TRAIN_INPUTS}")
        check_optimisation(self, "train")
        micro_ok = self.micro_batch_size is None or 0 < self.micro_batch_size <= self.batch_size
        check(micro_ok, f"train.micro_batch_size must be in [1, train.batch_size] or null, got {self.micro_batch_size}")
        check(self.precondition_damping > 0, f"train.precondition_damping must be > 0, got {self.precondition_damping}")
        check(self.precondition_max_features > 0, f"train.precondition_max_features must be > 0, got {self.precondition_max_features}")
        check(self.autocast in AUTOCASTS, f"train.autocast '{self.autocast}' is unknown: use one of {AUTOCASTS}")


E2E_LOSSES = ("kl", "lm")
E2E_OPTIMIZERS = ("adamw", "adafactor")
BASIS_REGIMES = ("layerwise", "end_to_end")


@dataclass
class E2EConfig:
    """The end-to-end stage after the layer-wise pass (``distill_lr.stages.e2e``): every factor of the whole model trained
    together on the calibration set, on KL to the dense model's next-token distribution or the text's own next tokens."""

    enabled: bool = False
    epochs: int = 1
    max_steps: int | None = None  # caps epochs
    batch_size: int = 8  # sequences per optimizer step
    micro_batch_size: int = 1  # sequences per forward/backward (gradients accumulate)
    lr: float = 1e-3  # relative to each factor's RMS with relative_lr, as train.lr
    relative_lr: bool = True
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    holdout_fraction: float = 0.0625  # calibration sequences held out to pick the best factors and stop early
    evals_per_epoch: int = 4  # also how often a resumable state is saved
    patience: int = 2
    divergence_factor: float = 10.0  # roll back to the best factors when a step's loss exceeds this multiple of the first
    check_every: int = 8  # steps between reads of the training loss on the host, as train.check_every
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward pass: far less memory
    loss: str = "kl"  # kl: to the dense model's next-token distribution; lm: next-token cross-entropy of the calibration text
    # adamw: 16 bytes per trained parameter (itself, its gradient, two moments); adafactor: 8 (factored second moments,
    # no first moment; its steps are relative to each parameter's RMS by itself, relative_lr aside). docs/e2e.md compares them.
    optimizer: str = "adamw"
    # With quant.bits: also train the scales of every integer weight (its codes frozen, as in EfficientQAT's E2E-QP);
    # false: the scales stay as the layer-wise pass saved them and only the float factors, corrections and biases train.
    train_scales: bool = False

    def __post_init__(self) -> None:
        check_optimisation(self, "e2e")
        check(self.loss in E2E_LOSSES, f"e2e.loss must be one of {E2E_LOSSES}, got '{self.loss}'")
        check(self.optimizer in E2E_OPTIMIZERS, f"e2e.optimizer must be one of {E2E_OPTIMIZERS}, got '{self.optimizer}'")
        micro_ok = 0 < self.micro_batch_size <= self.batch_size
        check(micro_ok, f"e2e.micro_batch_size must be in [1, e2e.batch_size], got {self.micro_batch_size}")


@dataclass
class BasisConfig:
    """``method: basis_selection`` (Basis Selection, arXiv 2405.15877): each weight as rank-one bases ``U diag(σ) Vᵀ``
    from its (whitened) SVD, σ relearned layer-wise (``train.*``), the smallest pruned down to the rank budget, and a few
    new trainable bases for what the pretrained ones lack."""

    initial_factor: float = 2.0  # bases trained at the start, times the matrix's budget rank (at most its full rank)
    new_bases: int = 4  # new bases per matrix, counted in its rank budget (they start at zero: the SVD model)
    prune_fraction: float = 0.5  # share of the training steps over which the bases are pruned to the budget
    whiten: bool = True  # bases of the whitened SVD (output-optimal, as ``whiten``); false: the plain SVD of W
    regime: str = "layerwise"  # layerwise: σ relearned per layer (train.*); end_to_end: in the end-to-end stage (e2e.*)

    def __post_init__(self) -> None:
        check(
            self.initial_factor >= 1.0,
            f"basis.initial_factor must be >= 1 (bases to start from, times the budget), got {self.initial_factor}",
        )
        check(self.new_bases >= 0, f"basis.new_bases must be >= 0, got {self.new_bases}")
        check(0.0 < self.prune_fraction <= 1.0, f"basis.prune_fraction must be in (0, 1], got {self.prune_fraction}")
        check(self.regime in BASIS_REGIMES, f"basis.regime must be one of {BASIS_REGIMES}, got '{self.regime}'")


QUANT_METHODS = ("gptq", "rtn")
QUANT_TARGETS = ("auto", "factors", "dense", "both")


@dataclass
class QuantConfig:
    """Group-wise integer weights (``distill_lr.quant``): of the factors and/or the dense linears of any method,
    and the bases of ``method: qlr`` (quantized weight plus a low-rank correction of its error)."""

    bits: int | None = None  # 2, 3, 4 or 8; null: no quantization
    # Columns per scale. A row whose width is not a multiple keeps a shorter last group with its own scale
    # (576 = 4 x 128 + 64), so every width and every rank takes the same setting.
    group_size: int = 128
    symmetric: bool = True
    method: str = "gptq"  # gptq (error compensation from the calibration inputs) | rtn (round to nearest)
    # factors: the A, B of low-rank (and correction) modules; dense: the linears left dense (qlr: its bases);
    # auto: both for the low-rank methods, dense for qlr and dense
    targets: str = "auto"
    damping: float = 0.01  # gptq: added to the diagonal of E[x xᵀ], times its mean
    act_order: bool = True  # gptq: columns in order of decreasing input energy
    # qlr: rank of each weight's correction: an int, or a float = fraction of the matrix's parameters the pair holds
    correction_rank: Any = 32
    correction_rules: dict[str, Any] = field(default_factory=dict)  # pattern -> rank | fraction | "skip", as ranks.rules
    correction_train: bool = False  # qlr: train the corrections layer-wise (train.*), the quantized weights frozen

    def __post_init__(self) -> None:
        check(self.bits is None or self.bits in (2, 3, 4, 8), f"quant.bits must be 2, 3, 4, 8 or null, got {self.bits}")
        group_ok = isinstance(self.group_size, int) and not isinstance(self.group_size, bool) and self.group_size >= 8
        check(group_ok, f"quant.group_size must be an integer >= 8, got {self.group_size!r}")
        check(self.method in QUANT_METHODS, f"quant.method '{self.method}' is unknown: use one of {QUANT_METHODS}")
        check(self.targets in QUANT_TARGETS, f"quant.targets '{self.targets}' is unknown: use one of {QUANT_TARGETS}")
        check(0.0 < self.damping < 1.0, f"quant.damping must be in (0, 1), got {self.damping}")
        for where, value in [
            ("quant.correction_rank", self.correction_rank),
            *((f"quant.correction_rules['{k}']", v) for k, v in self.correction_rules.items()),
        ]:
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            ok = ok or (isinstance(value, float) and 0.0 < value < 1.0) or (value == "skip" and where != "quant.correction_rank")
            check(ok, f"{where} = {value!r}: use a rank > 0, a fraction in (0, 1), or (rules) 'skip'")


# The stage's settings do not decide the layer-wise files: a finished run may get the stage later. The stage
# records the settings it ran with in the manifest and refuses a folder trained with others (distill_lr.stages.e2e).
RUN_ONLY_FIELDS += tuple(f"e2e.{f.name}" for f in fields(E2EConfig))


@dataclass
class CompressConfig:
    """One compression run: input checkpoint, output folder, method, ranks, data, training."""

    model: str = BUILTIN_MODEL  # a Hugging Face checkpoint folder (config.json + safetensors)
    tokenizer: str | None = None  # tokenizer folder; default: the model folder
    output: str = "runs/SmolLM2-135M-Instruct-lowrank"
    # a name in distill_lr.methods.REGISTRY (docs/method.md lists them); each method checks the settings it reads
    method: str = "distill"
    init: str = "whiten"  # initialisation of the factors of the methods that train them (distill_lr.factorize.INITS)
    ranks: RankConfig = field(default_factory=RankConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    e2e: E2EConfig = field(default_factory=E2EConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    basis: BasisConfig = field(default_factory=BasisConfig)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # compute dtype: auto = float32 on CPU, bfloat16 on GPU
    save_dtype: str = "auto"  # dtype of the saved tensors: auto = the input checkpoint's
    batch_size: int = 8  # sequences per forward pass when filling the activation caches
    cache: str = "auto"  # where activation caches live: auto (from free memory) | device | host | disk
    cache_dir: str | None = None  # folder of the memory-mapped caches of cache=disk; default: the output folder (files unlinked at once)
    # Folder that keeps the dense layers' outputs for later runs over the same model, text, dtype and device
    # (sweeps over methods, ranks or training settings skip the teacher pass); null: computed in every run.
    teacher_cache: str | None = None
    read_ahead: bool = True  # read the next layer's weights while this one computes (one more layer in host memory)
    seed: int = 0
    overwrite: bool = False  # replace an output folder that holds another run
    evaluate: bool = True  # perplexity of the dense and the compressed model on held-out text
    export_dense: bool = False  # also write a dense checkpoint (factors multiplied out) to <output>-dense
    # Launched with several processes (torchrun, accelerate launch): seconds a collective waits for the others before
    # the run stops with an error (a process that died or hangs); see docs/distributed.md.
    dist_timeout_s: float = 1800.0
    plot: bool = True  # draw report.png (per-layer error, training curves, rank plan, perplexity) when matplotlib is installed

    def __post_init__(self) -> None:
        check(self.init in INITS, f"init '{self.init}' is unknown: use one of {tuple(INITS)}")
        check(self.dtype in DTYPES, f"dtype '{self.dtype}' is unknown: use one of {DTYPES}")
        check(self.save_dtype in DTYPES, f"save_dtype '{self.save_dtype}' is unknown: use one of {DTYPES}")
        check(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        check(self.cache in PLACEMENTS, f"cache '{self.cache}' is unknown: use one of {PLACEMENTS}")
        check(self.dist_timeout_s > 0, f"dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        check(bool(self.output), "output is empty: give the folder to write the compressed checkpoint to")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def result_fingerprint(self) -> dict[str, Any]:
        """The settings that decide the layer files; a resumed run must match them."""
        flat = _flatten(self.to_dict())
        return {k: v for k, v in flat.items() if k not in RUN_ONLY_FIELDS}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("rules", "correction_rules"):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = json.loads(json.dumps(value))
    return out
