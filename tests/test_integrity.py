"""Nothing lost, nothing silently wrong: changed files are detected, overwrite deletes only a run's own files, broken
inputs fail in one line naming the problem, and a run killed at any point resumes to the same bytes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fails, folder_state, overrides_for, run, run_files
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BertConfig, BertLMHeadModel

from distill_lr import cli
from distill_lr.analysis.sweep import Model
from distill_lr.checkpoint import compressed, export, files
from distill_lr.checkpoint.layout import LOCK_NAME, MANIFEST_NAME, layer_file
from distill_lr.checkpoint.reader import read_header
from distill_lr.config import load_config
from distill_lr.errors import UserInputError
from distill_lr.testing import save_tiny, word_tokenizer, write_corpus


def flip_bytes(path: Path, count: int = 1000) -> None:
    """Invert ``count`` bytes in the second half of a file: same size, other content."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    path.write_bytes(bytes(data))


def edit_tensor(folder: Path, name: str, change) -> None:
    """Rewrite the shard that holds ``name`` with ``change(tensor)`` in its place."""
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name] = change(tensors[name].clone())
            save_file(tensors, shard, metadata={"format": "pt"})
            return
    raise AssertionError(name)


# --- integrity on resume and load ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["whiten", "distill"])
def test_a_changed_layer_file_is_recomputed_with_a_warning(tmp_path: Path, tiny_llama: Path, corpus: Path, method: str) -> None:
    unbroken = run(tiny_llama, corpus, tmp_path / "unbroken", method=method)
    out = tmp_path / "flipped"
    run(tiny_llama, corpus, out, method=method)
    size = (out / layer_file(1)).stat().st_size
    flip_bytes(out / layer_file(1))
    assert (out / layer_file(1)).stat().st_size == size
    with pytest.raises(UserInputError, match=layer_file(1)):
        compressed.load_compressed(out)
    with pytest.warns(UserWarning, match=rf"{layer_file(1)} has changed since it was written"):
        again = run(tiny_llama, corpus, out, method=method)
    assert [layer.resumed for layer in again.layers] == [True, False, True]
    assert run_files(out) == run_files(Path(unbroken.output))
    compressed.load_compressed(out)  # verified again


def test_replaced_input_weights_are_another_model(tmp_path: Path, corpus: Path) -> None:
    model = save_tiny(tmp_path / "model", "llama", seed=0)
    run(model, corpus, tmp_path / "out")
    sizes = {p.name: p.stat().st_size for p in model.glob("*.safetensors")}
    shutil.rmtree(model)
    save_tiny(model, "llama", seed=1)  # other weights, the same names, shapes and file sizes
    assert {p.name: p.stat().st_size for p in model.glob("*.safetensors")} == sizes
    fails(model, corpus, tmp_path / "out", "holds a run on another input model")


def test_load_compressed_names_a_truncated_or_missing_file(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    out = Path(run(tiny_llama, corpus, tmp_path / "out").output)
    data = (out / layer_file(2)).read_bytes()
    (out / layer_file(2)).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match=rf"{layer_file(2)} is truncated"):
        compressed.load_compressed(out)
    (out / layer_file(2)).unlink()
    with pytest.raises(UserInputError, match=rf"{layer_file(2)}, named in .* is missing"):
        compressed.load_compressed(out)


@pytest.mark.parametrize("name", [MANIFEST_NAME, "model.safetensors.index.json"])
def test_load_compressed_names_a_broken_manifest_or_index(tmp_path: Path, tiny_llama: Path, corpus: Path, name: str) -> None:
    out = Path(run(tiny_llama, corpus, tmp_path / "out").output)
    (out / name).write_text('{"layers": [')
    with pytest.raises(UserInputError, match=rf"{MANIFEST_NAME} is unreadable") as err:
        compressed.load_compressed(out)
    assert "\n" not in str(err.value)


