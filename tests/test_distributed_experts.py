"""Wan2.2-A14B under DDP (issue 26 item 2): each sample goes to one expert, so a step can leave an expert's
LoRA without a gradient, and DDP without ``find_unused_parameters`` stopped at step 2 ("Expected to have
finished reduction in the prior iteration"). Two processes of one pair each train 3 steps and equal one
process with the global batch of 2, both experts' LoRA files included. One 2-process launch (~30 s)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from test_distributed import TESTS, _accelerate_config, _launch, _losses, _run_on_cpu, _sipo_train
from video_contract import TINY_FRAMES, TINY_SIZE, video_overrides
from video_fixtures import write_video_pairs

from sipo.models.wan import WanAdapter

STEPS = 3
#: as tests/test_distributed.py's TOLERANCE (float32 sums in another order, grown through Adam)
TOLERANCE = 1e-4


def _write_config(path: Path, model: Path, pairs: Path, output: Path, batch_size: int) -> Path:
    settings = {"objective.name": "dpo", "objective.beta": 500.0, "train.max_steps": STEPS, "train.batch_size": batch_size,
                "train.checkpoint_every": 0, "train.report_to": "none",
                # t near the top of the range too, so that steps use both experts (boundary t >= 875): with
                # logit-normal mean -2 (a small u is a noisy t, the scripts' direction) about half the pairs
                # go to the high-noise expert
                "objective.timestep_sampling": "logit_normal", "objective.logit_mean": -2.0}
    nested: dict = {}
    for override in video_overrides("wan", model, pairs, output, **settings):
        key, value = override.split("=", 1)
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(nested))
    return path


def _lora_files(run: Path) -> dict[str, dict]:
    return {f.name: load_file(str(f)) for f in sorted(run.glob("*.safetensors"))}


@pytest.mark.slow
def test_a14b_trains_on_two_processes_as_on_one(tmp_path):
    model = WanAdapter.build_random_pipeline(tmp_path / "a14b", variant="2.2-t2v-a14b")
    pairs = write_video_pairs(tmp_path / "pairs", num_pairs=6, frames=TINY_FRAMES, size=TINY_SIZE)
    one = _write_config(tmp_path / "one.yaml", model, pairs, tmp_path / "one", batch_size=2)
    two = _write_config(tmp_path / "two.yaml", model, pairs, tmp_path / "two", batch_size=1)
    _run_on_cpu(_sipo_train(one))
    _launch(_accelerate_config(tmp_path / "accelerate.yaml"), [str(TESTS / "distributed_worker.py"),
                                                               str(tmp_path / "record"), *_sipo_train(two)[2:]])
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "two"), abs=TOLERANCE)
    assert len(_losses(tmp_path / "two")) == STEPS
    files_one, files_two = _lora_files(tmp_path / "one"), _lora_files(tmp_path / "two")
    assert len(files_one) == 2 and sorted(files_one) == sorted(files_two)  # one LoRA file per expert
    for name, weights in files_one.items():
        for key, value in weights.items():
            assert (value.double() - files_two[name][key].double()).abs().max() <= TOLERANCE, (name, key)
    # the run used both experts: each expert's LoRA moved from its zero start (peft's B = 0)
    for name, weights in files_one.items():
        assert max(float(v.abs().max()) for k, v in weights.items() if "lora_B" in k) > 0, name
