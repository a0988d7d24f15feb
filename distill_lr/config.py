"""Loading a run configuration: the schema's defaults merged with a YAML file and ``key=value`` overrides.

Unknown keys and wrongly typed values are errors (OmegaConf structured configs), the schema checks
its values and the method must be registered, so a bad setting fails before any weight is read::

    cfg = load_config("configs/smollm2_distill.yaml", ["ranks.target=0.4", "train.lr=3e-2"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distill_lr.errors import UserInputError, first_line
from distill_lr.methods import get_method
from distill_lr.schema import CompressConfig


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> CompressConfig:
    """Merge defaults, an optional YAML file and ``key=value`` overrides into a checked config."""
    schema = OmegaConf.structured(CompressConfig)
    layers = [schema]
    try:
        if path is not None:
            if not Path(path).is_file():
                state = "is a folder" if Path(path).is_dir() else "does not exist"
                raise UserInputError(f"config file {path} {state}: give the path of a YAML file")
            layers.append(_read_yaml(Path(path)))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise UserInputError(f"override '{bad[0]}' is not key=value: write e.g. ranks.target=0.3")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg: CompressConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise UserInputError(_config_error_line(err, path)) from None
    get_method(cfg)  # an unknown method fails here, with the others
    return cfg


def _read_yaml(path: Path) -> Any:
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or first_line(err)
        raise UserInputError(f"config file {path} is not valid YAML ({where}{problem}): fix the file") from None


def _config_error_line(err: OmegaConfBaseException, path: str | Path | None) -> str:
    where = f" in {path}" if path else ""
    key = getattr(err, "full_key", None)
    first = str(err).splitlines()[0]
    if "not in struct" in first or "Key '" in first and "not" in first:
        return f"unknown config key '{key}'{where}: check the spelling against distill_lr/schema.py"
    return f"bad config value for '{key}'{where}: {first}"
