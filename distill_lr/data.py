"""Calibration and evaluation text, loaded with the ``datasets`` library and cut into token windows.

``load_documents`` accepts the built-in texts, local ``.txt`` / ``.json`` / ``.jsonl`` / ``.parquet``
files or folders of them, or any dataset name ``datasets.load_dataset`` can load on this machine, and
gives the texts as a sequence of strings (a lazy ``datasets`` column; a list for the built-in texts, which
need no ``datasets``). A ``.txt`` file is split into documents at blank lines (``sample_by="paragraph"``),
so one long text file still yields separate documents for the calibration/evaluation split.

``build_token_sets`` holds out whole documents for evaluation, so no evaluation text is ever
seen during calibration, and cuts each side into fixed-length windows deterministically.
"""

from __future__ import annotations

import codecs
import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from distill_lr.builtin import BUILTIN_SOURCES, BUILTIN_TEXT, builtin_python_documents, builtin_wikipedia_documents
from distill_lr.errors import UserInputError, check, first_line

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

Documents = Sequence[str]  # the texts of a source: indexable, sized, never loaded whole when they come from ``datasets``

# File suffix -> the datasets builder that reads it.
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Calibration windows are drawn from at most this many times the text they need, so a huge
# dataset is not tokenised in full while the windows still come from many documents.
POOL_FACTOR = 8
_FIRST_BATCH = 16  # documents per tokenizer call, doubled up to _MAX_BATCH: little waste on long documents
_MAX_BATCH = 1024


@dataclass(frozen=True)
class TokenSets:
    """Token windows for calibration and for held-out evaluation, both ``LongTensor [n, seq_len]``."""

    calibration: torch.Tensor
    evaluation: torch.Tensor


def load_documents(source: str, text_column: str = "text", split: str = "train", subset: str | None = None) -> Documents:
    """The non-empty texts of ``source`` (from its column ``text_column``).

    ``split`` and ``subset`` apply to named datasets only; local files always form one split.
    """
    path = Path(source).expanduser()
    if source.startswith("builtin:"):
        check(source in BUILTIN_SOURCES, f"unknown built-in text '{source}': use one of {BUILTIN_SOURCES}, or a file, folder or dataset")
        texts = builtin_wikipedia_documents() if source == BUILTIN_TEXT else builtin_python_documents()
        return [t for t in texts if t.strip()]
    import datasets  # not needed by the built-in texts

    if path.exists():
        ds = _load_local(path, text_column)
    else:
        try:
            ds = datasets.load_dataset(source, subset, split=split)
        except Exception as exc:  # any failure to load a user-named dataset is reported as one line
            raise UserInputError(
                f"could not load dataset {source!r}: {first_line(exc)}; "
                "give a local .txt/.jsonl/.parquet file or a dataset cached on this machine"
            ) from exc
        ds = _text_only(ds, text_column, source)
    ds = ds.filter(lambda batch: [bool(t and t.strip()) for t in batch[text_column]], batched=True)
    if len(ds) == 0:
        raise UserInputError(f"{source} has no non-empty documents in column {text_column!r}: give a source with text")
    return ds[text_column]


def _load_local(path: Path, text_column: str) -> datasets.Dataset:
    """A file, or every supported file under a folder: each kind through its builder, then joined."""
    import datasets

    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
        if not files:
            raise UserInputError(f"folder {path} has no .txt, .json, .jsonl or .parquet files: put the text there or give another source")
    elif path.suffix.lower() in BUILDERS:
        files = [path]
    else:
        raise UserInputError(f"{path} is not a .txt, .json, .jsonl or .parquet file: convert it or give a folder of such files")
    files = [f for f in files if f.stat().st_size > 0]
    if not files:
        raise UserInputError(f"{path} is empty: give a data.source with text")
    by_builder: dict[str, list[str]] = defaultdict(list)
    for file in files:
        if BUILDERS[file.suffix.lower()] != "parquet":
            _check_utf8(file)
        by_builder[BUILDERS[file.suffix.lower()]].append(str(file))
    parts = []
    for builder, data_files in sorted(by_builder.items()):
        options = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=data_files, split="train", **options)
        except Exception as exc:  # malformed files surface as many exception types
            raise UserInputError(f"could not read {path} as {builder}: {first_line(exc)}; fix or remove the bad file") from exc
        if builder == "text" and text_column != "text":
            ds = ds.rename_column("text", text_column)  # plain text has no columns: it goes wherever the user said
        parts.append(_text_only(ds, text_column, str(path)))
    return datasets.concatenate_datasets(parts)


