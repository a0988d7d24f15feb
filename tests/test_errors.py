"""Bad input gets one line naming the problem and the fix, before any work is lost."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import fails, overrides_for, run
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from distill_lr import prepass
from distill_lr.checkpoint import files
from distill_lr.checkpoint.compressed import load_compressed
from distill_lr.checkpoint.layout import LOCK_NAME
from distill_lr.cli import main
from distill_lr.errors import UserInputError
from distill_lr.testing import write_corpus


def test_missing_model_folder(tmp_path: Path, corpus: Path) -> None:
    fails(tmp_path / "nope", corpus, tmp_path / "out", "does not exist")


def test_folder_without_config(tmp_path: Path, corpus: Path) -> None:
    (tmp_path / "m").mkdir()
    fails(tmp_path / "m", corpus, tmp_path / "out", "has no config.json")


def test_unreadable_config(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    (tiny_llama / "config.json").write_text("{not json")
    fails(tiny_llama, corpus, tmp_path / "out", "config.json is not valid JSON")


def test_not_a_causal_lm(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    (tiny_llama / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 64}))
    fails(tiny_llama, corpus, tmp_path / "out", "not a decoder-only causal LM")


def test_missing_shard(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    shard = sorted(tiny_llama.glob("model-*.safetensors"))[1]
    shard.unlink()
    fails(tiny_llama, corpus, tmp_path / "out", f"shard {shard.name} listed in model.safetensors.index.json is missing")


def test_truncated_shard(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    shard = sorted(tiny_llama.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    fails(tiny_llama, corpus, tmp_path / "out", "is truncated")


@pytest.mark.parametrize("header", [b"{not json", b'{"w": {"dtype": "F32", "shape": [1]}}'], ids=["not-json", "no-offsets"])
def test_a_shard_with_a_broken_header(tmp_path: Path, tiny_llama: Path, corpus: Path, header: bytes) -> None:
    shard = sorted(tiny_llama.glob("model-*.safetensors"))[1]
    shard.write_bytes(len(header).to_bytes(8, "little") + header)
    fails(tiny_llama, corpus, tmp_path / "out", f"{shard} is not a readable safetensors file: re-download or re-copy it")


def test_a_tensor_stored_in_two_shards(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    first, second = sorted(tiny_llama.glob("model-*.safetensors"))[:2]
    stray = load_file(first)
    name = next(iter(stray))
    save_file({**load_file(second), name: stray[name]}, second, metadata={"format": "pt"})
    fails(tiny_llama, corpus, tmp_path / "out", f"tensor '{name}' is stored twice, in {first.name} and in {second.name}")


def test_no_safetensors(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    for path in tiny_llama.glob("model*.safetensors*"):
        path.unlink()
    fails(tiny_llama, corpus, tmp_path / "out", "holds no *.safetensors weights")


def test_rank_above_matrix_size(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    fails(tiny_llama, corpus, tmp_path / "out", "above min(out, in) = 64", **{"ranks.rules": "{layers.0.self_attn.q_proj: 65}"})


def test_a_device_torch_does_not_know(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    fails(tiny_llama, corpus, tmp_path / "out", "device 'tpu' is not a torch device: use cpu, cuda, cuda:N or auto", device="tpu")


def test_a_tokenizer_larger_than_the_vocabulary(tmp_path: Path, tiny_llama: Path) -> None:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 400)}}  # the model has 256 embeddings
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>").save_pretrained(tmp_path / "tok")
    text = write_corpus(tmp_path / "text.jsonl")
    text.write_text(text.read_text().replace("w17 ", "w399 "))
    needle = "gives token id 399 but the model's vocabulary has 256 entries"
    fails(tiny_llama, text, tmp_path / "out", needle, tokenizer=str(tmp_path / "tok"))


def test_empty_calibration_text(tmp_path: Path, tiny_llama: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    fails(tiny_llama, empty, tmp_path / "out", "is empty: give a data.source with text")


def test_too_little_calibration_text(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    fails(tiny_llama, corpus, tmp_path / "out", "need num_sequences=5000", **{"data.num_sequences": 5000})


def test_sequence_longer_than_context(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    fails(tiny_llama, corpus, tmp_path / "out", "above the model's context (256)", **{"data.seq_len": 512})


def test_output_is_input(tiny_llama: Path, corpus: Path) -> None:
    fails(tiny_llama, corpus, tiny_llama, "is the input folder")


def test_output_folder_with_other_files(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    fails(tiny_llama, corpus, tmp_path / "out", "holds no distill_lr run")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_output_folder_with_another_config(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    run(tiny_llama, corpus, tmp_path / "out")
    fails(tiny_llama, corpus, tmp_path / "out", "changed: ranks.target", **{"ranks.target": 0.5})
    report = run(tiny_llama, corpus, tmp_path / "out", overwrite=True, **{"ranks.target": 0.5})
    assert report.params.removed_fraction > 0.45


def test_disk_without_room_is_refused_before_work(tmp_path: Path, tiny_llama: Path, corpus: Path, monkeypatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    fails(tiny_llama, corpus, tmp_path / "out", "not enough disk space")
    assert not (tmp_path / "out").exists()


def test_cli_prints_one_line_and_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["compress", f"model={tmp_path / 'nope'}", f"output={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model folder") and "\n" not in err


def test_cache_dir_that_is_a_file(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    fails(tiny_llama, corpus, tmp_path / "out", f"cache_dir {tmp_path / 'file'} is a file, not a folder", cache_dir=str(tmp_path / "file"))
    assert not (tmp_path / "out").exists()


def test_teacher_cache_that_is_a_file(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    fails(tiny_llama, corpus, tmp_path / "out", "teacher_cache folder", teacher_cache=str(tmp_path / "file"))


# --- the output path, checked before any work ------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_path_that_is_a_file_is_one_line(tmp_path: Path, tiny_llama: Path, corpus: Path, overwrite: bool) -> None:
    (tmp_path / "file").write_text("mine")
    fails(tiny_llama, corpus, tmp_path / "file", f"output folder {tmp_path / 'file'} is a file, not a folder", overwrite=overwrite)
    fails(tiny_llama, corpus, tmp_path / "file" / "sub", f"cannot be created: {tmp_path / 'file'} is a file", overwrite=overwrite)
    assert (tmp_path / "file").read_text() == "mine"


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A folder on a read-only file system (a tmpfs mounted read-only; skipped where mounting is not allowed)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "none", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only file system here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("where", ["new", "the-folder"])
def test_a_read_only_output_is_one_line_naming_it(read_only: Path, tiny_llama: Path, corpus: Path, where: str) -> None:
    out = read_only / "out" if where == "new" else read_only
    fails(tiny_llama, corpus, out, f"cannot write to output folder {out} (Read-only file system)")


def test_a_failed_lock_write_is_one_line_and_leaves_no_folder(tmp_path: Path, tiny_llama: Path, corpus: Path, monkeypatch) -> None:
    real_open = os.open

    def refuse(path, flags, mode=0o777):
        if str(path).endswith(LOCK_NAME):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", refuse)
    fails(tiny_llama, corpus, tmp_path / "a" / "b", f"cannot write to output folder {tmp_path / 'a' / 'b'} (Permission denied)")
    assert not (tmp_path / "a").exists()  # the folders it made for the run went with it


def test_a_dense_export_folder_in_the_way_is_refused_before_any_work(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    (tmp_path / "out-dense").mkdir()
    (tmp_path / "out-dense" / "mine.txt").write_text("mine")
    fails(tiny_llama, corpus, tmp_path / "out", "dense export folder", export_dense="true")
    (tmp_path / "out-dense" / "mine.txt").unlink()
    (tmp_path / "out-dense").rmdir()
    (tmp_path / "out-dense").write_text("a file")
    fails(tiny_llama, corpus, tmp_path / "out", f"dense export folder {tmp_path / 'out-dense'} is a file", export_dense="true")
    assert not (tmp_path / "out").exists()


def test_a_file_system_without_locks_runs_with_a_warning(tmp_path: Path, tiny_llama: Path, corpus: Path, monkeypatch) -> None:
    real_flock = fcntl.flock

    def no_locks(fd, operation):  # on the output folder's lock file only (the datasets library locks its cache too)
        if os.readlink(f"/proc/self/fd/{fd}").endswith(LOCK_NAME):
            raise OSError(errno.ENOLCK, "No locks available")
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="is on a file system without locks .* a second run on it would not be refused"):
        run(tiny_llama, corpus, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file() and not (tmp_path / "out" / LOCK_NAME).exists()


def test_the_output_folder_is_checked_before_the_pre_pass(tmp_path: Path, tiny_llama: Path, corpus: Path, monkeypatch) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    monkeypatch.setattr(prepass, "measure", lambda *a, **k: pytest.fail("the pre-pass ran before the output folder was checked"))
    fails(tiny_llama, corpus, tmp_path / "out", "holds no distill_lr run", **{"ranks.allocation": "loss-aware"})


def test_the_cli_turns_an_os_error_into_one_line(tmp_path: Path, tiny_llama: Path, corpus: Path, monkeypatch, capsys) -> None:
    def broken(*_args, **_kwargs):
        raise OSError(errno.EIO, "Input/output error", str(tmp_path / "out" / "x"))

    monkeypatch.setattr(files, "write_json_atomic", broken)
    assert main(["compress", *overrides_for(tiny_llama, corpus, tmp_path / "out")]) == 2
    err = capsys.readouterr().err  # progress bars, then the one line
    assert err.strip().splitlines()[-1].startswith(f"error: Input/output error at {tmp_path / 'out' / 'x'}: check that path")
    assert "Traceback" not in err


# --- the input ------------------------------------------------------------------------------------------------


def test_a_config_whose_sizes_do_not_match_the_weights(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    config = json.loads((tiny_llama / "config.json").read_text())
    (tiny_llama / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    fails(tiny_llama, corpus, tmp_path / "out", "tensor 'model.embed_tokens.weight' of checkpoint")
    fails(tiny_llama, corpus, tmp_path / "out", "has shape [256, 64] but config.json implies [256, 48]")


def test_a_compressed_folder_is_no_input(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    out = run(tiny_llama, corpus, tmp_path / "out").output
    fails(Path(out), corpus, tmp_path / "again", "is a distill_lr compressed checkpoint, not a dense one")


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_text_that_is_not_utf8_is_named_with_the_byte(tmp_path: Path, tiny_llama: Path, corpus: Path, suffix: str) -> None:
    data = corpus.read_bytes()
    bad = tmp_path / f"latin1{suffix}"
    bad.write_bytes(data[:20] + b"\xff" + data[20:])
    fails(tiny_llama, bad, tmp_path / "out", f"{bad} is not UTF-8 text (byte 0xff at offset 20)")


# --- evaluate.py, load_compressed and spectra.py on bad folders ---------------------------------------------------


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("x"), "is a file, not a model folder"),
        (lambda p: p.mkdir(), "has no config.json"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text("{oops")), "config.json is not valid JSON"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text("[]")), "holds a JSON list, not a config object"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text('{"model_type": "llama"}')), "holds no *.safetensors weights"),
    ],
    ids=["missing", "a-file", "empty", "bad-json", "json-list", "no-weights"],
)
def test_evaluate_on_a_bad_folder_is_one_line(tmp_path: Path, capsys, make, needle: str) -> None:
    make(tmp_path / "m")
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--tasks"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err, err


def test_load_compressed_on_a_missing_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"model folder .*nope does not exist"):
        load_compressed(tmp_path / "nope")


def test_spectra_compare_with_a_compressed_folder_is_one_line_without_a_prompt(
    tmp_path: Path, tiny_llama: Path, corpus: Path, capsys, monkeypatch
) -> None:
    out = run(tiny_llama, corpus, tmp_path / "out").output
    monkeypatch.setattr("builtins.input", lambda *_: pytest.fail("asked the user a question"))
    args = ["--model", str(tiny_llama), "--compare", out, "--activations", "0", "--out", str(tmp_path / "spectra")]
    assert main(["spectra", *args]) == 2
    captured = capsys.readouterr()
    assert "is a distill_lr compressed checkpoint" in captured.err and "[y/N]" not in captured.out + captured.err
