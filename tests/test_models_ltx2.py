"""LTX-2 (tiny random weights): the video family contract, plus what is LTX-2's own: the prediction equals
LTX2Pipeline's own one-step call (policy and reference), the video stream reads no audio, the latent
normalisation, the shifted/stretched inference grid of s, and the full-size transformer's parameter count."""

from __future__ import annotations

import contextlib

import pytest
import torch
from family_contract import inject_lora
from video_contract import TINY_FRAMES, TINY_SIZE, VideoFamilyContract

from sipo.models import load_adapter, lora_disabled
from sipo.models.ltx2 import FULL_SCHEDULER_CONFIG, FULL_TRANSFORMER_CONFIG, LTX2Adapter, video_tokens
from sipo.schedules import ltx2_flow_schedule


@pytest.fixture(scope="module")
def ltx2_dir(tmp_path_factory):
    return LTX2Adapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_ltx2"))


def pipeline_one_step(adapter, x_t: torch.Tensor, sigma: float, prompt: str) -> torch.Tensor:
    """``x0`` (normalised, as the adapter holds it) from ONE LTX2Pipeline step at ``sigma``, video only.

    The scheduler is the pipeline's own class set to the one sigma (no dynamic shift, no terminal
    stretch), so the step is ``x_t - sigma * u``. The video-only prediction is the pipeline's own
    modality-isolation pass: ``modality_scale=0`` makes its video guidance
    ``pred + (0 - 1) * (pred - pred_isolated) = pred_isolated`` (``audio_modality_scale=3`` > 1 turns
    the isolated pass on), no CFG, no STG, no rescale. ``latents`` go in raw (denormalised) as the
    pipeline takes 5-D latents and come back raw (``output_type="latent"``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    vae = adapter.vae
    mean = vae.latents_mean.view(1, -1, 1, 1, 1)
    std = vae.latents_std.view(1, -1, 1, 1, 1)
    scale = vae.config.scaling_factor
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        adapter.scheduler.config, use_dynamic_shifting=False, shift_terminal=None, shift=1.0)
    pipe = adapter.pipeline(scheduler=scheduler)
    frames = (x_t.shape[2] - 1) * adapter.temporal_compression + 1
    out = pipe(
        prompt=prompt, latents=x_t * std / scale + mean, sigmas=[sigma], num_inference_steps=1,
        num_frames=frames, height=x_t.shape[3] * adapter.vae_scale_spatial, width=x_t.shape[4] * adapter.vae_scale_spatial,
        guidance_scale=1.0, stg_scale=0.0, audio_stg_scale=0.0, modality_scale=0.0, audio_modality_scale=3.0,
        guidance_rescale=0.0, audio_guidance_rescale=0.0, audio_guidance_scale=1.0, spatio_temporal_guidance_blocks=None,
        max_sequence_length=adapter.max_sequence_length, output_type="latent", frame_rate=24.0,
        generator=torch.Generator().manual_seed(0),
    ).frames
    return (out - mean) * scale / std


class TestLTX2(VideoFamilyContract):
    family = "ltx2"
    prediction_kind = "flow"
    # LTX-2's grid ends with a step from sigma 0.1 (the terminal stretch) to 0: t = 25 (sigma 0.026) lies past
    # its last step, where w is undefined (SPEC 3), so the low-noise check takes t = 150 (sigma 0.151)
    log_w_timesteps = (150, 500, 999)

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, ltx2_dir):
        return ltx2_dir

    def test_latents_are_normalised_vae_modes_in_channels_first_layout(self, adapter):
        video = torch.rand(1, TINY_FRAMES, 3, TINY_SIZE, TINY_SIZE) * 2 - 1
        x0 = adapter.encode_images(video)
        assert x0.shape == (1, 8, 3, 2, 2)  # [B, C, (9-1)/4+1, 32/16, 32/16] for the toy VAE
        with torch.no_grad():
            mode = adapter.vae.encode(video.permute(0, 2, 1, 3, 4)).latent_dist.mode()
        mean = adapter.vae.latents_mean.view(1, -1, 1, 1, 1)
        std = adapter.vae.latents_std.view(1, -1, 1, 1, 1)
        # LTX2Pipeline._denormalize_latents: latents * std / scaling_factor + mean must give the VAE's latents back
        torch.testing.assert_close(x0 * std / adapter.vae.config.scaling_factor + mean, mode, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("t", [100, 700])
    def test_predict_equals_the_pipelines_one_step_for_policy_and_reference(self, adapter, t):
        inject_lora(adapter)
        x_t = torch.randn(1, 8, 3, 2, 2, generator=torch.Generator().manual_seed(t))
        timesteps = torch.tensor([t])
        sigma = float(adapter.schedule.b[t])
        cond = adapter.encode_prompts(["a cat"])
        with torch.no_grad():
            for reference in (False, True):
                with lora_disabled(adapter.denoiser) if reference else contextlib.nullcontext():
                    ours = x_t - sigma * adapter.predict(x_t, timesteps, cond)
                    theirs = pipeline_one_step(adapter, x_t, sigma, "a cat")
                relative = (ours - theirs).norm() / theirs.norm()
                assert relative <= 1e-5, (reference, float(relative))
            policy = adapter.predict(x_t, timesteps, cond)
            with lora_disabled(adapter.denoiser):
                base = adapter.predict(x_t, timesteps, cond)
        assert (policy - base).abs().max() > 1e-3  # the LoRA is live: policy and reference are two checks

    def test_the_video_stream_reads_no_audio(self, adapter):
        """predict == the transformer with the audio-video attention off and a random audio stream of 5 tokens:
        the video output does not depend on the audio input (the trainer's video-only model)."""
        model = adapter.denoiser
        x_t = torch.randn(2, 8, 3, 2, 2, generator=torch.Generator().manual_seed(1))
        cond = adapter.encode_prompts(["a cat", "a dog"])
        timestep = adapter.model_timesteps(torch.tensor([300, 800]))
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            ours = adapter.predict(x_t, torch.tensor([300, 800]), cond)
            tokens = x_t.permute(0, 2, 3, 4, 1).reshape(2, 12, 8)
            coords = model.rope.prepare_video_coords(2, 3, 2, 2, x_t.device, fps=24.0)
            kwargs = dict(hidden_states=tokens, encoder_hidden_states=cond["encoder_hidden_states"], timestep=timestep,
                          sigma=timestep, encoder_attention_mask=cond["encoder_attention_mask"], num_frames=3, height=2,
                          width=2, fps=24.0, audio_num_frames=5, video_coords=coords, use_cross_timestep=True, return_dict=False)
            audio = dict(audio_hidden_states=torch.randn(2, 5, 4, generator=generator),
                         audio_encoder_hidden_states=torch.randn(2, 3, 16, generator=generator))
            isolated = model(**kwargs, **audio, isolate_modalities=True)[0]
            joint = model(**kwargs, **audio, isolate_modalities=False)[0]
        torch.testing.assert_close(ours, isolated.reshape(2, 3, 2, 2, 8).permute(0, 4, 1, 2, 3), rtol=1e-5, atol=1e-6)
        assert (joint - isolated).abs().max() > 1e-4  # with the attention on, the audio would reach the video

    def test_lora_sits_on_the_video_attention_only(self, adapter):
        inject_lora(adapter)
        names = [n for n, _ in adapter.denoiser.named_parameters() if "lora_A" in n]
        assert names and all(".attn1." in n or ".attn2." in n for n in names)
        assert not any("audio" in n for n in names)

    def test_s_is_the_previous_step_of_the_pipelines_shifted_stretched_grid(self, adapter):
        """Against FlowMatchEulerDiscreteScheduler's own time_shift and stretch_shift_to_terminal: tau_t found by
        bisection on the scheduler's map, s one inference step (1/n) lower in tau; below the grid's last point
        (sigma 0.1 at tau = 1/n) the map is the straight line to 0."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(**FULL_SCHEDULER_CONFIG)
        n, mu = 30, 1.7
        schedule = ltx2_flow_schedule(1000, mu, 0.1, n)
        last = scheduler.time_shift(mu, 1.0, torch.tensor([1.0 / n], dtype=torch.float64))

        def grid_sigma(tau: float) -> float:
            if tau < 1.0 / n:
                return 0.1 * n * max(tau, 0.0)
            shifted = scheduler.time_shift(mu, 1.0, torch.tensor([tau], dtype=torch.float64))
            return float(scheduler.stretch_shift_to_terminal(torch.cat([shifted, last]))[0])

        scheduler.set_timesteps(sigmas=list(torch.linspace(1.0, 1.0 / n, n).tolist()), mu=mu)
        grid = scheduler.sigmas.double()
        assert float(grid[-2]) == pytest.approx(0.1, abs=1e-6)  # the stretch lands the last step on 0.1
        assert [grid_sigma(1 - k / n) for k in range(n)] == pytest.approx(grid[:-1].tolist(), abs=1e-6)
        for t in (40, 150, 220, 400, 700, 999):  # sigma 0.041 (past the last step), 0.151 and 0.221 (the last two)
            sigma_t = (t + 1) / 1000
            low, high = 0.0, 1.0
            for _ in range(80):
                middle = (low + high) / 2
                low, high = (middle, high) if grid_sigma(middle) < sigma_t else (low, middle)
            expected = grid_sigma(low - 1.0 / n)
            a_s, b_s = schedule.previous_coefficients(torch.tensor([t]))
            assert float(b_s[0]) == pytest.approx(expected, abs=1e-6)
            assert float(a_s[0]) == pytest.approx(1 - expected, abs=1e-6)
        assert float(schedule.previous_coefficients(torch.tensor([40]))[1][0]) == 0.0

    def test_the_adapters_grid_follows_the_clip_size(self, model_dir):
        """mu of the pipeline's calculate_shift at the run's token count: 9 frames of 32x32 -> 3 x 2 x 2 = 12 tokens."""
        adapter = load_adapter(self.family, str(model_dir), num_frames=TINY_FRAMES, height=TINY_SIZE, width=TINY_SIZE)
        assert adapter.tokens == 12
        assert adapter.mu == pytest.approx(0.95 + (2.05 - 0.95) / (4096 - 1024) * (12 - 1024))


def test_video_tokens_of_the_usual_clip():
    assert video_tokens(121, 512, 768) == 16 * 16 * 24 == 6144


def test_full_config_has_the_published_parameter_count():
    """LTX-2: 19B parameters (Lightricks/LTX-2 model card, checkpoint ltx-2-19b-dev); the diffusers transformer
    built from LTX-2.0's config (scripts/convert_ltx2_to_diffusers.py) on meta has 18.88B (5.71B of them in
    the audio stream); the text connectors, split out by the conversion, are 1.43B more."""
    from diffusers import LTX2VideoTransformer3DModel

    with torch.device("meta"):
        model = LTX2VideoTransformer3DModel(**FULL_TRANSFORMER_CONFIG)
    total = sum(p.numel() for p in model.parameters()) / 1e9
    assert total == pytest.approx(18.88, abs=0.01)
    assert round(total) == 19
