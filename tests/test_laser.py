"""LASER interventions, the streamed sweep and the task scorer, checked against direct computations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run
from transformers import AutoModelForCausalLM

from distill_lr import cli
from distill_lr.analysis import laser
from distill_lr.analysis.sweep import Model, _dense_pass, run_sweep
from distill_lr.checkpoint.compressed import load_compressed
from distill_lr.checkpoint.reader import LayerLoader
from distill_lr.commands import evaluate
from distill_lr.data import split_documents
from distill_lr.errors import UserInputError
from distill_lr.factorize import break_even_rank
from distill_lr.tasks import BUILTIN_TASK, Example, Task, builtin_task, encode, load_task
from distill_lr.testing import save_tiny, word_tokenizer


def tiny_task() -> Task:
    return Task(
        "tiny",
        [
            Example("w5 w9 w13", (" w20", " w21 w22", " w23"), 1),
            Example("w40 w41 ", ("w42", "w43"), 0),  # a trailing space moves to the continuation, as in lm-eval
            Example("w7", (" w8", " w9"), 1),
        ],
    )


def write_task(path: Path) -> Path:
    """``tiny_task`` as a JSON-lines file."""
    rows = [{"prompt": e.prompt, "choices": list(e.choices), "answer": e.answer} for e in tiny_task().examples]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def opened(folder: Path, task: Task | None = None) -> Model:
    m = Model.open(folder, torch.device("cpu"), torch.float32, batch_size=4)
    m.add_stream("text", torch.randint(3, 200, (4, 16), generator=torch.Generator().manual_seed(0)))
    if task is not None:
        encoded = encode(task, word_tokenizer(), [])
        m.add_stream(task.name, encoded.input_ids, encoded)
    return m


def test_task_scores_equal_a_hand_computed_log_likelihood(tiny_llama: Path) -> None:
    task = tiny_task()
    m = opened(tiny_llama, task)
    loader = LayerLoader(m.reader, m.layers, m.prefix, read_ahead=False)
    streamed = _dense_pass(m, loader, set())[0]["tasks"]["tiny"]
    loader.close()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = word_tokenizer()
    correct = correct_norm = 0
    for example in task.examples:
        scores = []
        for choice in example.choices:
            context = example.prompt.rstrip()
            continuation = example.prompt[len(context) :] + choice
            ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
            whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(float(logprobs[t - 1, whole[t]]) for t in range(len(ctx), len(whole))))
        correct += max(range(len(scores)), key=scores.__getitem__) == example.answer
        correct_norm += max(range(len(scores)), key=lambda i: scores[i] / len(example.choices[i])) == example.answer
    assert streamed["acc"] == pytest.approx(correct / 3) and streamed["acc_norm"] == pytest.approx(correct_norm / 3)
    encoded = encode(task, tokenizer, [])
    assert encoded.spans[3] == (2, 3)  # " w42", the moved space included: the token after "w40 w41"


def test_rho_one_equals_the_dense_model(tiny_llama: Path) -> None:
    result = run_sweep(opened(tiny_llama, tiny_task()), [1], ["q", "mlp_out"], [1.0])
    for row in result.rows:
        assert row["loss"] == result.dense["loss"] and row["tasks"] == result.dense["tasks"]


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_the_sweeps_cached_evaluation_equals_a_full_re_evaluation(tmp_path: Path, kind: str) -> None:
    folder = save_tiny(tmp_path / kind, kind)
    result = run_sweep(opened(folder, tiny_task()), [1], ["mlp_out"], [0.25])
    swept = result.rows[0]
    assert swept["loss"] != result.dense["loss"]  # the intervention changed the model
    m = opened(folder, tiny_task())  # the whole stack again, from the embeddings, with layer 1 intervened
    hidden = m.embedded()
    loader = LayerLoader(m.reader, m.layers, m.prefix, read_ahead=False)
    for index in range(len(m.layers)):
        layer = loader.load(index, m.device, m.dtype)
        if index == 1:
            for matrix in laser.weights(layer, "mlp_out").values():
                laser.intervene_(matrix, 0.25)
        m.forward_(layer, index, hidden)
        layer.to("meta")
    loader.close()
    full = m.metrics(hidden)
    assert swept["loss"] == pytest.approx(full["loss"], rel=1e-6) and swept["tasks"] == full["tasks"]


def test_the_sweep_runs_only_the_layers_above_each_intervention(tiny_llama: Path) -> None:
    result = run_sweep(opened(tiny_llama), [0, 2], ["q", "v"], [0.5, 0.25])
    assert len(result.rows) == 8
    assert result.layer_forwards == 3 + 4 * 3 + 4 * 1  # dense, then 4 configs from layer 0 and 4 from layer 2
    assert result.naive_layer_forwards == 3 + 8 * 3


def test_higher_order_keeps_the_smallest_components() -> None:
    W = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    full = torch.linalg.svdvals(W)
    lower, higher = W.clone(), W.clone()
    assert laser.intervene_(lower, 0.25) == 2 and laser.intervene_(higher, 0.25, higher=True) == 2
    assert torch.allclose(torch.linalg.svdvals(lower)[:2], full[:2], atol=1e-5)
    assert torch.allclose(torch.linalg.svdvals(higher)[:2], full[-2:], atol=1e-5)
    assert laser.intervene_(W, 1.0) == 8 and torch.equal(W, W.clone())


def test_written_intervention_is_factorised_below_break_even_and_loads(tmp_path: Path, tiny_llama: Path) -> None:
    out = tmp_path / "laser"
    report = laser.write_intervened(tiny_llama, out, laser.Intervention(2, ("mlp_out", "q"), 0.1))
    down, q = report["matrices"]["model.layers.2.mlp.down_proj"], report["matrices"]["model.layers.2.self_attn.q_proj"]
    assert down["stored"] == q["stored"] == "factorised" and down["rank"] == 7 and q["rank"] == 7  # ceil(0.1 * 64)
    assert report["parameter_change"] == (7 * (64 + 128) - 64 * 128) + (7 * 128 - 64 * 64)
    wide = laser.write_intervened(tiny_llama, tmp_path / "wide", laser.Intervention(2, ("mlp_out",), 0.9))
    info = wide["matrices"]["model.layers.2.mlp.down_proj"]
    assert info["rank"] >= break_even_rank(64, 128) and info["stored"] == "dense-shaped" and wide["parameter_change"] == 0
    ids = torch.randint(3, 200, (1, 10))
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        layer = dense.model.layers[2]
        laser.intervene_(layer.mlp.down_proj.weight, 0.1)
        laser.intervene_(layer.self_attn.q_proj.weight, 0.1)
        expected = dense(ids).logits
        loaded = load_compressed(out)(ids).logits
        remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)(ids).logits
    assert torch.allclose(loaded, expected, atol=1e-5) and torch.equal(loaded, remote)
    assert json.loads((out / "config.json").read_text())["distill_lr"]["method"] == "laser"


def test_bad_input(tmp_path: Path, tiny_llama: Path) -> None:
    with pytest.raises(UserInputError, match="unknown module type 'fc9'"):
        run_sweep(opened(tiny_llama), [0], ["fc9"], [0.5])
    with pytest.raises(UserInputError, match=r"rho must be in \(0, 1\]"):
        run_sweep(opened(tiny_llama), [0], ["q"], [1.5])
    with pytest.raises(UserInputError, match="layers must be in"):
        run_sweep(opened(tiny_llama), [7], ["q"], [0.5])
    bad = tmp_path / "task.jsonl"
    bad.write_text('{"prompt": "a", "answer": 0}\n')
    with pytest.raises(UserInputError, match=r"task.jsonl:1 has no 'choices'"):
        load_task(bad)


def test_task_files_take_indices_texts_and_true_false(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    lines = [
        {"prompt": "2+2=", "choices": [" 3", " 4"], "answer": 1},
        {"prompt": "sky is", "choices": [" blue", " green"], "answer": " blue"},
        {"prompt": "Paris is in France.", "answer": True},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    task = load_task(path)
    assert [e.answer for e in task.examples] == [1, 0, 0] and task.examples[2].choices == (" True", " False")


def test_builtin_task_comes_from_held_out_documents_only() -> None:
    docs = [f"Document {i} talks about apples and pears at length. " * 3 + f"The fruit of document {i} is banana{i}." for i in range(20)]
    held_out, calibration = split_documents(len(docs), 0.2, torch.Generator().manual_seed(0))
    task = builtin_task(docs, held_out, n_examples=50)
    assert task.name == BUILTIN_TASK and task.examples
    for example in task.examples:
        gold = example.choices[example.answer].strip()
        assert any(gold in docs[i] for i in held_out) and not any(f"banana{i}." in example.prompt for i in calibration)


def test_compress_reports_task_accuracy_before_and_after(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:

    path = write_task(tmp_path / "tiny.jsonl")
    report = run(tiny_llama, corpus, tmp_path / "out", tokenizer=str(tiny_llama), **{"eval.tasks": f"[{path}]"})
    (scores,) = report.tasks
    m = opened(tiny_llama, load_task(path))
    loader = LayerLoader(m.reader, m.layers, m.prefix, read_ahead=False)
    dense = _dense_pass(m, loader, set())[0]["tasks"]["tiny"]
    loader.close()
    assert scores["task"] == "tiny" and scores["dense"] == dense and scores["compressed"]["examples"] == 3
    assert "tiny acc / acc_norm (3 examples)" in report.summary_table()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["tasks"][0]["dense"] == dense


LM_EVAL_TASK = """task: tiny_json
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_lm_eval_gives_our_scores_on_a_local_task(tmp_path: Path, tiny_llama: Path) -> None:
    pytest.importorskip("lm_eval")
    from distill_lr.tasks import lm_eval_scores, score_model

    path = write_task(tmp_path / "tiny.jsonl")
    (tmp_path / "yaml").mkdir()
    (tmp_path / "yaml" / "tiny_json.yaml").write_text(LM_EVAL_TASK.format(path=path))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    theirs = lm_eval_scores(model, word_tokenizer(), ["tiny_json"], include_path=str(tmp_path / "yaml"), batch_size=1)["tiny_json"]
    ours = score_model(model, encode(load_task(path), word_tokenizer(), []))
    assert theirs["acc"] == pytest.approx(ours["acc"]) and theirs["acc_norm"] == pytest.approx(ours["acc_norm"])
    with pytest.raises(UserInputError, match="lm-eval knows no task 'no_such_task'"):
        lm_eval_scores(model, word_tokenizer(), ["no_such_task"])


