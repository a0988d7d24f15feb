"""The resume manifest kept beside the weights: which layers are written, for which config and input, with their hashes.

A folder with a manifest holds a distill_lr run: the only kind of folder ``overwrite=true`` clears,
and then only of the files such a run writes.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from distill_lr.checkpoint import files
from distill_lr.checkpoint.layout import LOCK_NAME, MANIFEST_NAME, written_by_a_run
from distill_lr.errors import UserInputError, first_line
from distill_lr.modeling.hf_modeling import file_sha256

_ENTRY = {"file": str, "bytes": int, "sha256": str, "report": dict}  # a finished layer's record


def _check_shape(data: Any) -> None:
    """Raise ``ValueError`` naming the first part of a manifest that is not as a run writes it (a hand edit, a bad copy)."""
    if not isinstance(data, dict) or not {"settings", "input", "layers"} <= data.keys():
        raise ValueError("its keys are missing")
    if not isinstance(data["settings"], dict) or not isinstance(data["input"], str) or not isinstance(data["layers"], dict):
        raise ValueError("settings, input or layers is of the wrong type")
    for key, entry in data["layers"].items():
        if not key.isdigit() or not isinstance(entry, dict) or any(not isinstance(entry.get(k), t) for k, t in _ENTRY.items()):
            raise ValueError(f"the record of layer {key!r} is incomplete")
    if not isinstance(data.get("plan", {}), dict) or not isinstance(data.get("stages", {}), dict):
        raise ValueError("plan or stages is of the wrong type")


class RunManifest:
    """Resume state kept beside the weights: which layers are written, for which config and input."""

    def __init__(self, folder: Path, settings: dict[str, Any], input_fingerprint: str, overwrite: bool, writes: bool = True) -> None:
        """Read and check what ``folder`` holds, writing nothing: a refused run leaves it as it was (``start`` writes).

        ``writes=False``: a process beside the one that writes (``distill_lr.distributed``) keeps the same record in memory only.
        """
        self.folder, self.writes = folder, writes
        self.path = folder / MANIFEST_NAME
        self.overwrite = overwrite
        self.data: dict[str, Any] = {"settings": settings, "input": input_fingerprint, "layers": {}, "complete": False}
        self._written: dict[int, tuple[str, str]] = {}  # layer -> (file, sha256), between its write and its mark_done
        self._old = self._read(overwrite) if self.path.is_file() else None
        if self._old is not None and not overwrite:
            self._check_same_run(self._old, settings, input_fingerprint)
            if "stages" in self._old:
                self.data["stages"] = self._old["stages"]
        elif not self.path.is_file() and folder.is_dir():
            found = sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)
            if found:
                raise UserInputError(
                    f"output folder {folder} is not empty and holds no distill_lr run (it has {', '.join(found[:5])}): "
                    "choose a new or empty output folder (overwrite=true replaces only an earlier run's folder)"
                )

    def check_text(self, digest: str) -> None:
        """The calibration tokens are the earlier run's (a data.source path or a tokenizer may hold other content now)."""
        earlier = None if self._old is None or self.overwrite else self._old.get("text")
        if earlier is not None and earlier != digest:
            raise UserInputError(
                f"output folder {self.folder} holds a run calibrated on other text (the content of data.source or the tokenizer "
                "changed since): give the same text, a new output folder, or overwrite=true"
            )
        self.data["text"] = digest

    @property
    def plan(self) -> dict[str, int] | None:
        """The rank plan the earlier run of the same settings recorded here: a resumed run keeps its layers' ranks."""
        plan = None if self._old is None or self.overwrite else self._old.get("plan")
        return plan if isinstance(plan, dict) else None

    def start(self, plan: dict[str, int] | None = None) -> None:
        """Take the folder over: clear an earlier run's files (``overwrite``) or keep its intact layers, then record ``plan``."""
        old = self._old
        if old is not None and not self.overwrite:
            self.data["layers"] = {k: v for k, v in old["layers"].items() if self._intact(int(k), v)}
            if len(self.data["layers"]) < len(old["layers"]):  # a recomputed layer undoes the stages
                self.data.pop("stages", None)
            self._clear(temporary_only=True)  # what a killed run was writing
        elif self.path.is_file():  # overwrite=true, or an unreadable manifest with it
            self._clear()
        if plan is not None:
            self.data["plan"] = plan
        self.save()

    def _read(self, overwrite: bool) -> dict[str, Any] | None:
        """The earlier run's manifest; None when it cannot be read and ``overwrite`` (else a one-line error)."""
        try:
            old = json.loads(self.path.read_text())
            _check_shape(old)
            return old
        except (ValueError, OSError) as err:
            if overwrite:
                return None
            raise UserInputError(
                f"{self.path} is unreadable or incomplete ({first_line(err)}): run with overwrite=true to start over, "
                "or choose a new output folder"
            ) from None

    def _check_same_run(self, old: dict[str, Any], settings: dict[str, Any], input_fingerprint: str) -> None:
        if old["input"] != input_fingerprint:
            raise UserInputError(
                f"output folder {self.folder} holds a run on another input model (or on changed weights): "
                "use a new output folder or overwrite=true"
            )
        changed = sorted(k for k in set(old["settings"]) | set(settings) if old["settings"].get(k) != settings.get(k))
        if changed:
            raise UserInputError(
                f"output folder {self.folder} holds a run with another config (changed: {', '.join(changed[:5])}): "
                "use a new output folder, the same config, or overwrite=true"
            )

    def _clear(self, temporary_only: bool = False) -> None:
        """Delete the files an earlier run wrote here (or only its unfinished temporary files), and nothing else."""
        if not self.writes:
            return
        for path in self.folder.iterdir():
            if path.is_file() and written_by_a_run(path.name) and (not temporary_only or path.name.startswith(".")):
                path.unlink()

    def _intact(self, index: int, entry: dict[str, Any]) -> bool:
        """Whether a finished layer's file is still there at its size; else it is computed again, with a warning."""
        path = self.folder / entry["file"]
        size = path.stat().st_size if path.is_file() else None
        if size == entry["bytes"]:
            return True
        state = "is missing" if size is None else f"has {size:,} bytes, not the {entry['bytes']:,} written"
        warnings.warn(f"{path} {state}: layer {index} is computed again", stacklevel=3)
        return False

    def done(self, index: int) -> dict[str, Any] | None:
        """The finished layer's entry when its file still has the content the run wrote; else None (it is computed again)."""
        entry = self.data["layers"].get(str(index))
        if entry is None:
            return None
        path = self.folder / entry["file"]
        if file_sha256(path) != entry["sha256"]:
            warnings.warn(
                f"{path} has changed since it was written (its sha256 does not match the manifest): layer {index} is computed again",
                stacklevel=2,
            )
            del self.data["layers"][str(index)]
            self.data.pop("stages", None)  # the layer is computed again: a stage after the loop must run again too
            return None
        return entry

    def record_stage(self, name: str, settings: dict[str, Any], report: dict[str, Any]) -> None:
        """A stage after the layer loop has rewritten the layer files it changed, with these settings."""
        self.data.setdefault("stages", {})[name] = {"settings": settings, "report": report}
        self.save()

    def stage(self, name: str) -> dict[str, Any] | None:
        """The entry ``record_stage`` left: the stage's settings and report, or None when it has not run here."""
        return self.data.get("stages", {}).get(name)

    def record_other(self, file: str, sha256: str) -> None:
        """The hash of the non-layer weights' file, for ``load_compressed`` to verify."""
        self.data["other"] = {"file": file, "sha256": sha256}
        self.save()

    def save_layer(self, index: int, file: str, state: dict[str, torch.Tensor]) -> None:
        """Write a finished layer's file (on the writer thread); ``mark_done`` records it once its report is complete."""
        self._written[index] = (file, files.save_tensors_atomic(state, self.folder / file))

    def mark_done(self, index: int, report: dict[str, Any]) -> None:
        file, sha256 = self._written.pop(index)
        self.data["layers"][str(index)] = {"file": file, "bytes": (self.folder / file).stat().st_size, "sha256": sha256, "report": report}
        self.data["layers"] = dict(sorted(self.data["layers"].items(), key=lambda kv: int(kv[0])))  # a recomputed layer: in its place
        self.data["complete"] = False
        self.save()

    def mark_complete(self) -> None:
        self.data["complete"] = True
        self.save()

    def save(self) -> None:
        if self.writes:
            self.folder.mkdir(parents=True, exist_ok=True)
            files.write_json_atomic(self.data, self.path)
