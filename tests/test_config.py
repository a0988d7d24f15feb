from pathlib import Path

import pytest
import yaml

from distill_lr.config import load_config
from distill_lr.errors import UserInputError
from distill_lr.methods import get_method
from distill_lr.schema import CompressConfig

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_file_loads_and_every_value_it_sets_arrives(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, CompressConfig)

    def leaves(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict) and key not in ("rules", "correction_rules"):
                out |= leaves(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value
        return out

    written, loaded = leaves(yaml.safe_load(path.read_text()) or {}), leaves(cfg.to_dict())
    assert written and {k: loaded[k] for k in written} == written  # nothing dropped, renamed or coerced away


def test_defaults_and_overrides() -> None:
    cfg = load_config(None, ["ranks.target=0.4", "train.lr=3e-4", "method=whiten"])
    assert cfg.ranks.target == 0.4 and cfg.train.lr == 3e-4 and cfg.method == "whiten"
    assert get_method(cfg).info == {"method": "whiten", "init": "whiten"}
    assert get_method(load_config(None, ["method=distill", "init=pca"])).info == {"method": "distill", "init": "pca"}


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["ranks.targte=0.3"], "unknown config key 'ranks.targte'"),
        (["nonsense=1"], "unknown config key 'nonsense'"),
        (["init=qr"], "init 'qr' is unknown"),
        (["method=prune"], "method 'prune' is unknown"),
        (["train.inputs=both"], "train.inputs 'both' is unknown"),
        (["train.autocast=fp16"], "train.autocast 'fp16' is unknown"),
        (["ranks.target=1.5"], "ranks.target must be in (0, 1)"),
        (["ranks.rules={layers.*.mlp.up_proj: 0}"], "use a rank > 0"),
        (["data.seq_len=abc"], "bad config value for 'data.seq_len'"),
        (["data.num_sequences=0"], "data.num_sequences must be > 0"),
        (["method"], "is not key=value"),
        (["method=qlr"], "method=qlr needs quant.bits"),
        (["method=dense"], "method=dense needs quant.bits"),
        (["method=qlr", "quant.bits=4", "quant.targets=factors"], "method=qlr quantizes the dense weights"),
        (["dist_timeout_s=0"], "dist_timeout_s must be > 0"),
    ],
)
def test_bad_settings_give_one_line(overrides: list[str], needle: str) -> None:
    with pytest.raises(UserInputError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserInputError, match="is a folder: give the path of a YAML file"):
        load_config(tmp_path)


def test_fingerprint_ignores_run_only_fields() -> None:
    a = load_config(None, ["output=a", "evaluate=false"]).result_fingerprint()
    b = load_config(None, ["output=b", "device=cpu"]).result_fingerprint()
    assert a == b
    assert a != load_config(None, ["ranks.target=0.3"]).result_fingerprint()
