"""Write a random-weight checkpoint of any architecture, shard by shard, without building the model.

Benchmarks need checkpoints of real shapes (Mixtral-8x7B's layers are 1.4 GB each) on machines
that could not hold the whole model: the shapes come from the meta-device skeleton and each
layer's tensors are drawn and written on their own.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import PretrainedConfig

from distill_lr.checkpoint.compressed import write_index
from distill_lr.checkpoint.files import save_tensors_atomic
from distill_lr.checkpoint.reader import build_skeleton, decoder_layers


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
