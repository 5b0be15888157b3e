"""The checks every model family passes, written once (STYLE 9); a family's test module subclasses them.

Two mixins:

- ``AdapterContract`` (defined beside SD1.5's tests, re-exported here): loading, shapes, the
  target-space round trip, LoRA saved by the adapter loading with the pipeline's
  ``load_lora_weights``, ``lora_disabled``, clear errors for wrong directories.
- ``FamilyContract``: the issue-11 guarantees end to end on the tiny model: 2 training steps with
  each of dpo and sipo (finite loss, LoRA changed), an exact resume, ``sipo analyze``, the trained
  LoRA loading into the family's diffusers pipeline and generating, the scheduler's own forward
  process matching the schedule, and ``log w`` equal to an independent Gaussian log-density ratio
  (``torch.distributions``) at low, middle and high noise.

A family's test class provides the fixtures:

- ``family`` (class attribute), ``model_dir`` (a saved tiny pipeline), ``pairs``
  (``(prompts, winners, losers)`` at the tiny resolution),
- ``manifest`` (a JSONL preference dataset at that resolution) and ``family_overrides`` (a dict of
  ``key=value`` settings that point ``train_fixtures.tiny_overrides`` at this family),

and may override ``scheduler_forward`` (how the family's real scheduler noises ``x0``) and
``sample_kwargs`` (a short, cheap generation). The trained runs are built once per class.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_models_sd15 import AdapterContract, inject_lora, noisy_input  # noqa: F401 - re-exported
from train_fixtures import tiny_overrides, write_tiny_config

from sipo.checkpoints import list_checkpoints
from sipo.config import load_config
from sipo.models import load_adapter
from sipo.preference import PairNoise, compute_pair_terms
from sipo.schedules import add_noise

#: low, middle and high noise on a 1000-step grid; each has a previous inference step s >= 0.
LOG_W_TIMESTEPS = (60, 500, 980)


def _lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {key: value for key, value in load_file(path).items() if "lora_" in key}


def independent_x0_hat(prediction: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, kind: str):
    """SPEC 1's conversions, written out again in float64 (not through ``sipo.schedules``)."""
    a, b = a.double().view(-1, *[1] * (x_t.ndim - 1)), b.double().view(-1, *[1] * (x_t.ndim - 1))
    prediction, x_t = prediction.double(), x_t.double()
    if kind == "epsilon":
        return (x_t - b * prediction) / a
    if kind == "v_prediction":
        return a * x_t - b * prediction
    if kind == "flow":  # a = 1 - sigma, b = sigma
        return x_t - b * prediction
    raise AssertionError(kind)


def conditional_gaussian(x_t, x0, a_t, b_t, a_s, b_s):
    """``x_s | x_t, x0`` by Gaussian conditioning of the joint ``(x_s, x_t)`` given ``x0``.

    ``x_s = a_s x0 + b_s e1`` and ``x_t = r x_s + sqrt(b_t^2 - r^2 b_s^2) e2`` with ``r = a_t/a_s``:
    ``Cov(x_s, x_t) = r b_s^2``, ``Var(x_t) = b_t^2``, so the mean is
    ``a_s x0 + (r b_s^2 / b_t^2)(x_t - a_t x0)`` and the variance ``b_s^2 - (r b_s^2)^2 / b_t^2``.
    A different route to SPEC 3's posterior than ``objectives.gaussian_posterior`` takes.
    """
    shape = (-1, *[1] * (x_t.ndim - 1))
    a_t, b_t, a_s, b_s = (c.double().view(shape) for c in (a_t, b_t, a_s, b_s))
    r = a_t / a_s
    mean = a_s * x0 + (r * b_s**2 / b_t**2) * (x_t - a_t * x0)
    var = b_s**2 - (r * b_s**2) ** 2 / b_t**2
    return mean, var