def test_evaluate_command_scores_a_compressed_folder_and_refuses_what_does_not_fit(
    tmp_path: Path, tiny_llama: Path, corpus: Path, monkeypatch, capsys
) -> None:
    path = write_task(tmp_path / "tiny.jsonl")
    out = run(tiny_llama, corpus, tmp_path / "out", tokenizer=str(tiny_llama), **{"eval.tasks": f"[{path}]"})
    assert cli.main(["evaluate", "--model", out.output, "--tasks", str(path)]) == 0
    printed = capsys.readouterr().out
    scores = json.loads(printed[printed.index("\n{") + 1 :])
    assert scores["tiny"] == out.tasks[0]["compressed"]  # the whole-model scorer agrees with the layer-by-layer one
    monkeypatch.setattr(evaluate.psutil, "virtual_memory", lambda: type("M", (), {"available": 1000})())
    assert cli.main(["evaluate", "--model", out.output, "--tasks", str(path)]) == 2
    assert "needs about" in capsys.readouterr().err


def test_the_laser_command_sweeps_plots_and_writes_the_best(tmp_path: Path, tiny_llama: Path, corpus: Path, capsys) -> None:
    task = write_task(tmp_path / "tiny.jsonl")
    common = ["laser", "--model", str(tiny_llama)]
    sweep = ["sweep", "--layers", "1", "2", "--types", "q", "mlp_out", "--rhos", "0.5", "0.1", "--tasks", str(task), "--data", str(corpus)]
    sweep += ["--eval-sequences", "4", "--seq-len", "16", "--out", str(tmp_path / "out"), "--write-best", str(tmp_path / "best")]
    assert cli.main(common + sweep) == 0
    printed = capsys.readouterr().out
    assert "best per module type (by acc)" in printed and "layer passes instead of" in printed
    result = json.loads((tmp_path / "out" / "laser_sweep.json").read_text())
    assert len(result["rows"]) == 8 and result["layer_forwards"] == 3 + 4 * 2 + 4 * 1
    assert (tmp_path / "out" / "laser_sweep.png").stat().st_size > 0
    assert json.loads((tmp_path / "best" / "config.json").read_text())["distill_lr"]["method"] == "laser"
    load_compressed(tmp_path / "best")
    assert cli.main(common + ["apply", "--layer", "9", "--types", "q", "--output", str(tmp_path / "x")]) == 2
    assert "outside the model's 3 decoder layers" in capsys.readouterr().err
