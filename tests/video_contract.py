"""What every video family must do, checked on its tiny random-weight pipeline (STYLE 9).

A family's test module subclasses `VideoFamilyContract`, provides the fixture ``model_dir`` (a
saved tiny pipeline) and sets ``family`` and ``prediction_kind``; the tests train 2 steps with dpo
and sipo on mp4 clips written by PyAV, resume exactly, run the analysis, load the saved LoRA into
the family's diffusers pipeline and generate, and compare log w against torch.distributions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from family_contract import independent_x0_hat
from safetensors.torch import load_file
from train_fixtures import tiny_overrides
from video_fixtures import write_video_pairs

from sipo.checkpoints import list_checkpoints
from sipo.config import load_config
from sipo.models import load_adapter
from sipo.preference import PairNoise, compute_pair_terms
from sipo.train import train

TINY_FRAMES, TINY_SIZE = 9, 32


def video_overrides(family: str, model_dir: Path, manifest: Path, output_dir: Path, **extra: object) -> list[str]:
    """``train_fixtures.tiny_overrides`` pointed at a video family's tiny pipeline and tiny clips."""
    video = {
        "model.family": family,
        "model.resolution": TINY_SIZE,
        "model.prompt_cache_size": 16,
        "data.num_frames": TINY_FRAMES,
        "data.fps": 8,
        "data.height": TINY_SIZE,
        "data.width": TINY_SIZE,
        "objective.tau": 0.05,
        "train.batch_size": 1,
        "train.deterministic": True,  # the exact comparisons (resume, cache) hold on CUDA too
    }
    return tiny_overrides(model_dir, manifest, output_dir, **{**video, **extra})


def gaussian_log_w_reference(x0, x0_hat, x_t, posterior_noise, a_t, b_t, a_s, b_s) -> torch.Tensor:
    """log w per sample, mean over elements, in float64 from Gaussian conditioning + torch.distributions.

    Independent of sipo.objectives: with ``x_s = a_s x0 + b_s e`` and ``x_t = r x_s + sqrt(b_t^2 - r^2 b_s^2) z``
    (``r = a_t / a_s``), ``(x_s, x_t)`` are jointly Gaussian given ``x0`` with ``Var x_s = b_s^2``,
    ``Var x_t = b_t^2`` and ``Cov = r b_s^2``, so ``x_s | x_t, x0`` has mean
    ``a_s x0 + (r b_s^2 / b_t^2)(x_t - a_t x0)`` and variance ``b_s^2 - r^2 b_s^4 / b_t^2``.
    """
    shape = (-1,) + (1,) * (x0.ndim - 1)
    a_t, b_t, a_s, b_s = (c.double().reshape(shape) for c in (a_t, b_t, a_s, b_s))
    x0, x0_hat, x_t, noise = x0.double(), x0_hat.double(), x_t.double(), posterior_noise.double()
    r = a_t / a_s
    gain = r * b_s**2 / b_t**2
    var = b_s**2 - r**2 * b_s**4 / b_t**2
    mean_true = a_s * x0 + gain * (x_t - a_t * x0)
    mean_model = a_s * x0_hat + gain * (x_t - a_t * x0_hat)
    x_prev = mean_true + var.sqrt() * noise
    scale = var.sqrt().expand_as(x0)
    p = torch.distributions.Normal(mean_model, scale).log_prob(x_prev)
    q = torch.distributions.Normal(mean_true, scale).log_prob(x_prev)
    return (p - q).flatten(1).mean(dim=1)


