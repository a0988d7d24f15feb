"""Random checkpoints, built from configs and saved as sharded safetensors: no hub, no downloads.

Tiny models of every supported family for the test suite and ``scripts/check_same_output.py``, and
random weights with a real model's shapes for the benchmarks, written layer by layer without
building the model (Mixtral-8x7B's layers are 1.4 GB each).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from distill_lr.checkpoint.compressed import write_index
from distill_lr.checkpoint.files import save_tensors_atomic
from distill_lr.checkpoint.reader import build_skeleton, decoder_layers

VOCAB = 256


def tiny_config(kind: str = "llama", **overrides: object) -> PretrainedConfig:
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


def save_tiny(folder: Path, kind: str = "llama", shard_size: str | None = "60KB", seed: int = 0, **overrides: object) -> Path:
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


def write_random_checkpoint(
    config: PretrainedConfig, folder: Path, tokenizer_from: Path | None = None, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"
) -> Path:
    """One shard per decoder layer plus one for the rest; norms are ones, weights N(0, 0.02).

    ``device="cuda"`` draws the numbers on the GPU, much faster for the billions of a large model.
    """
    folder.mkdir(parents=True, exist_ok=True)
    model = build_skeleton(config)
    prefix, layers = decoder_layers(model)
    state = model.state_dict()
    groups: dict[str, list[str]] = {"model-other.safetensors": [k for k in state if not k.startswith(prefix)]}
    for i in range(len(layers)):
        groups[f"model-{i:05d}.safetensors"] = [k for k in state if k.startswith(f"{prefix}{i}.")]
    generator = torch.Generator(device).manual_seed(0)
    for name, keys in groups.items():
        tensors = {}
        for key in keys:
            shape = state[key].shape
            if "norm" in key or len(shape) == 1:
                tensors[key] = torch.ones(shape, dtype=dtype)
            else:
                tensors[key] = (torch.randn(shape, generator=generator, device=device) * 0.02).to(dtype).cpu()
        save_tensors_atomic(tensors, folder / name)
    write_index(folder, list(groups))
    config.save_pretrained(folder)
    if tokenizer_from is not None:
        for path in tokenizer_from.iterdir():
            if path.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copyfile(path, folder / path.name)
    return folder
