"""A new user's pass over sipo pairs, iterate, sweep and compare (issue 30, "keep going"): each test
reproduces one fault that user met, on the tiny SD1.5 of tests/tiny_models.py."""

from __future__ import annotations

import pytest
import yaml
from train_fixtures import write_jsonl_pairs, write_tiny_config

from sipo.errors import SipoError


def test_a_sweep_whose_config_file_changed_stops_instead_of_pooling_two_configurations(tiny_sd15_dir, tmp_path, capsys):
    """A finished cell trained at objective.beta 5000; the YAML edited to beta 1 and the sweep rerun with one
    more seed: the old cell would be skipped and pooled with a beta-1 cell under one configuration's name."""
    from sipo.sweep import run_sweep

    manifest = write_jsonl_pairs(tmp_path / "data")
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_sd15_dir, manifest, tmp_path / "unused",
                               **{"train.max_steps": 1, "objective.beta": 5000.0})
    grid = {"objective.name": ["dpo"]}
    run_sweep(config, grid, [0], tmp_path / "sweep", progress=False)
    values = yaml.safe_load(config.read_text())
    values["objective"]["beta"] = 1.0
    config.write_text(yaml.safe_dump(values))
    for print_commands in (True, False):
        with pytest.raises(SipoError, match=r"objective\.beta: 5000\.0 -> 1\.0.*restore them"):
            run_sweep(config, grid, [0, 1], tmp_path / "sweep", print_commands=print_commands, progress=False)
    assert not (tmp_path / "sweep" / "objective.name=dpo,seed=1").exists()  # nothing trained before the refusal
    # restored: the finished cell is skipped again and the new seed trains
    values["objective"]["beta"] = 5000.0
    config.write_text(yaml.safe_dump(values))
    result = run_sweep(config, grid, [0, 1], tmp_path / "sweep", progress=False)
    assert result.status == {"objective.name=dpo,seed=0": "finished before", "objective.name=dpo,seed=1": "trained"}
