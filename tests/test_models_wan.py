"""Wan2.1 (tiny random weights): the video family contract, plus rectified flow against
diffusers' flow schedulers with the checkpoint's shift."""

from __future__ import annotations

import pytest
import torch
from video_contract import VideoFamilyContract

from sipo.models.wan import FULL_TRANSFORMER_CONFIG, WanAdapter
from sipo.schedules import predicted_x0_and_eps, training_target


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return WanAdapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_wan"))


class TestWan(VideoFamilyContract):
    family = "wan"
    prediction_kind = "flow"

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, wan_dir):
        return wan_dir

    def test_latents_are_normalised_vae_means_in_channels_first_layout(self, adapter):
        video = torch.rand(1, 9, 3, 32, 32) * 2 - 1
        x0 = adapter.encode_images(video)
        assert x0.shape == (1, 16, 3, 4, 4)  # [B, C, (9-1)/4+1, 32/8, 32/8]
        with torch.no_grad():
            mean = adapter.vae.encode(video.permute(0, 2, 1, 3, 4)).latent_dist.mean
        config = adapter.vae.config
        mu = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
        sd = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
        # WanPipeline decodes latents * std + mean: x0 must be the inverse
        torch.testing.assert_close(x0 * sd + mu, mean, rtol=1e-5, atol=1e-5)

    def test_shift_and_timesteps_are_the_flow_schedulers(self, adapter):
        """Training index t <-> FlowMatchEulerDiscreteScheduler(shift=3) step T-1-t: same sigma and
        the same float timestep sigma*T that the pipeline passes to the transformer."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        assert adapter.flow_shift == 3.0  # Wan2.1-T2V-1.3B's scheduler config (flow_shift, 480p)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        t = torch.tensor([0, 25, 500, 999])
        torch.testing.assert_close(adapter.model_timesteps(t), scheduler.timesteps[999 - t].float(), rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(adapter.schedule.b[t].float(), scheduler.sigmas[999 - t].float(), rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("t", [0, 25, 500, 999])
    def test_flow_conversion_inverts_scale_noise(self, adapter, t):
        """x_t from FlowMatchEulerDiscreteScheduler.scale_noise and u = eps - x0 -> (x0, eps) to 1e-5."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=adapter.flow_shift)
        generator = torch.Generator().manual_seed(t)
        x0 = torch.randn(2, 16, 3, 4, 4, generator=generator)
        eps = torch.randn(2, 16, 3, 4, 4, generator=generator)
        timesteps = torch.tensor([t, t])
        # the scheduler's own timestep for training index t (test_shift_and_timesteps... checks they agree)
        x_t = scheduler.scale_noise(x0, scheduler.timesteps[999 - timesteps], eps)
        a_t, b_t = adapter.schedule.coefficients(timesteps)
        u = training_target(x0, eps, a_t, b_t, "flow")
        x0_hat, eps_hat = predicted_x0_and_eps(u, x_t, a_t, b_t, "flow")
        torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-5)
        torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-5)

    def test_flow_conversion_inverts_unipc_add_noise_on_its_own_grid(self, model_dir):
        """The saved scheduler (UniPC on flow sigmas, as Wan ships it) at its inference timesteps."""
        from diffusers import UniPCMultistepScheduler

        scheduler = UniPCMultistepScheduler.from_pretrained(str(model_dir), subfolder="scheduler")
        scheduler.set_timesteps(50)
        generator = torch.Generator().manual_seed(0)
        x0 = torch.randn(3, 16, 3, 4, 4, generator=generator)
        eps = torch.randn(3, 16, 3, 4, 4, generator=generator)
        index = torch.tensor([0, 25, 49])
        x_t = scheduler.add_noise(x0, eps, scheduler.timesteps[index])
        sigma = scheduler.sigmas[index].float()
        x0_hat, eps_hat = predicted_x0_and_eps(eps - x0, x_t, 1 - sigma, sigma, "flow")
        torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-5)
        torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-5)


def test_full_config_has_the_published_parameter_count():
    """Wan2.1-T2V-1.3B: 1.42B transformer parameters (counted from its published config on meta)."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**FULL_TRANSFORMER_CONFIG)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(1.42, abs=0.02)
