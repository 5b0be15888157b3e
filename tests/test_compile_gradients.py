"""train.compile: the compiled denoiser's gradients are checked against the eager ones on the first batch
(issue 30 item 2: compile_scope=model on SD1.5 left the mid block's LoRA without gradient, inductor on the
CPU). A compile that computes the eager gradients trains on, every LoRA matrix with a gradient; one that
drops a path stops before any weight moves. dynamo's "eager" backend stands for a correct compiler (it
traces the whole UNet in seconds); a backend that detaches the graph's outputs for a faulty one (inductor
compiles the tiny UNet in minutes on the CPU, too long for the suite: the fault it reproduces is in
the docstring of sipo.train.check_compiled_gradients)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from sipo.config import load_config
from sipo.errors import SipoError
from sipo.performance import compile_denoiser
from train_fixtures import tiny_overrides, write_jsonl_pairs

trainer = importlib.import_module("sipo.train")  # sipo.train is the function; its module holds the loop


def _config(model_dir: Path, tmp_path: Path, **extra):
    manifest = write_jsonl_pairs(tmp_path / "pairs", num_pairs=2)
    values = {"train.compile": True, "train.compile_scope": "model", "train.checkpoint_every": 0,
              "train.report_to": "none", "train.max_steps": 2, "objective.name": "dpo", **extra}
    return load_config(None, tiny_overrides(model_dir, manifest, tmp_path / "run", **values))


def _dropping_backend(graph_module, example_inputs):
    """A compiler that loses the gradient: the graph's outputs come back detached."""
    def run(*args):
        outputs = graph_module(*args)
        return type(outputs)(o.detach() if isinstance(o, torch.Tensor) else o for o in outputs)

    return run


def test_a_correct_compile_trains_and_every_lora_matrix_gets_a_gradient(tiny_sd15_dir, tmp_path, monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(trainer, "compile_denoiser", lambda model, scope: compile_denoiser(model, scope, backend="eager"))
    gradients = {}
    real_step = trainer.optimizer_step

    def recording(run, step):
        gradients[run.state.step + 1] = {n: float(p.grad.norm()) for n, p in run.trainable.items() if p.grad is not None}
        return real_step(run, step)

    monkeypatch.setattr(trainer, "optimizer_step", recording)
    trainer.train(_config(tiny_sd15_dir, tmp_path), progress=False)
    second = gradients[2]  # step 1: peft starts every lora_B at 0, so lora_A's gradient is 0 there by design
    lora = [name for name in second if "lora_" in name]
    assert any("mid_block" in name for name in lora)
    assert all(second[name] > 0 for name in lora), [name for name in lora if second[name] == 0]
    torch._dynamo.reset()


def test_a_compile_that_loses_gradients_stops_before_a_step(tiny_sd15_dir, tmp_path, monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(trainer, "compile_denoiser",
                        lambda model, scope: compile_denoiser(model, scope, backend=_dropping_backend))
    with pytest.raises(SipoError) as stopped:
        trainer.train(_config(tiny_sd15_dir, tmp_path), progress=False)
    message = str(stopped.value)
    assert message.startswith("train.compile_scope=model: torch.compile computed other gradients than the eager model "
                              "for ")
    assert message.endswith("set train.compile_scope=blocks (its regional graphs compute the eager gradients) or "
                            "train.compile=false")
    assert not (tmp_path / "run").exists()  # stopped before the first step: nothing is left
    torch._dynamo.reset()