class FamilyContract:
    """Training, resume, analysis, LoRA loading and the importance weight, for one family."""

    family: str

    def scheduler_forward(self, adapter, x0: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t`` from the family's own scheduler (DDPM-style ``add_noise`` by default)."""
        return adapter.scheduler.add_noise(x0, eps, timesteps)

    def sample_kwargs(self) -> dict:
        return {"num_inference_steps": 2}

    # ------------------------------------------------------------------ fixtures
    @staticmethod
    def _config(family_overrides, model_dir, manifest, output_dir, **extra):
        return load_config(None, tiny_overrides(model_dir, manifest, output_dir, **{**family_overrides, **extra}))

    @pytest.fixture(scope="class")
    @classmethod
    def trained(cls, model_dir, manifest, family_overrides, tmp_path_factory) -> dict[str, Path]:
        """Output directories of 2-step dpo and sipo runs (checkpoint every step), trained once."""
        from sipo.train import train

        runs = {}
        for objective in ("dpo", "sipo"):
            output_dir = tmp_path_factory.mktemp(f"{cls.family}_{objective}")
            # tau 0.05 keeps pairs at a random model's weights, so sipo takes real steps.
            config = cls._config(family_overrides, model_dir, manifest, output_dir, **{"objective.name": objective, "objective.tau": 0.05})
            result = train(config, progress=False)
            assert result.steps == 2
            runs[objective] = output_dir
            (output_dir / "losses.json").write_text(json.dumps([r["loss"] for r in result.history]))
        return runs

    # ------------------------------------------------------------------ training
    @pytest.mark.parametrize("objective", ["dpo", "sipo"])
    def test_two_steps_finite_loss_and_lora_changed(self, trained, objective):
        run = trained[objective]
        losses = json.loads((run / "losses.json").read_text())
        assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
        # peft's "gaussian" init starts every LoRA B at zero: any non-zero B was moved by training.
        first, last = (_lora_tensors(path / "trainable.safetensors") for path in list_checkpoints(run))
        lora_b = {key: value for key, value in last.items() if "lora_B" in key}
        assert lora_b and any(value.abs().max() > 0 for value in lora_b.values())
        assert any(not torch.equal(first[key], last[key]) for key in first)  # step 2 moved it again
        assert (run / "pytorch_lora_weights.safetensors").is_file()

    def test_resume_continues_exactly(self, trained, model_dir, manifest, family_overrides, tmp_path):
        """dpo run of 2 steps (checkpointed) resumed to 4 == a straight 4-step run."""
        from sipo.train import train

        resumed_dir = tmp_path / "resumed"
        shutil.copytree(trained["dpo"], resumed_dir)
        four_steps = {"objective.name": "dpo", "objective.tau": 0.05, "train.max_steps": 4}
        resumed = train(self._config(family_overrides, model_dir, manifest, resumed_dir, **four_steps),
                        resume=True, progress=False)
        straight = train(self._config(family_overrides, model_dir, manifest, tmp_path / "straight", **four_steps),
                         progress=False)
        assert resumed.steps == straight.steps == 4
        final_resumed = load_file(list_checkpoints(resumed_dir)[-1] / "trainable.safetensors")
        final_straight = load_file(list_checkpoints(tmp_path / "straight")[-1] / "trainable.safetensors")
        assert final_resumed.keys() == final_straight.keys()
        for key in final_straight:
            torch.testing.assert_close(final_resumed[key], final_straight[key], rtol=0, atol=1e-6)
        assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in straight.history], abs=1e-6)

    def test_sipo_analyze_runs_on_the_trained_run(self, trained, model_dir, manifest, family_overrides, tmp_path):
        from sipo.cli import main as cli_main

        config = write_tiny_config(tmp_path / "config.yaml", model_dir, manifest, tmp_path / "unused", **family_overrides)
        out = tmp_path / "analysis"
        status = cli_main(["analyze", "--config", str(config), "--checkpoint", str(trained["sipo"]),
                           "--pairs", "2", "--buckets", "2", "--output-dir", str(out)])
        assert status == 0
        assert list(out.glob("*.csv")), sorted(p.name for p in out.iterdir())

    def test_trained_lora_loads_into_the_pipeline_and_generates(self, trained, model_dir):
        from diffusers import DiffusionPipeline

        from sipo.models import adapter_class

        pipe = DiffusionPipeline.from_pretrained(str(model_dir))
        assert type(pipe).__name__ in adapter_class(self.family).pipeline_class_names
        pipe.set_progress_bar_config(disable=True)

        def generate() -> torch.Tensor:
            output = pipe(["a photo of a cat"], generator=torch.Generator().manual_seed(0), output_type="pt",
                          **self.sample_kwargs())
            return torch.as_tensor(getattr(output, "images", None) if hasattr(output, "images") else output.frames)

        base = generate()
        pipe.load_lora_weights(str(trained["dpo"]))
        tuned = generate()
        assert tuned.shape == base.shape and torch.isfinite(tuned).all()
        assert not torch.allclose(tuned, base, atol=1e-6)  # the trained LoRA acts

    # ------------------------------------------------------------------ schedule and weights
    @pytest.mark.parametrize("t", [0, 250, 500, 999])
    def test_scheduler_forward_process_is_the_schedule(self, model_dir, pairs, t):
        """The family's real scheduler noises x0 exactly as ``a_t x0 + b_t eps`` (to 1e-5)."""
        adapter = load_adapter(self.family, str(model_dir))
        x0 = adapter.encode(*pairs).x0_winner
        timesteps = torch.full((x0.shape[0],), t)
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
        a_t, b_t = adapter.schedule.coefficients(timesteps)
        expected = self.scheduler_forward(adapter, x0, eps, timesteps)
        torch.testing.assert_close(add_noise(x0, eps, a_t, b_t), expected.float(), rtol=0, atol=1e-5)

    @pytest.mark.parametrize("t", LOG_W_TIMESTEPS)
    def test_log_w_is_the_gaussian_log_density_ratio(self, model_dir, pairs, t):
        """``log_w`` of the trainer's pair terms == log N(x_s; mu(x0), s2) - log N(x_s; mu(x0_hat), s2),
        per element mean, with both densities from ``torch.distributions.Normal`` in float64."""
        adapter = load_adapter(self.family, str(model_dir))
        inject_lora(adapter)  # a policy different from the reference, as during training
        encoded = adapter.encode(*pairs)
        batch = encoded.x0_winner.shape[0]
        generator = torch.Generator().manual_seed(t)
        noise = PairNoise(
            timesteps=torch.full((batch,), t),
            eps=torch.randn(encoded.x0_winner.shape, generator=generator),
            posterior_noise=torch.randn(encoded.x0_winner.shape, generator=generator),
        )
        with torch.no_grad():
            terms = compute_pair_terms(adapter, encoded, noise, beta=5000.0,
                                       reference_predict=lambda x, tt, c: adapter.predict(x, tt, c))

        schedule = adapter.schedule
        timesteps = noise.timesteps
        a_t, b_t = schedule.coefficients(timesteps)
        a_s, b_s = schedule.previous_coefficients(timesteps)
        shape = (-1, *[1] * (encoded.x0_winner.ndim - 1))
        for x0, log_w in ((encoded.x0_winner, terms.log_w_winner), (encoded.x0_loser, terms.log_w_loser)):
            x_t = a_t.view(shape) * x0 + b_t.view(shape) * noise.eps  # float32, as the model sees it
            with torch.no_grad():
                prediction = adapter.predict(x_t, timesteps, encoded.conditioning)
            x0_hat = independent_x0_hat(prediction, x_t, a_t, b_t, schedule.prediction_type)
            mean_q, var = conditional_gaussian(x_t.double(), x0.double(), a_t, b_t, a_s, b_s)
            mean_p, _ = conditional_gaussian(x_t.double(), x0_hat, a_t, b_t, a_s, b_s)
            std = var.sqrt()
            x_s = mean_q + std * noise.posterior_noise.double()
            log_q = torch.distributions.Normal(mean_q, std).log_prob(x_s)
            log_p = torch.distributions.Normal(mean_p, std).log_prob(x_s)
            expected = (log_p - log_q).flatten(1).mean(dim=1)
            assert torch.all(expected != 0)
            torch.testing.assert_close(log_w.double(), expected, rtol=1e-5, atol=1e-6)  # float32 vs float64