def test_a_config_with_fewer_layers_than_the_checkpoint_is_refused(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    config = json.loads((tiny_llama / "config.json").read_text())
    (tiny_llama / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    needle = f"checkpoint {tiny_llama} holds tensors of decoder layer 2 but config.json has num_hidden_layers=2"
    fails(tiny_llama, corpus, tmp_path / "out", needle)
    assert not (tmp_path / "out").exists()


def test_the_analysis_commands_refuse_a_truncated_config_too(tmp_path: Path, tiny_llama: Path, capsys) -> None:
    config = json.loads((tiny_llama / "config.json").read_text())
    (tiny_llama / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(UserInputError, match="holds tensors of decoder layer 2 but config.json has num_hidden_layers=2"):
        Model.open(tiny_llama, torch.device("cpu"), torch.float32, batch_size=4)  # the LASER sweep's streams
    assert cli.main(["spectra", "--model", str(tiny_llama), "--activations", "0", "--out", str(tmp_path / "s")]) == 2
    assert "num_hidden_layers=2" in capsys.readouterr().err


def test_other_text_under_the_same_path_is_another_run(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    out = tmp_path / "out"
    run(tiny_llama, corpus, out)
    (out / "config.json").unlink()  # as if stopped before the end: a resume would reuse the layers
    before = folder_state(out)
    write_corpus(corpus, seed=1)  # the same file name, other text
    fails(tiny_llama, corpus, out, f"output folder {out} holds a run calibrated on other text")
    assert folder_state(out) == before
    write_corpus(corpus, seed=0)  # the text back: the run resumes
    assert all(layer.resumed for layer in run(tiny_llama, corpus, out).layers)


def test_a_tensor_the_model_does_not_use_is_named(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    shard = sorted(tiny_llama.glob("model-*.safetensors"))[0]
    save_file({**load_file(shard), "model.vision_tower.proj.weight": torch.zeros(4, 4)}, shard, metadata={"format": "pt"})
    needle = "holds 1 tensor(s) that the 'llama' model of its config.json does not use (e.g. 'model.vision_tower.proj.weight')"
    fails(tiny_llama, corpus, tmp_path / "out", needle)


def flip_tensor_bytes(path: Path, suffix: str, count: int = 64) -> None:
    """Invert ``count`` bytes inside the first tensor of a safetensors file whose name ends with ``suffix``."""
    name, info = next((k, v) for k, v in read_header(path).items() if k.endswith(suffix))
    data = bytearray(path.read_bytes())
    start = info["data_offsets"][0]
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    path.write_bytes(bytes(data))


def test_a_damaged_quantized_file_is_refused_by_the_remote_code_and_the_export(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    out = Path(run(tiny_llama, corpus, tmp_path / "out", method="qlr", **{"quant.bits": 4, "quant.group_size": 16}).output)
    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)  # intact: loads
    flip_tensor_bytes(out / layer_file(1), ".qweight")
    with pytest.raises(ValueError, match=rf"{layer_file(1)} has changed since it was written"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    with pytest.raises(UserInputError, match=rf"{layer_file(1)} has changed since it was written"):
        export.export_dense(out, tmp_path / "dense")
    assert not (tmp_path / "dense").exists()
    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, distill_lr_verify=False)  # the documented way around it


def test_a_truncated_or_deleted_layer_file_is_recomputed_with_a_warning(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    out = tmp_path / "out"
    run(tiny_llama, corpus, out)
    unbroken = run_files(out)
    (out / "config.json").unlink()  # as if stopped before the end
    data = (out / layer_file(1)).read_bytes()
    (out / layer_file(1)).write_bytes(data[:100])
    (out / layer_file(2)).unlink()
    with pytest.warns(UserWarning) as caught:
        again = run(tiny_llama, corpus, out)
    said = [str(w.message) for w in caught]
    assert any(f"{layer_file(1)} has 100 bytes, not the {len(data):,} written: layer 1 is computed again" in m for m in said), said
    assert any(f"{layer_file(2)} is missing: layer 2 is computed again" in m for m in said), said
    assert [layer.resumed for layer in again.layers] == [True, False, False] and run_files(out) == unbroken


def test_two_unbroken_runs_write_the_same_files_but_report_json(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    a, b = (run(tiny_llama, corpus, tmp_path / name, method="distill", **{"ranks.allocation": "loss-aware"}) for name in "ab")
    assert run_files(Path(a.output)) == run_files(Path(b.output))
    config = json.loads((Path(a.output) / "config.json").read_text())["distill_lr"]["allocation"]
    assert "prepass_seconds" not in config and "prepass_seconds" in a.allocation  # timings: report.json only


# --- one run per folder ----------------------------------------------------------------------------------------


def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_first(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    out = tmp_path / "out"
    run(tiny_llama, corpus, out)
    before = folder_state(out)
    with files.claimed_folder(out):  # as a first run holds it
        fails(tiny_llama, corpus, out, f"output folder {out} is in use by another distill_lr run (pid {os.getpid()} on ")
        fails(tiny_llama, corpus, out, "is in use by another distill_lr run", overwrite=True)
    assert folder_state(out) == before  # the lock file went with its holder
    (out / LOCK_NAME).write_text("pid 1 on a machine that died")  # a killed run's lock file: no process holds it
    again = run(tiny_llama, corpus, out)
    assert all(layer.resumed for layer in again.layers) and not (out / LOCK_NAME).exists()


def test_two_processes_on_one_folder_one_waits_out_the_other(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    holder = "import sys, time; from pathlib import Path; from distill_lr.checkpoint import files\n"
    holder += "with files.claimed_folder(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        fails(tiny_llama, corpus, tmp_path / "out", f"is in use by another distill_lr run (pid {child.pid} on ")
    finally:
        child.kill()
        child.wait()
    run(tiny_llama, corpus, tmp_path / "out")  # the holder died: its lock went with it


# --- safe overwrite --------------------------------------------------------------------------------------------


def test_output_around_the_input_is_refused_even_with_overwrite(tmp_path: Path, corpus: Path) -> None:
    parent = tmp_path / "models"
    model = save_tiny(parent / "llama")
    (parent / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    fails(model, corpus, parent, "contains the input folder", overwrite=True)
    fails(model, corpus, model / "inside", "lies inside the input folder", overwrite=True)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert (parent / "notes.txt").read_text() == "mine"


def test_output_apart_from_the_teacher_cache(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    fails(tiny_llama, corpus, tmp_path / "teacher" / "out", "lies inside the teacher cache", teacher_cache=str(tmp_path / "teacher"))
    fails(tiny_llama, corpus, tmp_path / "out", "contains the teacher cache", teacher_cache=str(tmp_path / "out" / "teacher"))


def test_overwrite_refuses_a_folder_without_a_run(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("years of work")
    fails(tiny_llama, corpus, tmp_path / "out", "holds no distill_lr run (it has thesis.tex)", overwrite=True)
    assert (tmp_path / "out" / "thesis.tex").read_text() == "years of work"


def test_overwrite_deletes_only_the_runs_own_files(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    out = tmp_path / "out"
    run(tiny_llama, corpus, out)
    (out / "notes.txt").write_text("mine")
    (out / "plots").mkdir()
    report = run(tiny_llama, corpus, out, overwrite=True, **{"ranks.target": 0.5})
    assert report.params.removed_fraction > 0.45
    assert (out / "notes.txt").read_text() == "mine" and (out / "plots").is_dir()
    assert not any(layer.resumed for layer in report.layers)


def test_export_dense_takes_str_and_replaces_only_an_earlier_export(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    out = run(tiny_llama, corpus, tmp_path / "out").output
    dst = str(tmp_path / "dense")
    export.export_dense(out, dst)
    (Path(dst) / "notes.txt").write_text("mine")
    export.export_dense(out, dst)  # over the earlier export: its files only
    assert (Path(dst) / "notes.txt").read_text() == "mine" and (Path(dst) / "config.json").is_file()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.bin").write_bytes(b"x")
    with pytest.raises(UserInputError, match="holds no distill_lr export"):
        export.export_dense(out, tmp_path / "other")
    with pytest.raises(UserInputError, match="lies inside the compressed checkpoint"):
        export.export_dense(out, Path(out) / "dense")
    assert (tmp_path / "other" / "data.bin").read_bytes() == b"x"


# --- bad input, one line each ----------------------------------------------------------------------------------


BROKEN_MANIFESTS = {
    "empty": "",
    "truncated": '{"settings": {',
    "no-keys": '{"layers": {}}',
    "a-list": "[1, 2]",
    "settings-a-list": '{"settings": [1], "input": "x", "layers": {}}',
    "a-layer-without-its-file": '{"settings": {}, "input": "x", "layers": {"0": {"bytes": 1, "sha256": "x", "report": {}}}}',
}


@pytest.mark.parametrize("content", list(BROKEN_MANIFESTS.values()), ids=list(BROKEN_MANIFESTS))
def test_a_broken_manifest_is_one_line_and_overwrite_starts_over(tmp_path: Path, tiny_llama: Path, corpus: Path, content: str) -> None:
    run(tiny_llama, corpus, tmp_path / "out")
    (tmp_path / "out" / MANIFEST_NAME).write_text(content)
    fails(tiny_llama, corpus, tmp_path / "out", "is unreadable or incomplete")
    report = run(tiny_llama, corpus, tmp_path / "out", overwrite=True)
    assert not any(layer.resumed for layer in report.layers)


def test_malformed_yaml_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("ranks:\n  target: [0.2\nmethod: distill\n")
    with pytest.raises(UserInputError, match=r"is not valid YAML \(line \d+, column \d+") as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_missing_tokenizer_files_are_named(tmp_path: Path, corpus: Path) -> None:
    model = save_tiny(tmp_path / "llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    fails(model, corpus, tmp_path / "out", "has no tokenizer files")


def test_a_bert_checkpoint_is_not_a_decoder_only_lm(tmp_path: Path, corpus: Path) -> None:
    config = BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, is_decoder=True)
    BertLMHeadModel(config).save_pretrained(tmp_path / "bert")
    word_tokenizer().save_pretrained(tmp_path / "bert")
    fails(tmp_path / "bert", corpus, tmp_path / "out", "is not a decoder-only LM")


@pytest.mark.parametrize(
    ("tensor", "value", "extra"),
    [
        ("model.layers.1.self_attn.q_proj.weight", float("nan"), {}),
        ("model.layers.2.mlp.down_proj.weight", float("inf"), {"dtype": "float32"}),
        ("model.layers.0.mlp.up_proj.weight", float("nan"), {"ranks.rules": '{"layers.0.**": skip}'}),  # a layer kept dense
        ("model.embed_tokens.weight", float("nan"), {}),
    ],
    ids=["nan-q", "inf-down-float32", "nan-in-a-dense-layer", "nan-embedding"],
)
def test_non_finite_weights_are_named_before_use(tmp_path: Path, corpus: Path, tensor: str, value: float, extra: dict) -> None:
    model = save_tiny(tmp_path / "llama")

    def poison(t: torch.Tensor) -> torch.Tensor:
        t.view(-1)[7] = value
        return t

    edit_tensor(model, tensor, poison)
    fails(model, corpus, tmp_path / "out", f"tensor '{tensor}' of checkpoint {model} holds 1 NaN or inf", **extra)
    layer = int(tensor.split(".")[2]) if ".layers." in tensor else 0
    assert not (tmp_path / "out" / layer_file(layer)).exists()  # the layers below may be written: they resume


def test_an_overflow_names_the_layer_and_fits_the_dtype(tmp_path: Path, corpus: Path) -> None:
    model = save_tiny(tmp_path / "llama")
    edit_tensor(model, "model.layers.1.mlp.down_proj.weight", lambda t: t * 1e6)  # finite in float16, its outputs are not
    needle = "decoder layer 1's dense outputs hold inf or NaN in float16: the layer overflows float16: run with dtype=float32"
    fails(model, corpus, tmp_path / "a", needle, dtype="float16")
    run(model, corpus, tmp_path / "b", dtype="float32")  # fits in float32: no error


def test_a_full_disk_mid_run_says_how_much_and_resumes(tmp_path: Path, tiny_llama: Path, corpus: Path, monkeypatch) -> None:
    unbroken = run(tiny_llama, corpus, tmp_path / "unbroken")
    real = files.save_tensors_atomic

    def full_at_layer_1(tensors, path, metadata=None):
        if path.name == layer_file(1):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, metadata)

    monkeypatch.setattr(files, "save_tensors_atomic", full_at_layer_1)
    fails(tiny_llama, corpus, tmp_path / "out", "the disk filled up while writing")
    with pytest.raises(UserInputError, match=r"still needs about [\d.]+ KiB .* it resumes after the 1 finished layer"):
        run(tiny_llama, corpus, tmp_path / "out")
    monkeypatch.setattr(files, "save_tensors_atomic", real)
    resumed = run(tiny_llama, corpus, tmp_path / "out")
    assert resumed.layers[0].resumed and run_files(tmp_path / "out") == run_files(Path(unbroken.output))


def test_sizes_are_written_in_the_unit_that_shows_them() -> None:
    assert files.human_bytes(812) == "812 B"
    assert files.human_bytes(5000) == "4.88 KiB"
    assert files.human_bytes(150 * 2**20) == "150 MiB"
    assert files.human_bytes(1.25 * 2**30) == "1.25 GiB"


# --- SIGKILL at chosen moments ---------------------------------------------------------------------------------

KILLED = """
import os, signal, sys
from distill_lr import driver
from distill_lr.checkpoint import compressed, export, files
from distill_lr.checkpoint.layout import layer_file
from distill_lr.config import load_config

point, overrides = sys.argv[1], sys.argv[2:]
die = lambda *_args, **_kwargs: os.kill(os.getpid(), signal.SIGKILL)
if point == "during-layer-1":  # layer 1 is being computed; layer 0 is on disk and in the manifest
    real_layer = driver.fresh_layer
    driver.fresh_layer = lambda run, index, *a: (run.writer.drain(), die()) if index == 1 else real_layer(run, index, *a)
elif point == "during-a-write":  # half of layer 1's bytes are in its temporary file
    real_writer = files.atomic_writer
    class Half:
        def __init__(self, fh): self.fh, self.written = fh, 0
        def write(self, block):
            self.fh.write(block); self.fh.flush(); self.written += 1
            if self.written == 3: die()
    from contextlib import contextmanager
    @contextmanager
    def half_then_die(path):
        with real_writer(path) as fh:
            yield Half(fh) if path.name == layer_file(1) else fh
    files.atomic_writer = half_then_die
elif point == "after-the-index":  # the index is written, config.json and report.json are not
    real_index = compressed.write_index
    compressed.write_index = lambda *a: (real_index(*a), die())
driver.compress(load_config(None, overrides))
"""


@pytest.mark.parametrize("point", ["during-layer-1", "during-a-write", "after-the-index"])
def test_a_run_killed_at_any_point_resumes_to_the_same_bytes(tmp_path: Path, tiny_llama: Path, corpus: Path, point: str) -> None:
    unbroken = run(tiny_llama, corpus, tmp_path / "unbroken", method="distill")
    overrides = overrides_for(tiny_llama, corpus, tmp_path / "out", method="distill")
    child = subprocess.run([sys.executable, "-c", KILLED, point, *overrides], capture_output=True, text=True, env=os.environ)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert not (tmp_path / "out" / "config.json").exists()  # a killed run never looks complete
    resumed = run(tiny_llama, corpus, tmp_path / "out", method="distill")
    assert resumed.layers[0].resumed
    assert run_files(tmp_path / "out") == run_files(Path(unbroken.output))
    assert json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["complete"]
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # the killed write's temporary file too


def test_written_files_have_the_usual_permissions(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    out = Path(run(tiny_llama, corpus, tmp_path / "out").output)
    (tmp_path / "plain").write_text("x")
    usual = (tmp_path / "plain").stat().st_mode & 0o777
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: usual for p in out.iterdir()}
