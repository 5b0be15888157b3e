"""Config loading: every YAML under configs/ validates; bad keys, types and names stop with one sentence."""

from pathlib import Path

import pytest

from sipo.config import OBJECTIVE_PRESETS, load_config, save_config, config_from_dict
from sipo.errors import SipoError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
ALL_CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))  # recursive: every file, not a sample
# configs/accelerate/ holds `accelerate launch --config_file` files (tests/test_configs_video.py checks them)
ALL_CONFIGS = [p for p in ALL_CONFIGS if "accelerate" not in p.relative_to(CONFIG_DIR).parts]


def test_configs_directory_is_not_empty():
    assert len(ALL_CONFIGS) >= 2


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_config_file_loads_and_round_trips(path, tmp_path):
    config = load_config(path)
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config


def test_override_types_and_beta_is_float():
    config = load_config(CONFIG_DIR / "sd15_pickapic.yaml", ["objective.beta=2500", "objective.tau=0.1", "train.max_steps=3"])
    assert config.objective.beta == 2500.0 and isinstance(config.objective.beta, float)
    assert config.objective.tau == 0.1 and config.train.max_steps == 3


@pytest.mark.parametrize(
    "override, fragment",
    [
        (["objective.name=ppo"], "objective.name='ppo' is not valid"),
        (["objective.betta=1"], "unknown config key objective.betta; valid keys in objective"),
        (["train.max_steps=many"], "expected int"),
        (["model.family=sd4"], "model.family='sd4' is not valid"),
        (["objective.beta=-1"], "objective.beta must be positive"),
        (["nonsense"], "is not key=value"),
    ],
)
def test_bad_values_stop_with_one_sentence(override, fragment):
    with pytest.raises(SipoError) as info:
        load_config(None, override)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_missing_config_file_names_the_fix(tmp_path):
    with pytest.raises(SipoError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_presets_give_six_distinct_switch_sets_and_overrides_win():
    switch_sets = {tuple(sorted(p.items())) for p in OBJECTIVE_PRESETS.values()}
    assert len(switch_sets) == 6
    assert OBJECTIVE_PRESETS["dpo"] == {"mask": False, "clip": False, "reweight": False}
    assert OBJECTIVE_PRESETS["sipo"] == {"mask": True, "clip": True, "reweight": True}
    config = config_from_dict({"objective": {"name": "sipo", "mask": False}})
    assert config.objective.switches() == {"mask": False, "clip": True, "reweight": True}
