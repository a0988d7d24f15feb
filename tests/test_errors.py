"""Bad input gets one line naming the problem and the fix, before any work is lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import fails, run

from distill_lr.cli import main


def test_missing_model_folder(tmp_path: Path, corpus: Path) -> None:
    fails(tmp_path / "nope", corpus, tmp_path / "out", "does not exist")


def test_folder_without_config(tmp_path: Path, corpus: Path) -> None:
    (tmp_path / "m").mkdir()
    fails(tmp_path / "m", corpus, tmp_path / "out", "has no config.json")


def test_unreadable_config(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    (tiny_llama / "config.json").write_text("{not json")
    fails(tiny_llama, corpus, tmp_path / "out", "cannot be read as a transformers config")


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


def test_no_safetensors(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    for path in tiny_llama.glob("model*.safetensors*"):
        path.unlink()
    fails(tiny_llama, corpus, tmp_path / "out", "holds no *.safetensors weights")


def test_rank_above_matrix_size(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    fails(tiny_llama, corpus, tmp_path / "out", "above min(out, in) = 64", **{"ranks.rules": "{layers.0.self_attn.q_proj: 65}"})


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
    assert main([f"model={tmp_path / 'nope'}", f"output={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model folder") and "\n" not in err


def test_teacher_cache_that_is_a_file(tmp_path: Path, tiny_llama: Path, corpus: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    fails(tiny_llama, corpus, tmp_path / "out", "teacher_cache folder", teacher_cache=str(tmp_path / "file"))
