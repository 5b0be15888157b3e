"""The checks every model family passes, written once (STYLE 9); a family's test module subclasses them.

Two mixins:

- ``AdapterContract``: loading, shapes, the target-space round trip, LoRA saved by the adapter loading with the pipeline's
  ``load_lora_weights``, ``lora_disabled``, clear errors for wrong directories.
- ``FamilyContract``: the issue-11 guarantees end to end on the tiny model: 2 training steps with
  each of dpo and sipo (finite loss, LoRA changed), an exact resume, ``sipo analyze``, the trained
  LoRA loading into the family's diffusers pipeline and generating, the scheduler's own forward
  process matching the schedule, and ``log w`` equal to an independent Gaussian log-density ratio
  (``torch.distributions``) at low, middle and high noise.

A family's test class provides the fixtures:

- ``family`` (class attribute), ``model_dir`` (a saved tiny pipeline), ``pairs``
  (``(prompts, winners, losers)`` at the tiny resolution, or what else ``adapter.encode`` takes: a
  conditioned family adds ``size_info`` and ``input_images``),
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
from train_fixtures import tiny_overrides, write_tiny_config

from sipo.checkpoints import list_checkpoints
from sipo.config import load_config
from sipo.errors import SipoError
from sipo.models import adapter_class, load_adapter, lora_disabled
from sipo.models.base import concat_conditioning
from sipo.preference import PairNoise, compute_pair_terms
from sipo.schedules import add_noise, predicted_x0_and_eps, training_target

# timesteps covering both ends of the schedule (t=999: a_t ~ 0.068 for SD1.5 betas)
TIMESTEPS = (0, 1, 250, 500, 999)


def inject_lora(adapter, r: int = 4, lora_alpha: int = 8, seed: int = 1) -> None:
    """LoRA on the adapter's denoiser as the trainer adds it, with non-zero B so it changes outputs.

    ``lora_alpha != r`` on purpose: the scale ``alpha / r = 2`` only survives saving and loading
    if the adapter writes the LoraConfig into the file (the loader assumes ``alpha == r`` otherwise).
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(adapter.lora_target_modules),
        init_lora_weights="gaussian",
    )
    inject_adapter_in_model(config, adapter.denoiser)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapter.denoiser.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero: the LoRA would be a no-op
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def noisy_input(adapter, encoded, seed: int = 0):
    """``x_t`` for the winners at a few timesteps, with the caller's noise."""
    generator = torch.Generator().manual_seed(seed)
    x0 = encoded.x0_winner
    timesteps = torch.tensor([TIMESTEPS[i % len(TIMESTEPS)] for i in range(x0.shape[0])])
    eps = torch.randn(x0.shape, generator=generator)
    a_t, b_t = adapter.schedule.coefficients(timesteps)
    return add_noise(x0, eps, a_t, b_t), timesteps


