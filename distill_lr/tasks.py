"""Multiple-choice and cloze tasks scored by log-likelihood, with lm-eval-harness semantics.

A task is a list of examples ``(prompt, choices, answer)``. Each choice is scored by the summed
log-probability of its tokens after the prompt; ``acc`` counts the examples whose gold choice scores
highest, ``acc_norm`` the same after dividing each score by the choice's length in characters (as
lm-eval's ``acc_norm`` does). Tokenisation follows lm-eval too: a prompt's trailing spaces move to the
continuation, the continuation's tokens are those of ``prompt + choice`` after the prompt's.

Sources: a JSON-lines file of ``{"prompt", "choices", "answer"}`` (``answer``: the index or the text of
the gold choice), or LASER's true/false form ``{"prompt", "answer": true|false}`` (choices " True" and
" False"); and ``builtin:wiki-lastword``, made from the held-out Wikipedia documents (never calibration text).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from distill_lr.builtin import BUILTIN_TEXT
from distill_lr.errors import UserInputError, check
from distill_lr.layerwise import span_logprob

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from distill_lr.data import Documents

BUILTIN_TASK = "builtin:wiki-lastword"
TRUE_FALSE = (" True", " False")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z]{3,}")


@dataclass(frozen=True)
class Example:
    prompt: str
    choices: tuple[str, ...]
    answer: int  # index of the gold choice


@dataclass(frozen=True)
class Task:
    name: str
    examples: list[Example]


def load_task(path: str | Path) -> Task:
    """A task from a JSON-lines file (see the module docstring); a bad line is a one-line error naming it."""
    path = Path(path).expanduser()
    check(path.is_file(), f"task file {path} does not exist: give a .jsonl file of {{prompt, choices, answer}}")
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            examples.append(_example(line, f"{path}:{number}"))
    check(bool(examples), f"task file {path} has no examples")
    return Task(path.stem, examples)


def _example(line: str, where: str) -> Example:
    try:
        row = json.loads(line)
    except ValueError as err:
        raise UserInputError(f"{where} is not JSON ({err.msg}): one object per line") from None
    check(isinstance(row, dict) and isinstance(row.get("prompt"), str), f"{where} has no 'prompt' string")
    answer = row.get("answer")
    if isinstance(answer, bool) and "choices" not in row:  # LASER's true/false form
        return Example(row["prompt"], TRUE_FALSE, 0 if answer else 1)
    choices = row.get("choices")
    check(
        isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices),
        f"{where} has no 'choices' (a list of at least two strings): give them, or a true/false 'answer' alone",
    )
    if isinstance(answer, str):
        check(answer in choices, f"{where}: the answer {answer!r} is not one of its choices")
        answer = choices.index(answer)
    check(isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices), f"{where}: 'answer' must index a choice")
    return Example(row["prompt"], tuple(choices), answer)


def builtin_task(documents: Documents, held_out: list[int], n_examples: int = 200, seed: int = 0) -> Task:
    """Choose a sentence's true last word among 3 other words of the same document (held-out documents only).

    The prompt is the previous sentence and the sentence without its last word; the distractors are
    distinct words of 3+ letters from the same document, drawn with ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    examples: list[Example] = []
    for index in held_out:
        text = documents[index]
        words = sorted({w for w in _WORD.findall(text)})
        sentences = [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]
        for previous, sentence in zip(["", *sentences], sentences, strict=False):
            if len(examples) >= n_examples:
                return Task(BUILTIN_TASK, examples)
            example = _last_word_example(previous, sentence, words, generator)
            if example is not None:
                examples.append(example)
    check(bool(examples), "the held-out documents give no sentence for the built-in task: use more text or data.eval_fraction")
    return Task(BUILTIN_TASK, examples)


def _last_word_example(previous: str, sentence: str, words: list[str], generator: torch.Generator) -> Example | None:
    body, _, last = sentence.rstrip(".!?\"')").rpartition(" ")
    if not 8 <= len(sentence.split()) <= 40 or not _WORD.fullmatch(last):
        return None
    others = [w for w in words if w.lower() != last.lower()]
    if len(others) < 3:
        return None
    distractors = [others[i] for i in torch.randperm(len(others), generator=generator)[:3].tolist()]
    choices = [last, *distractors]
    order = torch.randperm(4, generator=generator).tolist()
    prompt = f"{previous} {body}".strip()
    return Example(prompt, tuple(" " + choices[i] for i in order), order.index(0))


