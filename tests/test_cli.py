"""The ``distill-lr`` command: every subcommand listed and documented, the scripts' shim, ``export`` as the library's export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run, run_files

from distill_lr import cli
from distill_lr.checkpoint.export import export_dense

ROOT = Path(__file__).parents[1]


def test_help_lists_every_subcommand_and_each_has_its_own(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    listing = capsys.readouterr().out
    assert all(f"    {name}" in listing for name in cli.COMMANDS) and "usage: distill-lr" in listing
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as done:
            cli.main([name, "--help"])
        assert done.value.code == 0 and f"usage: distill-lr {name}" in capsys.readouterr().out


def test_the_module_and_the_script_shim_are_the_same_command() -> None:
    listed = subprocess.run([sys.executable, "-m", "distill_lr.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "compress" in listed and "export" in listed
    shim = subprocess.run([sys.executable, str(ROOT / "scripts" / "compress.py"), "--help"], capture_output=True, text=True, check=True)
    assert "usage: distill-lr compress" in shim.stdout and "key=value" in shim.stdout


def test_unknown_subcommand_is_one_usage_line(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["compres"])
    assert done.value.code == 2 and "invalid choice: 'compres'" in capsys.readouterr().err


def test_export_writes_what_the_library_writes_and_refuses_a_dense_folder(tmp_path: Path, tiny_llama: Path, corpus: Path, capsys) -> None:
    out = run(tiny_llama, corpus, tmp_path / "out", method="svd")
    assert cli.main(["export", out.output]) == 0
    export_dense(out.output, tmp_path / "library")
    assert run_files(tmp_path / "out-dense") == run_files(tmp_path / "library")  # default folder: <run>-dense
    capsys.readouterr()
    assert cli.main(["export", str(tiny_llama), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a finished distill_lr checkpoint" in err and not (tmp_path / "x").exists()
