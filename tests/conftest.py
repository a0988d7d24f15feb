"""Tiny random checkpoints built in memory and saved as sharded safetensors: no hub, no downloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

VOCAB = 256
# Tiny models: intra-op threads cost more than they save (the suite takes minutes with 2 threads on
# 2 cores and well under one with 1).
torch.set_num_threads(1)


def tiny_config(kind: str = "llama", **overrides):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "mistral":
        return MistralConfig(sliding_window=16, **common)
    if kind == "qwen2":
        return Qwen2Config(use_sliding_window=True, sliding_window=16, max_window_layers=1, **common)
    if kind == "mixtral":
        return MixtralConfig(**{"num_local_experts": 4, "num_experts_per_tok": 2, **common})
    if kind == "qwen2_moe":  # with a shared expert; layer 1 has a plain MLP
        moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64}
        return Qwen2MoeConfig(**{**moe, "mlp_only_layers": [1], **common})
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(**{"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, **common})
    raise ValueError(kind)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level-ish tokenizer over a fixed vocabulary, so tests need no download."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny(folder: Path, kind: str = "llama", shard_size: str | None = "60KB", seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides)).eval()
    kwargs = {"max_shard_size": shard_size} if shard_size else {"max_shard_size": "10GB"}
    model.save_pretrained(folder, **kwargs)
    word_tokenizer().save_pretrained(folder)
    # Keep AutoTokenizer on this word-level tokenizer rather than the architecture's default class.
    tok_cfg = folder / "tokenizer_config.json"
    tok_cfg.write_text(json.dumps(dict(json.loads(tok_cfg.read_text()), tokenizer_class="PreTrainedTokenizerFast")))
    return folder


def write_corpus(path: Path, n_docs: int = 40, words: int = 300, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    with path.open("w") as fh:
        for _ in range(n_docs):
            ids = torch.randint(3, VOCAB, (words,), generator=g).tolist()
            fh.write(json.dumps({"text": " ".join(f"w{i}" for i in ids)}) + "\n")
    return path


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Path:
    return save_tiny(tmp_path / "llama")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus.jsonl")


def overrides_for(model: Path, corpus: Path, output: Path, **extra) -> list[str]:
    """Settings for a fast CPU run on a tiny model."""
    base = {
        "model": str(model),
        "output": str(output),
        "data.source": str(corpus),
        "data.num_sequences": 16,
        "data.seq_len": 32,
        "data.eval_sequences": 4,
        "data.eval_fraction": 0.2,
        "batch_size": 4,
        "train.epochs": 1,
        "train.batch_size": 4,
        "ranks.target": 0.3,
        "method": "whiten",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def materialised_layer(folder: Path, index: int = 0):
    """(model, layers, layer): the skeleton with embeddings and head loaded, and one real decoder layer."""
    from distill_lr import checkpoint as ckpt

    reader = ckpt.CheckpointReader(folder)
    model = ckpt.build_skeleton(reader.config)
    prefix, layers = ckpt.decoder_layers(model)
    ckpt.load_non_layer_(model, reader, prefix, torch.device("cpu"), torch.float32)
    return model, layers, ckpt.LayerLoader(reader, layers, prefix, read_ahead=False).load(index, "cpu", torch.float32)
