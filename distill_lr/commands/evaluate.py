"""Task accuracy of a checkpoint (dense, compressed or LASER-intervened), by our scorer and by lm-eval's.

    distill-lr evaluate --model runs/SmolLM2-135M-Instruct-lowrank
    distill-lr evaluate --model runs/laser-best --tasks my_task.jsonl --lm-eval my_lm_eval_task --include-path tasks/

``--tasks``: ``builtin:wiki-lastword`` and/or JSON-lines files, scored by ``distill_lr.tasks`` (acc and
acc_norm with lm-eval's semantics); ``--lm-eval``: task names run through lm-eval's Python API
(``pip install lm-eval``; a local task YAML over a JSON file works offline with ``--include-path``).
This loads the whole model: its memory is estimated first and the run refused when it does not fit
(``distill-lr compress eval.tasks=[...]`` scores tasks layer by layer instead, for models of any size).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import psutil
import torch

from distill_lr.builtin import BUILTIN_TEXT, resolve_model_dir
from distill_lr.checkpoint.compressed import load_compressed
from distill_lr.checkpoint.files import human_bytes
from distill_lr.checkpoint.reader import checkpoint_config
from distill_lr.data import bos_prefix, held_out_documents, load_documents
from distill_lr.errors import UserInputError, check, first_line
from distill_lr.tasks import BUILTIN_TASK, encode, lm_eval_scores, load_tasks, score_model


def load(folder: Path) -> torch.nn.Module:
    """The whole model, float32 on the CPU, after checking that it fits in the available memory."""
    from transformers import AutoModelForCausalLM

    config = checkpoint_config(folder)
    stored = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    check(stored > 0, f"{folder} holds no *.safetensors weights: give a checkpoint folder with its weights")
    dtype = config.get("dtype", "float32")
    need = stored * (1 if dtype == "float32" else 2) * 1.2  # float32 copies, plus headroom for activations
    available = psutil.virtual_memory().available
    check(
        need <= available,
        f"{folder} needs about {human_bytes(need)} of memory loaded whole in float32, {human_bytes(available)} is available: "
        "score the tasks layer by layer with distill-lr compress eval.tasks=[...] instead",
    )
    if "distill_lr" in config:
        return load_compressed(folder, dtype=torch.float32)
    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False).eval()
    except (OSError, ValueError, KeyError) as err:
        problem = f"{folder} cannot be loaded as a causal LM ({first_line(err)})"
        raise UserInputError(f"{problem}: give a Hugging Face causal LM folder") from None


HELP = "task accuracy of a checkpoint (loads it whole, after a memory check)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a checkpoint folder (or builtin:SmolLM2-135M-Instruct)")
    parser.add_argument("--tasks", nargs="*", default=[BUILTIN_TASK])
    parser.add_argument("--task-examples", type=int, default=200)
    parser.add_argument("--data", default=BUILTIN_TEXT, help="the text the built-in task's held-out documents come from")
    parser.add_argument("--lm-eval", nargs="*", default=[], metavar="TASK", help="lm-eval task names")
    parser.add_argument("--include-path", help="folder of lm-eval task YAML files")
    parser.add_argument("--limit", type=int, help="lm-eval: examples per task")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    folder = resolve_model_dir(args.model)
    model = load(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, config=model.config)  # a compressed folder's config is the base one
    documents = load_documents(args.data) if BUILTIN_TASK in args.tasks else None
    held_out = held_out_documents(len(documents), 0.1, 0) if documents is not None else None
    results = {}
    for task in load_tasks(args.tasks, documents, held_out, args.task_examples):
        score = results[task.name] = score_model(model, encode(task, tokenizer, bos_prefix(tokenizer)))
        print(f"{task.name}: acc {score['acc']:.3f}, acc_norm {score['acc_norm']:.3f} ({score['examples']} examples)")
    if args.lm_eval:
        for name, scores in lm_eval_scores(model, tokenizer, args.lm_eval, args.include_path, args.limit).items():
            results[f"lm-eval:{name}"] = scores
            print(f"lm-eval {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    print(json.dumps(results, indent=2))
    return 0