def _check_utf8(path: Path, block: int = 1 << 20) -> None:
    """Refuse a text file that is not UTF-8, naming the first bad byte (one streamed read; the readers fail far from it)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:  # err.object: the bytes kept from the last chunk, then this one
                at = offset - (len(err.object) - len(chunk)) + err.start
                raise UserInputError(
                    f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {at:,}): re-encode it "
                    "as UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove it from data.source"
                ) from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserInputError(f"{path} ends inside a UTF-8 character: re-encode it as UTF-8 or remove it from data.source") from None


def _text_only(ds: datasets.Dataset, text_column: str, source: str) -> datasets.Dataset:
    """Keep just the text column, after checking that it exists and holds strings."""
    if text_column not in ds.column_names:
        raise UserInputError(
            f"{source} has no column {text_column!r} (columns: {', '.join(ds.column_names)}): set data.text_column to one of them"
        )
    feature = ds.features[text_column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise UserInputError(f"column {text_column!r} of {source} holds {feature}, not text: set data.text_column to a text column")
    return ds.select_columns([text_column])


def build_token_sets(
    documents: Documents,
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_sequences: int,
    seq_len: int,
    eval_sequences: int,
    eval_fraction: float,
    seed: int,
    max_positions: int | None = None,
) -> TokenSets:
    """Calibration and evaluation windows of exactly ``seq_len`` tokens, from disjoint sets of documents.

    Documents are shuffled with ``seed``; the first ``ceil(eval_fraction * n)`` (at least one when
    ``eval_fraction > 0``) are held out for evaluation, whether or not evaluation runs, so that turning
    evaluation off or on never changes the calibration set. Each side's documents are
    joined with EOS between them and cut into non-overlapping windows; when the tokenizer starts
    texts with BOS, every window starts with BOS too, as the model's inputs do. Calibration takes
    ``num_sequences`` windows in a seeded random order, evaluation its first ``eval_sequences``.
    """
    _check_sizes(num_sequences, seq_len, eval_sequences, max_positions)
    n_docs = len(documents)
    check(n_docs > 0, "no documents to calibrate on: give a data.source with text")

    generator = torch.Generator().manual_seed(seed)
    eval_docs, calib_docs = split_documents(n_docs, eval_fraction, generator)
    n_eval = len(eval_docs)
    prefix = bos_prefix(tokenizer)
    body = seq_len - len(prefix)

    stream = _token_stream(documents, calib_docs, tokenizer, POOL_FACTOR * num_sequences * body)
    pool = _windows(stream, body, prefix)
    check(
        len(pool) >= num_sequences,
        f"calibration text has {len(stream):,} tokens in {len(pool)} windows of {seq_len} "
        f"({len(calib_docs)} of {n_docs} documents, {n_eval} held out for evaluation); need num_sequences={num_sequences}: "
        "lower data.num_sequences or data.seq_len, or give more text",
    )
    calibration = pool[torch.randperm(len(pool), generator=generator)[:num_sequences]]

    stream = _token_stream(documents, eval_docs, tokenizer, eval_sequences * body)
    evaluation = _windows(stream, body, prefix)[:eval_sequences]
    check(
        eval_sequences == 0 or len(evaluation) > 0,
        f"evaluation text has {len(stream):,} tokens ({n_eval} held-out documents), less than one window of {seq_len}: "
        "raise data.eval_fraction, lower data.seq_len, or set data.eval_sequences=0",
    )
    if len(evaluation) < eval_sequences:
        warnings.warn(
            f"evaluation text gives only {len(evaluation)} windows of {seq_len}, not eval_sequences={eval_sequences}: "
            f"evaluating on {len(evaluation)}; raise data.eval_fraction for more",
            stacklevel=2,
        )
    return TokenSets(calibration=calibration, evaluation=evaluation)


def split_documents(n_docs: int, eval_fraction: float, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """(held-out, calibration) document indices: a seeded shuffle, the first ``ceil(eval_fraction * n)`` held out.

    Every held-out use (perplexity windows, the built-in task) takes its documents from the first list,
    so none of them is ever calibration text.
    """
    order = torch.randperm(n_docs, generator=generator).tolist()
    n_eval = max(1, math.ceil(eval_fraction * n_docs - 1e-9)) if eval_fraction > 0 else 0  # - 1e-9: 0.28 * 25 is 7.000000000000001
    return order[:n_eval], order[n_eval:]


def held_out_documents(n_docs: int, eval_fraction: float, seed: int) -> list[int]:
    """The documents ``build_token_sets`` holds out with the same ``eval_fraction`` and ``seed`` (the built-in task's)."""
    return split_documents(n_docs, eval_fraction, torch.Generator().manual_seed(seed))[0]


def _check_sizes(num_sequences: int, seq_len: int, eval_sequences: int, max_positions: int | None) -> None:
    check(num_sequences > 0, f"data.num_sequences must be > 0, got {num_sequences}: set the number of calibration windows")
    check(seq_len > 1, f"data.seq_len must be > 1, got {seq_len}: set the window length in tokens")
    check(eval_sequences >= 0, f"data.eval_sequences must be >= 0, got {eval_sequences}: use 0 to skip evaluation")
    check(
        max_positions is None or seq_len <= max_positions,
        f"seq_len {seq_len} is above the model's context ({max_positions}): lower data.seq_len",
    )


def bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``[bos]`` when the tokenizer puts BOS in front of every text (Llama, Gemma), else ``[]``."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def _token_stream(documents: Documents, indices: list[int], tokenizer: PreTrainedTokenizerBase, budget: int) -> list[int]:
    """Token ids of the documents at ``indices``, in that order, with EOS between them; stops once ``budget`` is reached."""
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    stream: list[int] = []
    start, batch = 0, _FIRST_BATCH
    while start < len(indices) and len(stream) < budget:
        texts = [documents[i].strip() for i in indices[start : start + batch]]
        for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            if ids:
                stream.extend(separator + ids if stream else ids)
        start, batch = start + batch, min(2 * batch, _MAX_BATCH)
    return stream


def _windows(stream: list[int], body: int, prefix: list[int]) -> torch.Tensor:
    """Non-overlapping windows of ``body`` tokens from ``stream``, each behind ``prefix``; the tail is dropped."""
    n = len(stream) // body
    windows = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    return torch.cat([torch.tensor(prefix, dtype=torch.long).expand(n, -1), windows], dim=1)
