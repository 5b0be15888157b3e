"""HunyuanVideo 1.5 (tiny random weights): the video family contract, plus what is its own: the prediction
equals HunyuanVideo15Pipeline's own one-step call (policy and reference), the trainer's shift-3 timesteps and
the pipeline's shift-5 grid of s, the latent scaling, sipo's LoRA loader against W + (alpha/r) B A by hand, and
the full-size transformer's parameter count."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
from family_contract import inject_lora
from safetensors.torch import save_file
from video_contract import TINY_FRAMES, TINY_SIZE, VideoFamilyContract

from sipo.errors import SipoError
from sipo.models import load_adapter, lora_disabled
from sipo.models.hunyuanvideo15 import FULL_TRANSFORMER_CONFIG, HunyuanVideo15Adapter, load_lora_weights


@pytest.fixture(scope="module")
def hunyuan_dir(tmp_path_factory):
    return HunyuanVideo15Adapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_hunyuanvideo15"))


def shift(u: float, c: float) -> float:
    return c * u / (1 + (c - 1) * u)


def pipeline_one_step(adapter, x_t: torch.Tensor, sigma: float, prompt: str) -> torch.Tensor:
    """``x_t - sigma * u`` from ONE HunyuanVideo15Pipeline step: its scheduler class set to the one sigma
    (shift 1, so the given sigma stays), CFG off (guidance 1), latents in and out as the pipeline holds them."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.guiders import ClassifierFreeGuidance

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(adapter.scheduler.config, shift=1.0)
    pipe = adapter.pipeline(scheduler=scheduler, guider=ClassifierFreeGuidance(guidance_scale=1.0))
    frames = (x_t.shape[2] - 1) * adapter.temporal_compression + 1
    return pipe(
        prompt=prompt, latents=x_t, sigmas=[sigma], num_inference_steps=1, num_frames=frames,
        height=x_t.shape[3] * adapter.vae_scale_spatial, width=x_t.shape[4] * adapter.vae_scale_spatial,
        output_type="latent",
    ).frames


