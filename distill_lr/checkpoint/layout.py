"""The names of the files in a compressed checkpoint folder, and which of them a run writes."""

from __future__ import annotations

import re

from distill_lr.modeling.hf_modeling import INDEX_NAME, MANIFEST_NAME  # the remote code checks files by them too

OTHER_FILE = "model-other.safetensors"
CODE_FILES = ("modeling_distill_lr.py", "lowrank.py")  # the loading code copied beside the weights
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def layer_file(index: int) -> str:
    return f"model-layer-{index:05d}.safetensors"


EXPORT_MARKER = "distill_lr_export.json"  # in a dense export: the files it wrote
LOCK_NAME = "distill_lr.lock"  # held while a run writes the folder; removed at its end (a killed run's is taken over)
E2E_STATE = "distill_lr_e2e_state.pt"  # the end-to-end stage's resumable state, removed once the stage is done
_RUN_FILES = {OTHER_FILE, INDEX_NAME, MANIFEST_NAME, E2E_STATE, "config.json", "report.json", "report.png", *CODE_FILES, *TOKENIZER_FILES}
_RUN_PATTERN = re.compile(r"model-layer-\d{5}\.safetensors")


def written_by_a_run(name: str) -> bool:
    """Whether a file of this name in an output folder is one a run writes (its hidden temporary files included)."""
    temporary = re.fullmatch(r"\.(.+)-[^-]+\.tmp", name)
    name = temporary[1] if temporary else name
    return name in _RUN_FILES or _RUN_PATTERN.fullmatch(name) is not None or re.fullmatch(r"\.activations-.+\.bin", name) is not None
