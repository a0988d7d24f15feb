"""Token rows on their way up the decoder stack, shared by the compressor and the LASER sweep.

A ``Stream`` is one set of rows of one length: the calibration text, the held-out text, or one task's
(example, choice) rows; with the per-layer kwargs the model builds for that length, and the hidden states
of the dense (``teacher``) and the compressed (``student``) stack where a pass keeps both. ``score`` turns
a stream's last hidden states into its numbers through the model's own head. ``tokenize`` makes the rows
of a compression run from its settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer

from distill_lr import distributed
from distill_lr.checkpoint.layout import TOKENIZER_FILES
from distill_lr.checkpoint.reader import CheckpointReader
from distill_lr.data import TokenSets, bos_prefix, build_token_sets, held_out_documents, load_documents
from distill_lr.errors import UserInputError, check, first_line
from distill_lr.layerwise import LayerKwargs, capture_inputs, head_nll, head_span_logprobs
from distill_lr.schema import CompressConfig
from distill_lr.tasks import EncodedTask, encode, load_tasks


@dataclass
class Stream:
    """Rows that travel up the stack together (one length), with what each layer needs for them."""

    name: str
    ids: torch.Tensor  # (rows, length), on the compute device
    kwargs: list[LayerKwargs]  # per layer, as the model builds them for this length
    task: EncodedTask | None = None  # None: text, scored by its next-token loss
    teacher: torch.Tensor | None = None  # hidden states of the dense stack at the current layer
    student: torch.Tensor | None = None  # of the compressed stack (the teacher's own buffer until layer 0 is done)

    @classmethod
    def open(cls, name: str, ids: torch.Tensor, model: nn.Module, layers: nn.ModuleList, task: EncodedTask | None = None) -> Stream:
        return cls(name, ids, capture_inputs(model, layers, ids[:1])[1], task)


def open_streams(
    tokens: TokenSets, tasks: list[EncodedTask], model: nn.Module, layers: nn.ModuleList, device: torch.device
) -> list[Stream]:
    """A compression run's streams: the calibration text, the held-out text (when evaluated), each task's rows."""
    share = distributed.group().shard  # each process's block of the text's sequences
    text = [
        Stream.open(name, ids[share(len(ids))].to(device), model, layers)
        for name, ids in (("calibration", tokens.calibration), ("evaluation", tokens.evaluation))
    ]
    return [s for s in text if len(s.ids)] + [Stream.open(f"task:{t.task.name}", t.input_ids.to(device), model, layers, t) for t in tasks]


def score(model: nn.Module, layers: nn.ModuleList, stream: Stream, final: torch.Tensor) -> dict[str, Any]:
    """A text stream's held-out ``loss`` (per token), ``ppl`` and ``tokens``; a task stream's ``acc`` and ``acc_norm``."""
    if stream.task is None:  # summed over the processes that hold parts of the stream
        total, tokens = distributed.group().sum_floats(list(head_nll(model, layers, final, stream.ids)))
        tokens = int(tokens)
        return {"loss": total / tokens, "ppl": math.exp(total / tokens), "tokens": tokens}
    return stream.task.score(head_span_logprobs(model, layers, final, stream.ids, stream.task.spans))


def tokenize(cfg: CompressConfig, reader: CheckpointReader) -> tuple[TokenSets, list[EncodedTask]]:
    """The calibration and held-out token windows of the configured text, and the tasks' token rows."""
    folder = Path(cfg.tokenizer).expanduser() if cfg.tokenizer else reader.folder
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