class VideoFamilyContract:
    family: str = ""
    #: what the family's transformer predicts ("v_prediction" or "flow"), stated by its test module
    #: rather than read from the adapter, so a wrong schedule fails the log w check
    prediction_kind: str = ""
    #: low, middle and high noise for the log w check; each must have a previous inference step (b_s > 0)
    log_w_timesteps: tuple[int, int, int] = (25, 500, 999)
    #: the test module's fixture `model_dir` gives the saved tiny pipeline

    @pytest.fixture(scope="class")
    @classmethod
    def manifest(cls, tmp_path_factory) -> Path:
        return write_video_pairs(tmp_path_factory.mktemp(f"{cls.family}_pairs"), num_pairs=3, frames=TINY_FRAMES, size=TINY_SIZE)

    @pytest.fixture(scope="class")
    @classmethod
    def trained(cls, model_dir, manifest, tmp_path_factory):
        """A 2-step sipo run (checkpoint each step) shared by the load/analyze/resume tests."""
        output_dir = tmp_path_factory.mktemp(f"{cls.family}_sipo")
        config = load_config(None, video_overrides(cls.family, model_dir, manifest, output_dir, **{"objective.name": "sipo"}))
        return train(config, progress=False), config

    # ------------------------------------------------------------------ training
    def test_sipo_trains_two_steps_with_finite_loss_and_changes_lora(self, trained):
        result, config = trained
        assert result.steps == 2
        assert all(math.isfinite(r["loss"]) for r in result.history)
        lora_b = {k: v for k, v in load_file(list_checkpoints(Path(config.train.output_dir))[-1] / "trainable.safetensors").items() if "lora_B" in k}
        assert lora_b and any(v.abs().max() > 0 for v in lora_b.values())  # peft's gaussian init: B starts at 0

    def test_dpo_trains_two_steps_with_finite_loss_and_changes_lora(self, model_dir, manifest, tmp_path):
        config = load_config(None, video_overrides(self.family, model_dir, manifest, tmp_path, **{"objective.name": "dpo"}))
        result = train(config, progress=False)
        assert result.steps == 2 and all(math.isfinite(r["loss"]) for r in result.history)
        saved = load_file(tmp_path / "pytorch_lora_weights.safetensors")
        assert any("lora_B" in k and v.abs().max() > 0 for k, v in saved.items())

    def test_resume_continues_exactly(self, trained, model_dir, manifest, tmp_path):
        """Stop after step 1 (a crash), resume to step 2: the same weights and losses as the straight run."""
        straight, straight_config = trained

        def crash(step, adapter):
            if step == 2:
                raise RuntimeError("simulated crash")

        config = load_config(None, video_overrides(self.family, model_dir, manifest, tmp_path, **{"objective.name": "sipo"}))
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(config, step_callback=crash, progress=False)
        resumed = train(config, resume=True, progress=False)
        assert resumed.steps == 2
        a = list_checkpoints(Path(straight_config.train.output_dir))[-1]
        b = list_checkpoints(tmp_path)[-1]
        weights_a, weights_b = load_file(a / "trainable.safetensors"), load_file(b / "trainable.safetensors")
        for name in weights_a:
            torch.testing.assert_close(weights_a[name], weights_b[name], rtol=0, atol=1e-6)
        assert json.loads((a / "state.json").read_text()) == json.loads((b / "state.json").read_text())
        assert [r["loss"] for r in straight.history] == pytest.approx([r["loss"] for r in resumed.history], abs=1e-6)

    def test_analyze_runs_on_the_trained_run(self, trained, tmp_path):
        from sipo import analysis

        _, config = trained
        result = analysis.run_analysis(
            config, checkpoint=config.train.output_dir, num_pairs=2, num_buckets=2, output_dir=tmp_path,
            progress=False, verbose=False, plots=False,
        )
        assert (tmp_path / "analysis.csv").is_file() or list(tmp_path.glob("*.csv"))
        assert result is not None

    def test_saved_lora_loads_into_the_family_pipeline_and_generates(self, trained, model_dir):
        import diffusers

        result, config = trained
        adapter = result.adapter
        device = next(adapter.denoiser.parameters()).device  # where training left it (CUDA when present)
        pipe = getattr(diffusers, adapter.pipeline_class_name).from_pretrained(str(model_dir)).to(device)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        x0 = torch.randn(adapter.encode_images(torch.zeros(1, TINY_FRAMES, 3, TINY_SIZE, TINY_SIZE)).shape, generator=generator)
        x0 = x0.to(device)
        cond = adapter.encode_prompts(["a moving gradient 0"])
        t = torch.tensor([500], device=device)
        with torch.no_grad():
            base = adapter.predict(x0, t, cond, denoiser=pipe.transformer)
            pipe.load_lora_weights(str(config.train.output_dir))
            tuned = adapter.predict(x0, t, cond, denoiser=pipe.transformer)
            trained_out = adapter.predict(x0, t, cond)
            video = pipe(
                prompt="a moving gradient", num_frames=TINY_FRAMES, height=TINY_SIZE, width=TINY_SIZE,
                num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt",
                max_sequence_length=adapter.max_sequence_length,
            ).frames
        assert not torch.allclose(base, tuned)
        torch.testing.assert_close(tuned, trained_out, rtol=1e-4, atol=1e-5)  # alpha/rank restored from the file
        assert video.shape == (1, TINY_FRAMES, 3, TINY_SIZE, TINY_SIZE) and torch.isfinite(video).all()

    # ------------------------------------------------------------------ adapter pieces
    @pytest.fixture
    def adapter(self, model_dir):
        adapter = load_adapter(self.family, str(model_dir))
        adapter.freeze_encoders()
        adapter.denoiser.eval()
        return adapter

    def test_sample_gives_videos_in_unit_range(self, adapter):
        video = adapter.sample(["a cat"], generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                               num_frames=TINY_FRAMES, height=TINY_SIZE, width=TINY_SIZE)
        assert video.shape == (1, TINY_FRAMES, 3, TINY_SIZE, TINY_SIZE)
        assert video.min() >= 0 and video.max() <= 1

    def test_prompt_cache_encodes_each_prompt_once_and_matches_uncached(self, model_dir):
        cached = load_adapter(self.family, str(model_dir), prompt_cache_size=2)
        plain = load_adapter(self.family, str(model_dir))
        calls = []
        original = cached._encode_prompts_uncached
        cached._encode_prompts_uncached = lambda prompts: calls.append(list(prompts)) or original(prompts)
        prompts = ["a cat", "a dog", "a cat"]
        first = cached.encode_prompts(prompts)["encoder_hidden_states"]
        again = cached.encode_prompts(["a dog"])["encoder_hidden_states"]
        assert calls == [["a cat", "a dog"]]
        torch.testing.assert_close(first, plain.encode_prompts(prompts)["encoder_hidden_states"])
        torch.testing.assert_close(again[0], first[1])
        cached.encode_prompts(["a red cat"])  # evicts the least recently used ("a cat")
        assert list(cached._prompt_memo) == ["a dog", "a red cat"]

    def test_cpu_text_encoder_stays_on_cpu_when_the_adapter_moves(self, model_dir):
        adapter = load_adapter(self.family, str(model_dir), text_encoder_device="cpu")
        adapter.to("meta")
        assert next(adapter.text_encoder.parameters()).device.type == "cpu"
        assert next(adapter.denoiser.parameters()).device.type == "meta"

    def test_wrong_frame_count_is_one_sentence(self, adapter):
        from sipo.errors import SipoError

        with pytest.raises(SipoError, match="data.num_frames"):
            adapter.encode_images(torch.zeros(1, TINY_FRAMES - 1, 3, TINY_SIZE, TINY_SIZE))

    def test_log_w_equals_gaussian_log_density_ratio(self, adapter):
        """At low, middle and high noise the trainer's log w equals an independent float64 reference."""
        generator = torch.Generator().manual_seed(0)
        shape = adapter.encode_images(torch.zeros(1, TINY_FRAMES, 3, TINY_SIZE, TINY_SIZE)).shape[1:]
        timesteps = torch.tensor(self.log_w_timesteps)
        x0_w, x0_l = (torch.randn(3, *shape, generator=generator) for _ in range(2))
        noise = PairNoise(timesteps, torch.randn(3, *shape, generator=generator), torch.randn(3, *shape, generator=generator))
        cond = adapter.encode_prompts(["a cat", "a dog", "a red cat"])
        from sipo.models.base import EncodedPairs

        with torch.no_grad():
            terms = compute_pair_terms(
                adapter, EncodedPairs(x0_w, x0_l, cond), noise, beta=1.0,
                reference_predict=lambda x, t, c: adapter.predict(x, t, c),
            )
        a_t, b_t = adapter.schedule.coefficients(timesteps)
        a_s, b_s = adapter.schedule.previous_coefficients(timesteps)
        for x0, log_w in ((x0_w, terms.log_w_winner), (x0_l, terms.log_w_loser)):
            x_t = a_t.double().view(-1, *[1] * len(shape)) * x0.double() + b_t.double().view(-1, *[1] * len(shape)) * noise.eps.double()
            with torch.no_grad():
                prediction = adapter.predict(x_t.float(), timesteps, cond).double()
            x0_hat = independent_x0_hat(prediction, x_t, a_t, b_t, self.prediction_kind)
            expected = gaussian_log_w_reference(x0, x0_hat, x_t, noise.posterior_noise, a_t, b_t, a_s, b_s)
            assert expected.abs().min() > 0  # a real signal, not 0 == 0
            torch.testing.assert_close(log_w.double(), expected, rtol=2e-3, atol=1e-6)
