"""The resume manifest kept beside the weights: which layers are written, for which config and input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from distill_lr.checkpoint.files import file_sha256, write_json_atomic
from distill_lr.errors import UserInputError

MANIFEST_NAME = "distill_lr_manifest.json"


class RunManifest:
    """Resume state kept beside the weights: which layers are written, for which config and input."""

    def __init__(self, folder: Path, settings: dict[str, Any], input_fingerprint: str, overwrite: bool) -> None:
        self.folder = folder
        self.path = folder / MANIFEST_NAME
        self.data: dict[str, Any] = {"settings": settings, "input": input_fingerprint, "layers": {}, "complete": False}
        if self.path.is_file():
            old = json.loads(self.path.read_text())
            changed = sorted(k for k in set(old["settings"]) | set(settings) if old["settings"].get(k) != settings.get(k))
            if overwrite:
                self._clear()
            elif old["input"] != input_fingerprint:
                raise UserInputError(
                    f"output folder {folder} holds a run on another input model: use a new output folder or overwrite=true"
                )
            elif changed:
                raise UserInputError(
                    f"output folder {folder} holds a run with another config (changed: {', '.join(changed[:5])}): "
                    "use a new output folder, the same config, or overwrite=true"
                )
            else:
                self.data["layers"] = {k: v for k, v in old["layers"].items() if self._intact(v)}
        elif folder.exists() and any(folder.iterdir()):
            if not overwrite:
                raise UserInputError(f"output folder {folder} is not empty and holds no distill_lr run: use a new folder or overwrite=true")
            self._clear()
        folder.mkdir(parents=True, exist_ok=True)
        self.save()

    def _clear(self) -> None:
        shutil.rmtree(self.folder)

    def _intact(self, entry: dict[str, Any]) -> bool:
        path = self.folder / entry["file"]
        return path.is_file() and path.stat().st_size == entry["bytes"]

    def done(self, index: int) -> dict[str, Any] | None:
        return self.data["layers"].get(str(index))

    def mark_done(self, index: int, file: str, report: dict[str, Any]) -> None:
        path = self.folder / file
        self.data["layers"][str(index)] = {"file": file, "bytes": path.stat().st_size, "sha256": file_sha256(path), "report": report}
        self.data["complete"] = False
        self.save()

    def mark_complete(self) -> None:
        self.data["complete"] = True
        self.save()

    def save(self) -> None:
        write_json_atomic(self.data, self.path)
