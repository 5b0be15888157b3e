"""SIGTERM / SIGINT in every phase of a run (issue 30 item 5): at the start (set-up, step-0 validation)
nothing is trained and nothing is left; during the end-of-run validation the final checkpoint and the
weights are already written and the validation stops at once; in the steps, a checkpoint of the step.

The signals are sent to this process from inside the phase (SIGINT: pytest's own SIGTERM handling
would end the session on a regression; the trainer handles both signals alike)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from sipo.checkpoints import list_checkpoints
from sipo.config import load_config
from sipo.errors import TrainingInterrupted
from sipo.train import train
from sipo.validation import VALIDATION_LOG, Validation
from train_fixtures import tiny_overrides, write_jsonl_pairs


@pytest.fixture
def interactive_sigint():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_jsonl_pairs(tmp_path_factory.mktemp("pairs"), num_pairs=12)


def _config(model_dir, manifest, output_dir, **extra):
    values = {"data.validation_fraction": 0.5, "train.validate_every": 0, "train.max_steps": 2,
              "train.checkpoint_every": 0, "train.report_to": "none", "train.batch_size": 1, **extra}
    return load_config(None, tiny_overrides(model_dir, manifest, output_dir, **values))


def _signal_in_validation_at(step_wanted: int, monkeypatch):
    """SIGINT from inside the first held-out batch of the validation at ``step_wanted``; counts the batches."""
    real, batches = Validation._batch_terms, []

    def batch_terms(self, run, positions):
        batches.append(run.state.step)
        if run.state.step == step_wanted and batches.count(step_wanted) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, run, positions)

    monkeypatch.setattr(Validation, "_batch_terms", batch_terms)
    return batches


def test_a_signal_in_the_end_of_run_validation_loses_no_step(tiny_sd15_dir, pairs, tmp_path, monkeypatch, capsys,
                                                              interactive_sigint):
    batches = _signal_in_validation_at(2, monkeypatch)
    run = tmp_path / "run"
    result = train(_config(tiny_sd15_dir, pairs, run), progress=False)
    assert result.steps == 2
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002"]  # written before the validation
    assert (run / "pytorch_lora_weights.safetensors").is_file() and (run / "README.md").is_file()
    assert batches.count(2) == 1  # cut short after the batch in flight, of the 6 held-out pairs
    steps = [json.loads(line)["step"] for line in (run / VALIDATION_LOG).read_text().splitlines()]
    assert steps == [0]  # no partial record of step 2
    assert "SIGINT arrived at the end of the run; the end-of-run validation was cut short" in capsys.readouterr().out


def test_a_signal_before_the_first_step_stops_there_and_leaves_nothing(tiny_sd15_dir, pairs, tmp_path, monkeypatch,
                                                                         interactive_sigint):
    batches = _signal_in_validation_at(0, monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as stopped:
        train(_config(tiny_sd15_dir, pairs, run), progress=False)
    assert stopped.value.step == 0 and batches == [0]
    assert str(stopped.value) == ("stopped by SIGINT before the first step, so nothing was trained; start again (add "
                                  "overwrite=True if the directory is kept)")
    assert not run.exists()  # a run that never took a step leaves the directory as it found it
