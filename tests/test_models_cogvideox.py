"""CogVideoX-2B/5B (tiny random weights): the video family contract, plus v-prediction against
CogVideoX's own schedulers and the rotary embeddings of 5B."""

from __future__ import annotations

import pytest
import torch
from video_contract import VideoFamilyContract

from sipo.models.cogvideox import FULL_TRANSFORMER_CONFIGS, CogVideoXAdapter
from sipo.schedules import predicted_x0_and_eps, training_target


@pytest.fixture(scope="module")
def cogvideox_2b_dir(tmp_path_factory):
    return CogVideoXAdapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_cogvideox_2b"), variant="2b")


@pytest.fixture(scope="module")
def cogvideox_5b_dir(tmp_path_factory):
    return CogVideoXAdapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_cogvideox_5b"), variant="5b")


class TestCogVideoX5B(VideoFamilyContract):
    """The 5B layout (rotary embeddings, no SNR shift) runs the whole contract."""

    family = "cogvideox"
    prediction_kind = "v_prediction"

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, cogvideox_5b_dir):
        return cogvideox_5b_dir

    def test_uses_rotary_embeddings_the_way_the_pipeline_builds_them(self, adapter):
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        x = torch.zeros(1, 3, 4, 4, 4)  # 3 latent frames of 4x4 -> a 2x2 patch grid
        cos, sin = adapter.rotary_embedding(x)
        config = adapter.denoiser.config
        crops = get_resize_crop_region_for_grid((2, 2), config.sample_width // 2, config.sample_height // 2)
        ref_cos, ref_sin = get_3d_rotary_pos_embed(config.attention_head_dim, crops, (2, 2), 3)
        torch.testing.assert_close(cos, ref_cos)
        torch.testing.assert_close(sin, ref_sin)
        # without them the 5B transformer computes something else
        cond = adapter.encode_prompts(["a cat"])
        t = torch.tensor([500])
        with torch.no_grad():
            with_rope = adapter.predict(torch.randn_like(x), t, cond)
            without = adapter.denoiser(hidden_states=torch.randn_like(x), encoder_hidden_states=cond["encoder_hidden_states"], timestep=t, return_dict=False)[0]
        assert not torch.allclose(with_rope, without)


class TestCogVideoX2B(VideoFamilyContract):
    family = "cogvideox"
    prediction_kind = "v_prediction"

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, cogvideox_2b_dir):
        return cogvideox_2b_dir

    def test_no_rotary_embeddings_for_2b(self, adapter):
        assert adapter.rotary_embedding(torch.zeros(1, 3, 4, 4, 4)) is None

    def test_latents_are_scaled_vae_means_in_frames_first_layout(self, adapter):
        video = torch.rand(1, 9, 3, 32, 32) * 2 - 1
        x0 = adapter.encode_images(video)
        assert x0.shape == (1, 3, 4, 4, 4)  # [B, (9-1)/4+1, C, 32/8, 32/8]
        with torch.no_grad():
            mean = adapter.vae.encode(video.permute(0, 2, 1, 3, 4)).latent_dist.mean
        torch.testing.assert_close(x0, (mean * 1.15258426).permute(0, 2, 1, 3, 4))  # 2B's published scale

    @pytest.mark.parametrize("t", [0, 25, 500, 998, 999])
    def test_v_conversion_inverts_the_schedulers_forward_process(self, adapter, model_dir, t):
        """x_t and v from CogVideoXDDIMScheduler (add_noise, get_velocity) -> (x0, eps) to 1e-5."""
        from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

        generator = torch.Generator().manual_seed(t)
        x0 = torch.randn(2, 3, 4, 4, 4, generator=generator)
        eps = torch.randn(2, 3, 4, 4, 4, generator=generator)
        timesteps = torch.tensor([t, t])
        for cls in (CogVideoXDDIMScheduler, CogVideoXDPMScheduler):
            scheduler = cls.from_pretrained(str(model_dir), subfolder="scheduler")
            x_t = scheduler.add_noise(x0, eps, timesteps)
            v = scheduler.get_velocity(x0, eps, timesteps)
            a_t, b_t = adapter.schedule.coefficients(timesteps)
            x0_hat, eps_hat = predicted_x0_and_eps(v, x_t, a_t, b_t, "v_prediction")
            torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-5)
            torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-5)
            torch.testing.assert_close(training_target(x0, eps, a_t, b_t, "v_prediction"), v, rtol=0, atol=1e-5)

    def test_schedule_is_snr_shifted_then_zero_terminal_snr(self, adapter):
        """CogVideoX-2B's alphas, computed here from its published scheduler config: scaled-linear
        betas 0.00085..0.012, abar / (3 - 2 abar) (snr_shift_scale 3: SNR / 3), then sqrt(abar)
        shifted and scaled so that it ends at 0 and starts where it started (Lin et al. 2024)."""
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        abar = torch.cumprod(1 - betas, 0)
        abar = abar / (3.0 - 2.0 * abar)
        root = abar.sqrt()
        root = (root - root[-1]) * root[0] / (root[0] - root[-1])
        assert float(adapter.schedule.a[-1]) == 0.0 and float(adapter.schedule.b[-1]) == 1.0
        torch.testing.assert_close(adapter.schedule.a, root, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(adapter.schedule.b, (1 - root**2).sqrt(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("variant, billions", [("2b", 1.69), ("5b", 5.57)])
def test_full_configs_have_the_published_parameter_counts(variant, billions):
    """The configs in code give CogVideoX-2b's 1.69B and -5b's 5.57B transformer parameters
    (model cards); counted on the meta device, nothing allocated."""
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):
        model = CogVideoXTransformer3DModel(**FULL_TRANSFORMER_CONFIGS[variant])
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.02)