class AdapterContract:
    """What every family's adapter guarantees; subclasses provide ``family``, ``model_dir``, ``pairs``."""

    family: str

    def family_pipeline(self, model_dir):
        """The family's diffusers pipeline loaded from ``model_dir`` (a family may build it otherwise)."""
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(str(model_dir))

    @pytest.fixture
    def adapter(self, model_dir):
        return load_adapter(self.family, str(model_dir))

    def test_loads_through_registry(self, model_dir):
        adapter = adapter_class(self.family).from_pretrained(str(model_dir))
        assert adapter.family == self.family
        assert adapter.schedule.num_train_timesteps == 1000
        assert adapter.schedule.num_inference_steps == 50
        coarser = adapter_class(self.family).from_pretrained(str(model_dir), num_inference_steps=25)
        assert coarser.schedule.step_stride == 40

    def test_encode_is_deterministic_and_shared_conditioning(self, adapter, pairs):
        prompts = pairs[0]  # (prompts, winners, losers[, size_info, input_images]): what adapter.encode takes
        first = adapter.encode(*pairs)
        second = adapter.encode(*pairs)
        assert torch.equal(first.x0_winner, second.x0_winner)
        assert first.x0_winner.shape == first.x0_loser.shape
        assert not torch.equal(first.x0_winner, first.x0_loser)
        for value in first.conditioning.values():
            assert value.shape[0] == len(prompts)
            assert not value.requires_grad

    def test_predict_shape_matches_input(self, adapter, pairs):
        encoded = adapter.encode(*pairs)
        x_t, timesteps = noisy_input(adapter, encoded)
        prediction = adapter.predict(x_t, timesteps, encoded.conditioning)
        assert prediction.shape == x_t.shape
        assert torch.isfinite(prediction).all()
        # winner and loser in one forward pass, conditioning stacked by concat_conditioning
        both = torch.cat([x_t, x_t], dim=0)
        stacked = adapter.predict(
            both, timesteps.repeat(2), concat_conditioning(encoded.conditioning, encoded.conditioning)
        )
        assert stacked.shape == both.shape
        torch.testing.assert_close(stacked[: x_t.shape[0]], prediction, rtol=1e-4, atol=1e-5)

    def test_exact_target_round_trips_to_x0_and_eps(self, adapter, pairs):
        """``x_t = a x0 + b eps`` and prediction = the exact target: SPEC 1's conversion gives (x0, eps)."""
        x0 = adapter.encode(*pairs).x0_winner
        kind = adapter.schedule.prediction_type
        for t in TIMESTEPS:
            timesteps = torch.full((x0.shape[0],), t)
            a_t, b_t = adapter.schedule.coefficients(timesteps)
            eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
            x_t = add_noise(x0, eps, a_t, b_t)
            target = training_target(x0, eps, a_t, b_t, kind)
            x0_hat, eps_hat = predicted_x0_and_eps(target, x_t, a_t, b_t, kind)
            torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-5)
            torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-5)

    def test_saved_lora_loads_with_the_pipeline(self, adapter, pairs, model_dir, tmp_path):
        """The issue's demand: ``DiffusionPipeline.from_pretrained(base).load_lora_weights(out)``
        reproduces the trained LoRA model's output, which differs from the base model's."""
        from peft.utils import get_peft_model_state_dict

        encoded = adapter.encode(*pairs)
        x_t, timesteps = noisy_input(adapter, encoded)
        with torch.no_grad():
            base = adapter.predict(x_t, timesteps, encoded.conditioning)
            inject_lora(adapter)
            with_lora = adapter.predict(x_t, timesteps, encoded.conditioning)
        adapter.save_lora(tmp_path / "lora", get_peft_model_state_dict(adapter.denoiser))

        pipe = self.family_pipeline(model_dir)
        assert type(pipe).__name__ in adapter.pipeline_class_names
        pipe.load_lora_weights(str(tmp_path / "lora"))
        loaded_denoiser = getattr(pipe, "unet", None) or pipe.transformer
        with torch.no_grad():
            loaded = adapter.predict(x_t, timesteps, encoded.conditioning, denoiser=loaded_denoiser)
        torch.testing.assert_close(loaded, with_lora, rtol=0, atol=1e-5)
        assert (with_lora - base).abs().max() > 1e-2

    def test_lora_disabled_is_the_base_model(self, adapter, pairs, model_dir):
        encoded = adapter.encode(*pairs)
        x_t, timesteps = noisy_input(adapter, encoded)
        fresh = load_adapter(self.family, str(model_dir))
        with torch.no_grad():
            base = fresh.predict(x_t, timesteps, encoded.conditioning)
            inject_lora(adapter)
            with_lora = adapter.predict(x_t, timesteps, encoded.conditioning)
            with lora_disabled(adapter.denoiser):
                disabled = adapter.predict(x_t, timesteps, encoded.conditioning)
            after = adapter.predict(x_t, timesteps, encoded.conditioning)
        assert torch.equal(disabled, base)
        assert torch.equal(after, with_lora)  # switched back on when the block ends
        assert not torch.equal(with_lora, base)

    def test_wrong_family_directory_names_the_family(self, other_family_dir):
        with pytest.raises(SipoError, match=rf"DDPMPipeline, not a {self.family} model"):
            load_adapter(self.family, str(other_family_dir))

    def test_missing_directory(self, tmp_path):
        with pytest.raises(SipoError, match="does not exist"):
            load_adapter(self.family, str(tmp_path / "nowhere"))

    def test_directory_without_model_index(self, tmp_path):
        with pytest.raises(SipoError, match="model_index.json"):
            load_adapter(self.family, str(tmp_path))


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

    def family_pipeline(self, model_dir):
        """The family's diffusers pipeline loaded from ``model_dir`` (a family may build it otherwise)."""
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(str(model_dir))

    def scheduler_forward(self, adapter, x0: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t`` from the family's own scheduler (DDPM-style ``add_noise`` by default)."""
        return adapter.scheduler.add_noise(x0, eps, timesteps)

    def sample_kwargs(self) -> dict:
        return {"num_inference_steps": 2}

    # ------------------------------------------------------------------ fixtures
    @staticmethod
    def _config(family_overrides, model_dir, manifest, output_dir, **extra):
        # deterministic kernels: the exact resume comparison holds on CUDA too (TF32 and atomics otherwise)
        values = {"train.deterministic": True, **family_overrides, **extra}
        return load_config(None, tiny_overrides(model_dir, manifest, output_dir, **values))

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
        from sipo.models import adapter_class

        pipe = self.family_pipeline(model_dir)
        assert type(pipe).__name__ in adapter_class(self.family).pipeline_class_names
        pipe.set_progress_bar_config(disable=True)

        def generate() -> torch.Tensor:
            # prompt by name: Flux2KleinPipeline takes a conditioning image first
            output = pipe(prompt=["a photo of a cat"], generator=torch.Generator().manual_seed(0), output_type="pt",
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
