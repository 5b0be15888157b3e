"""FLUX.1 on a tiny random-weight FluxPipeline saved to disk and loaded by the real code.

The shared contracts (tests/family_contract.py) run on it; the tests below check what is FLUX's own
against diffusers' FluxPipeline and FlowMatchEulerDiscreteScheduler: the shifted/scaled latents,
2x2 packing and position ids, the conditioning, the guidance embedding, the unshifted training grid
and the resolution-shifted inference grid that sets s, and the full-size parameter count.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from family_contract import AdapterContract, FamilyContract
from tiny_models import make_image_pairs
from train_fixtures import tiny_overrides, write_jsonl_pairs

from sipo.config import load_config
from sipo.models import load_adapter
from sipo.models.flux import FULL_TRANSFORMER_CONFIG, FluxAdapter, latent_image_ids, pack_latents, unpack_latents

TINY_SIZE = 32  # pixels; the tiny VAE downsamples 4x -> latents [4, 8, 8] -> 16 packed tokens
FAMILY_OVERRIDES = {"model.family": "flux", "model.resolution": TINY_SIZE}


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory) -> Path:
    return FluxAdapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_flux"), scale="tiny", seed=0)


class TestFlux(AdapterContract, FamilyContract):
    family = "flux"

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tiny_flux_dir):
        return tiny_flux_dir

    @pytest.fixture
    def pairs(self):
        return make_image_pairs(size=TINY_SIZE)

    @pytest.fixture(scope="class")
    @classmethod
    def manifest(cls, tmp_path_factory):
        return write_jsonl_pairs(tmp_path_factory.mktemp("flux_pairs"), num_pairs=4, size=TINY_SIZE)

    @pytest.fixture(scope="class")
    @classmethod
    def family_overrides(cls):
        return dict(FAMILY_OVERRIDES)

    def scheduler_forward(self, adapter, x0, eps, timesteps):
        """FlowMatchEulerDiscreteScheduler.scale_noise at the scheduler's own timestep of index t
        (its timesteps descend: training index t is its entry T - 1 - t)."""
        scheduler = adapter.scheduler
        return scheduler.scale_noise(x0, scheduler.timesteps[999 - timesteps], eps)

    def sample_kwargs(self):
        return {"num_inference_steps": 2, "height": TINY_SIZE, "width": TINY_SIZE, "max_sequence_length": 32}

    # ------------------------------------------------------------------ FLUX's own inputs
    def test_latents_are_shifted_and_scaled_vae_means(self, adapter, pairs):
        prompts, winners, losers = pairs
        encoded = adapter.encode(prompts, winners, losers)
        with torch.no_grad():
            mean = adapter.vae.encode(winners).latent_dist.mean
        assert (adapter.vae.config.shift_factor, adapter.vae.config.scaling_factor) == (0.1159, 0.3611)  # FLUX.1's VAE
        # FluxPipeline decodes latents / scaling_factor + shift_factor: x0 must be the inverse
        torch.testing.assert_close(encoded.x0_winner / 0.3611 + 0.1159, mean, rtol=1e-5, atol=1e-5)
        assert encoded.x0_winner.shape == (2, 4, 8, 8)

    def test_packing_and_position_ids_are_the_pipelines(self):
        from diffusers import FluxPipeline

        latents = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(0))
        packed = pack_latents(latents)
        torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 4, 6, 8), rtol=0, atol=0)
        # _unpack_latents takes pixel sizes: latent 6x8 at VAE factor 4 is a 24x32 picture
        torch.testing.assert_close(unpack_latents(packed, 6, 8), FluxPipeline._unpack_latents(packed, 24, 32, 4), rtol=0, atol=0)
        torch.testing.assert_close(unpack_latents(packed, 6, 8), latents, rtol=0, atol=0)
        expected_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 4, torch.device("cpu"), torch.float32)
        torch.testing.assert_close(latent_image_ids(6, 8, torch.device("cpu"), torch.float32), expected_ids, rtol=0, atol=0)

    def test_conditioning_is_what_the_pipeline_feeds_its_transformer(self, adapter, pairs):
        prompts, winners, losers = pairs
        cond = adapter.encode(prompts, winners, losers).conditioning
        with torch.no_grad():
            states, pooled, text_ids = adapter.pipeline().encode_prompt(prompts, prompt_2=None, max_sequence_length=32)
        assert cond["encoder_hidden_states"].shape == (2, 32, 16) and cond["pooled_projections"].shape == (2, 32)
        torch.testing.assert_close(cond["encoder_hidden_states"], states)
        torch.testing.assert_close(cond["pooled_projections"], pooled)
        assert torch.equal(text_ids, torch.zeros(32, 3))

    def test_prediction_is_the_pipelines_euler_step(self, adapter, tiny_flux_dir):
        """One FluxPipeline step from x_1 = eps (sigmas [1, 0]) is x_0 = eps - u_hat(eps, sigma = 1): the
        pipeline's transformer call (packing, ids, timestep / 1000, guidance 3.5) and ours agree."""
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(str(tiny_flux_dir))
        pipe.set_progress_bar_config(disable=True)
        eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        cond = adapter.encode_prompts(["a red cat"])
        with torch.no_grad():
            packed = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
                          latents=pack_latents(eps), height=TINY_SIZE, width=TINY_SIZE, num_inference_steps=1,
                          guidance_scale=3.5, output_type="latent", max_sequence_length=32).images
            expected = eps - adapter.predict(eps, torch.tensor([999]), cond)  # index 999: sigma = 1
        assert pipe.scheduler.sigmas.tolist() == pytest.approx([1.0, 0.0])
        torch.testing.assert_close(unpack_latents(packed, 8, 8), expected, rtol=1e-4, atol=1e-5)

    def test_guidance_reaches_the_transformer(self, tiny_flux_dir, pairs):
        low = load_adapter("flux", str(tiny_flux_dir), guidance=1.0)
        high = load_adapter("flux", str(tiny_flux_dir), guidance=3.5)
        encoded = high.encode(*pairs)
        t = torch.tensor([500, 500])
        with torch.no_grad():
            assert not torch.allclose(low.predict(encoded.x0_winner, t, encoded.conditioning),
                                      high.predict(encoded.x0_winner, t, encoded.conditioning))
        assert high.guidance == 3.5 and high.has_guidance_embedding

    def test_model_guidance_comes_from_the_config(self, tiny_flux_dir, tmp_path):
        from sipo.models import adapter_from_config

        config = load_config(None, [f"model.pretrained_path={tiny_flux_dir}", "model.family=flux", "model.guidance=2.5",
                                    f"model.resolution={TINY_SIZE}"])
        assert config.model.guidance == 2.5 and load_config(None).model.guidance == 3.5  # the script's default
        adapter = adapter_from_config(config.model)
        assert adapter.guidance == 2.5 and adapter.resolution == TINY_SIZE

    # ------------------------------------------------------------------ schedule
    def test_training_grid_is_the_unshifted_dynamic_scheduler_grid(self, adapter):
        """FLUX.1-dev's scheduler shifts only at inference (use_dynamic_shifting): its training sigmas are
        t/1000, and index t is its entry 999 - t; the transformer gets sigma (= the pipeline's t / 1000)."""
        scheduler = adapter.scheduler
        assert scheduler.config.use_dynamic_shifting
        t = torch.tensor([0, 25, 500, 999])
        torch.testing.assert_close(adapter.schedule.b[t].float(), scheduler.sigmas[999 - t].float(), rtol=0, atol=1e-6)
        torch.testing.assert_close(adapter.model_timesteps(t), scheduler.timesteps[999 - t] / 1000, rtol=0, atol=1e-6)

    @pytest.mark.parametrize("resolution, steps", [(1024, 50), (512, 28), (TINY_SIZE, 50)])
    def test_previous_step_is_the_next_sigma_of_the_pipelines_grid(self, tiny_flux_dir, resolution, steps):
        """For t whose sigma lies on the grid FluxPipeline samples at this resolution, s is the grid's next
        sigma: the scheduler's own set_timesteps(sigmas=linspace(1, 1/n, n), mu=calculate_shift(L))."""
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        adapter = load_adapter("flux", str(tiny_flux_dir), resolution=resolution, num_inference_steps=steps)
        # packed tokens: (res / 16)^2 for FLUX.1's factor 8 VAE; the tiny VAE's factor is 4, so (res / 8)^2
        seq_len = (resolution // adapter.spatial_multiple) ** 2
        mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
        assert adapter.mu == pytest.approx(mu)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(adapter.scheduler.config)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        grid = scheduler.sigmas.double()  # n sigmas, then the final 0
        checked = 0
        for k in range(1, steps - 1):
            t = round(grid[k].item() * 1000) - 1  # training index nearest grid point k
            a_t, b_t = adapter.schedule.coefficients(torch.tensor([t]))
            _, b_s = adapter.schedule.previous_coefficients(torch.tensor([t]))
            # exactly one inference step below sigma_t in the grid's coordinate: near sigma_{k+1}
            tolerance = abs(b_t.item() - grid[k].item()) * 2 + 1e-6
            assert b_s.item() == pytest.approx(grid[k + 1].item(), abs=tolerance)
            checked += 1
        assert checked == steps - 2
        # off the grid it is the same construction: the scheduler's shift of (tau_t - 1/n)
        t = torch.tensor([700])
        sigma_t = (700 + 1) / 1000
        tau_t = 1 / (1 + math.exp(mu) * (1 / sigma_t - 1))
        scheduler.set_timesteps(sigmas=[tau_t, tau_t - 1 / steps], mu=mu)
        assert scheduler.sigmas[0].item() == pytest.approx(sigma_t, abs=1e-6)
        assert adapter.schedule.previous_coefficients(t)[1].item() == pytest.approx(scheduler.sigmas[1].item(), abs=1e-6)

    def test_the_grid_differs_with_the_resolution(self, tiny_flux_dir):
        """More tokens, more shift: the exponential shift is the constant shift s tau / (1 + (s - 1) tau) with
        s = e^mu, whose slope at sigma = 1/2 is (1 + s)^2 / (4 s) > 1, so one inference step spans more sigma
        and s sits lower. By hand at t = 500 (sigma_t = 0.501), n = 50: tau_t = sigma_t / (s - (s - 1) sigma_t)."""
        t = torch.tensor([500])
        previous = {}
        for resolution in (64, 256):  # tiny VAE factor 4: 64 and 1024 tokens
            adapter = load_adapter("flux", str(tiny_flux_dir), resolution=resolution)
            tokens = (resolution // 8) ** 2
            shift = math.exp(0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256))
            tau = 0.501 / (shift - (shift - 1) * 0.501)
            expected = shift * (tau - 0.02) / (1 + (shift - 1) * (tau - 0.02))
            previous[resolution] = adapter.schedule.previous_coefficients(t)[1].item()
            assert previous[resolution] == pytest.approx(expected, abs=1e-6)
            assert adapter.schedule.b[500].item() == pytest.approx(0.501)  # the training grid does not move
        assert previous[256] < previous[64]

    def test_schnell_has_no_guidance_and_an_unshifted_grid(self, tmp_path):
        directory = FluxAdapter.build_random_pipeline(tmp_path / "schnell", variant="schnell")
        adapter = load_adapter("flux", str(directory), resolution=TINY_SIZE)
        assert not adapter.has_guidance_embedding and adapter.mu is None
        t = torch.tensor([500])
        assert adapter.schedule.previous_coefficients(t)[1].item() == pytest.approx((500 + 1 - 20) / 1000)
        x0 = torch.randn(1, 4, 8, 8)
        assert adapter.predict(x0, t, adapter.encode_prompts(["a cat"])).shape == x0.shape

    def test_picture_sides_must_divide_by_the_packing(self, adapter):
        from sipo.errors import SipoError

        with pytest.raises(SipoError, match="model.resolution"):
            adapter.encode_images(torch.zeros(1, 3, 36, 36))

    # ------------------------------------------------------------------ the third objective
    def test_dpo_cm_trains_two_steps(self, model_dir, manifest, tmp_path):
        from sipo.train import train

        config = load_config(None, tiny_overrides(model_dir, manifest, tmp_path, **FAMILY_OVERRIDES, **{
            "objective.name": "dpo-cm", "objective.tau": 0.05, "train.checkpoint_every": 0}))
        result = train(config, progress=False)
        assert result.steps == 2 and all(math.isfinite(r["loss"]) for r in result.history)


def test_full_config_has_the_published_parameter_count():
    """FLUX.1-dev: "a 12 billion parameter rectified flow transformer" (its model card);
    11,901,408,320 parameters counted from its published transformer config on the meta device."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FULL_TRANSFORMER_CONFIG)
    assert sum(p.numel() for p in model.parameters()) == 11_901_408_320


def test_shifted_training_sigmas_are_the_pipelines_grid_shift(tiny_flux_dir):
    """model.training_sigmas=shifted (one key for every flow family, off by default): sigma_t is FluxPipeline's
    shift of u = (t + 1)/T, the scheduler's own set_timesteps(sigmas=[u, u - 1/n], mu) gives sigma_t and s."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from sipo.errors import SipoError

    adapter = load_adapter("flux", str(tiny_flux_dir), resolution=TINY_SIZE, training_sigmas="shifted")
    mu = calculate_shift((TINY_SIZE // adapter.spatial_multiple) ** 2, 256, 4096, 0.5, 1.15)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(adapter.scheduler.config)
    for t in (100, 400, 700, 950):
        u = (t + 1) / 1000
        scheduler.set_timesteps(sigmas=[u, u - 1 / 50], mu=mu)
        assert adapter.schedule.b[t].item() == pytest.approx(scheduler.sigmas[0].item(), abs=1e-6)
        assert adapter.schedule.previous_coefficients(torch.tensor([t]))[1].item() == pytest.approx(
            scheduler.sigmas[1].item(), abs=1e-6)
    with pytest.raises(SipoError, match="model.training_sigmas=shifted applies to rectified-flow families"):
        load_config(None, ["model.family=sd15", "model.training_sigmas=shifted"])