def load_tasks(
    names: list[str], documents: Documents | None = None, held_out: list[int] | None = None, n_examples: int = 200, seed: int = 0
) -> list[Task]:
    """The named tasks: ``builtin:wiki-lastword`` (needs the held-out documents) or JSON-lines files."""
    tasks = []
    for name in names:
        if name == BUILTIN_TASK:
            check(documents is not None and held_out is not None, f"{BUILTIN_TASK} needs the held-out text of {BUILTIN_TEXT}")
            tasks.append(builtin_task(documents, held_out, n_examples, seed))
        else:
            tasks.append(load_task(name))
    return tasks


@dataclass
class EncodedTask:
    """Every (example, choice) pair as one right-padded row of token ids, and where its continuation lies."""

    task: Task
    input_ids: torch.Tensor  # (pairs, length)
    pairs: list[tuple[int, int]]  # (example, choice) of each row
    spans: list[tuple[int, int]]  # continuation tokens: [start, end) of each row

    def score(self, row_logprobs: list[float]) -> dict[str, Any]:
        """``acc`` and ``acc_norm`` from each row's summed continuation log-probability (``layerwise.head_span_logprobs``)."""
        lls: dict[int, list[float]] = {}
        for (example, _choice), value in zip(self.pairs, row_logprobs, strict=True):
            lls.setdefault(example, []).append(value)
        correct = correct_norm = 0
        for example, scores in lls.items():
            gold = self.task.examples[example].answer
            lengths = [len(c) for c in self.task.examples[example].choices]
            correct += max(range(len(scores)), key=scores.__getitem__) == gold
            correct_norm += max(range(len(scores)), key=lambda i: scores[i] / lengths[i]) == gold
        n = len(lls)
        return {"task": self.task.name, "examples": n, "acc": correct / n, "acc_norm": correct_norm / n}


def encode(task: Task, tokenizer: PreTrainedTokenizerBase, prefix: list[int], max_length: int | None = None) -> EncodedTask:
    """Token rows for every choice of every example (``prefix``: BOS where the model's inputs start with it)."""
    rows, pairs, spans = [], [], []
    for e, example in enumerate(task.examples):
        for c, choice in enumerate(example.choices):
            context, continuation = _move_spaces(example.prompt, choice)
            context_ids = prefix + tokenizer(context, add_special_tokens=False)["input_ids"]
            whole = prefix + tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            start = max(len(context_ids), 1)  # the first token is never scored: it has no prediction
            check(len(whole) > start, f"task {task.name}: choice {choice!r} of example {e} has no tokens of its own")
            rows.append(whole)
            pairs.append((e, c))
            spans.append((start, len(whole)))
    length = max(len(r) for r in rows)
    too_long = f"task {task.name} has a row of {length} tokens, above the model's context ({max_length})"
    check(max_length is None or length <= max_length, too_long)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return EncodedTask(task, ids, pairs, spans)


def _move_spaces(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's rule: the context's trailing spaces belong to the continuation."""
    spaces = len(context) - len(context.rstrip())
    return (context[:-spaces], context[-spaces:] + continuation) if spaces else (context, continuation)


@torch.no_grad()
def score_model(model: Any, encoded: EncodedTask, device: torch.device | str = "cpu") -> dict[str, Any]:
    """``encoded``'s scores from a whole loaded model (``evaluate.py``; the compressor scores layer by layer instead)."""
    ids = encoded.input_ids.to(device)
    return encoded.score([span_logprob(model, ids[row], start, end) for row, (start, end) in enumerate(encoded.spans)])


def lm_eval_scores(
    model: Any, tokenizer: Any, tasks: list[str], include_path: str | None = None, limit: int | None = None, batch_size: int = 8
) -> dict[str, dict[str, float]]:
    """lm-eval-harness's own scores of a loaded model (compressed, intervened or dense) on its task names.

    ``include_path``: a folder of the user's task YAML files (e.g. a local JSON dataset), as lm-eval takes it.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserInputError("lm-eval is not installed: pip install lm-eval (or leave out --lm-eval)") from None
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    check(not unknown, f"lm-eval knows no task {unknown[0] if unknown else ''!r}: check the name, or give --include-path with its YAML")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
    return {
        task: {name.split(",")[0]: value for name, value in metrics.items() if isinstance(value, float) and "stderr" not in name}
        for task, metrics in out["results"].items()
    }