class TestHunyuanVideo15(VideoFamilyContract):
    family = "hunyuanvideo15"
    prediction_kind = "flow"
    # t = 25 (sigma 0.074 after the trainer's shift 3) lies below the 50-step shift-5 grid's last point
    # (sigma 0.093), where w is undefined (SPEC 3): the low-noise check takes t = 100 (sigma 0.252)
    log_w_timesteps = (100, 500, 999)

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, hunyuan_dir):
        return hunyuan_dir

    def test_saved_lora_loads_into_the_family_pipeline_and_generates(self, trained, model_dir):
        """Replaced: HunyuanVideo15Pipeline has no load_lora_weights; sipo's loader puts the run's LoRA into the
        pipeline's transformer, which then predicts as the trained adapter, and the pipeline generates."""
        from diffusers import HunyuanVideo15Pipeline

        result, config = trained
        adapter = result.adapter
        device = next(adapter.denoiser.parameters()).device
        pipe = HunyuanVideo15Pipeline.from_pretrained(str(model_dir)).to(device)
        pipe.set_progress_bar_config(disable=True)
        x = torch.randn(1, 4, 3, 2, 2, generator=torch.Generator().manual_seed(0)).to(device)
        cond = adapter.encode_prompts(["a moving gradient 0"])
        t = torch.tensor([500], device=device)
        with torch.no_grad():
            base = adapter.predict(x, t, cond, denoiser=pipe.transformer)
            load_lora_weights(pipe, config.train.output_dir)
            tuned = adapter.predict(x, t, cond, denoiser=pipe.transformer)
            trained_out = adapter.predict(x, t, cond)
            video = pipe(prompt="a moving gradient", num_frames=TINY_FRAMES, height=TINY_SIZE, width=TINY_SIZE,
                         num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").frames
        assert not torch.allclose(base, tuned)
        torch.testing.assert_close(tuned, trained_out, rtol=1e-4, atol=1e-5)
        assert video.shape == (1, TINY_FRAMES, 3, TINY_SIZE, TINY_SIZE) and torch.isfinite(video).all()

    def test_latents_are_scaled_vae_modes(self, adapter):
        video = torch.rand(1, TINY_FRAMES, 3, TINY_SIZE, TINY_SIZE) * 2 - 1
        x0 = adapter.encode_images(video)
        assert x0.shape == (1, 4, 3, 2, 2)  # [B, C, (9-1)/4+1, 32/16, 32/16] for the toy VAE
        with torch.no_grad():
            mode = adapter.vae.encode(video.permute(0, 2, 1, 3, 4)).latent_dist.mode()
        # HunyuanVideo15Pipeline decodes latents / scaling_factor
        torch.testing.assert_close(x0 / adapter.vae.config.scaling_factor, mode, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("t", [100, 700])
    def test_predict_equals_the_pipelines_one_step_for_policy_and_reference(self, adapter, t):
        inject_lora(adapter)
        x_t = torch.randn(1, 4, 3, 2, 2, generator=torch.Generator().manual_seed(t))
        timesteps = torch.tensor([t])
        sigma = float(adapter.schedule.b[t])
        cond = adapter.encode_prompts(['a "sign" and a cat'])  # quoted text: the ByT5 states are live too
        assert cond["encoder_attention_mask_2"].sum() > 0
        with torch.no_grad():
            for reference in (False, True):
                with lora_disabled(adapter.denoiser) if reference else contextlib.nullcontext():
                    ours = x_t - sigma * adapter.predict(x_t, timesteps, cond)
                    theirs = pipeline_one_step(adapter, x_t, sigma, 'a "sign" and a cat')
                relative = (ours - theirs).norm() / theirs.norm()
                assert relative <= 1e-5, (reference, float(relative))
            policy = adapter.predict(x_t, timesteps, cond)
            with lora_disabled(adapter.denoiser):
                base = adapter.predict(x_t, timesteps, cond)
        assert (policy - base).abs().max() > 1e-3

    def test_timesteps_are_the_trainers_shift_3_and_s_the_pipelines_shift_5_grid(self, adapter):
        """sigma_t = 3u / (1 + 2u), u = (t+1)/T (train.py's timestep_transform); s: one step lower on the grid
        FlowMatchEulerDiscreteScheduler(shift=5) makes of linspace(1, 0, 51)[:-1], tau found by bisection."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        n = 50
        assert adapter.schedule.num_inference_steps == n and adapter.inference_shift == 5.0
        scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)

        def grid_sigma(tau: float) -> float:
            if tau <= 0:
                return 0.0
            scheduler.set_timesteps(sigmas=[tau])
            return float(scheduler.sigmas[0])

        for t in (100, 400, 800, 999):
            sigma_t = shift((t + 1) / 1000, 3.0)
            assert float(adapter.model_timesteps(torch.tensor([t]))[0]) == pytest.approx(1000 * sigma_t, rel=1e-5)
            low, high = 0.0, 1.0
            for _ in range(60):
                middle = (low + high) / 2
                low, high = (middle, high) if grid_sigma(middle) < sigma_t else (low, middle)
            _, b_s = adapter.schedule.previous_coefficients(torch.tensor([t]))
            assert float(b_s[0]) == pytest.approx(grid_sigma(low - 1 / n), abs=1e-6)
        scheduler.set_timesteps(sigmas=list(torch.linspace(1, 0, n + 1)[:-1].tolist()))
        assert float(scheduler.sigmas[-2]) == pytest.approx(shift(1 / n, 5.0), abs=1e-6)  # the grid's last point


def test_load_lora_weights_is_w_plus_alpha_over_r_b_a_by_hand(hunyuan_dir, tmp_path):
    """A LoRA file written by hand (diffusers' format: transformer.-prefixed peft keys, rank/alpha/targets in
    its metadata) loads into HunyuanVideo15Pipeline's transformer so that it computes exactly as the base
    transformer with W replaced by W + (alpha / r) B A in each target Linear."""
    from diffusers import HunyuanVideo15Pipeline

    pipe = HunyuanVideo15Pipeline.from_pretrained(str(hunyuan_dir))
    base = copy.deepcopy(pipe.transformer)
    rank, alpha = 2, 6
    generator = torch.Generator().manual_seed(0)
    targets = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.0.ff.net.2"]
    weights = {}
    with torch.no_grad():
        for name in targets:
            linear = base.get_submodule(name)
            down = torch.randn(rank, linear.in_features, generator=generator) * 0.3
            up = torch.randn(linear.out_features, rank, generator=generator) * 0.3
            weights[f"transformer.{name}.lora_A.weight"] = down
            weights[f"transformer.{name}.lora_B.weight"] = up
            linear.weight += alpha / rank * up @ down
    metadata = {"transformer.r": rank, "transformer.lora_alpha": alpha, "transformer.target_modules": targets}
    save_file(weights, str(tmp_path / "pytorch_lora_weights.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata)})
    load_lora_weights(pipe, tmp_path)
    adapter = load_adapter("hunyuanvideo15", str(hunyuan_dir))
    x = torch.randn(1, 4, 3, 2, 2, generator=generator)
    cond = adapter.encode_prompts(["a cat"])
    with torch.no_grad():
        loaded = adapter.predict(x, torch.tensor([600]), cond, denoiser=pipe.transformer)
        by_hand = adapter.predict(x, torch.tensor([600]), cond, denoiser=base)
        plain = adapter.predict(x, torch.tensor([600]), cond)
    torch.testing.assert_close(loaded, by_hand, rtol=1e-5, atol=1e-6)
    assert (loaded - plain).abs().max() > 1e-3  # the LoRA changed the output


def test_load_lora_weights_without_a_file_is_one_sentence(hunyuan_dir, tmp_path):
    from diffusers import HunyuanVideo15Pipeline

    pipe = HunyuanVideo15Pipeline.from_pretrained(str(hunyuan_dir))
    with pytest.raises(SipoError, match="no LoRA file"):
        load_lora_weights(pipe, tmp_path)


def test_full_config_has_the_published_parameter_count():
    """HunyuanVideo 1.5: 8.3B parameters (tencent/HunyuanVideo-1.5 model card, "8.3B"); the 480p t2v
    transformer built from its diffusers config on meta has 8.33B."""
    from diffusers import HunyuanVideo15Transformer3DModel

    with torch.device("meta"):
        model = HunyuanVideo15Transformer3DModel(**FULL_TRANSFORMER_CONFIG)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(8.3, abs=0.05)
