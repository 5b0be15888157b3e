"""The SD1.5 adapter on tiny random-weight pipelines saved to disk and loaded by the real code.

The checks every family must pass (``AdapterContract``, tests/family_contract.py) run on it; the
tests below check what is SD1.5's own.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from family_contract import TIMESTEPS, AdapterContract, inject_lora
from safetensors import safe_open
from tiny_models import SD15_BETAS, TINY_SD15_LATENT_SHAPE, TINY_TEXT_DIM, TINY_MAX_LENGTH

from sipo.errors import SipoError
from sipo.models import load_adapter
from sipo.schedules import ddpm_alphas_cumprod, training_target


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared, busy CPU the OpenMP workers'
    spin-waiting made these tests ~50x slower (measured: a 2x4x16x16 UNet call 1.3-2.5 s with 2
    threads under load, 0.025 s with 1)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class TestSD15(AdapterContract):
    family = "sd15"

    @pytest.fixture
    def model_dir(self, tiny_sd15_dir):
        return tiny_sd15_dir

    @pytest.fixture
    def pairs(self, image_pairs):
        return image_pairs

    def test_encode_shapes_and_scaling(self, adapter, pairs):
        prompts, winners, losers = pairs
        encoded = adapter.encode(prompts, winners, losers)
        assert encoded.x0_winner.shape == (len(prompts), *TINY_SD15_LATENT_SHAPE)
        assert encoded.x0_winner.dtype == torch.float32
        states = encoded.conditioning["encoder_hidden_states"]
        assert states.shape == (len(prompts), TINY_MAX_LENGTH, TINY_TEXT_DIM)
        # x0 is the posterior mean times scaling_factor (not a sample)
        with torch.no_grad():
            mean = adapter.vae.encode(losers).latent_dist.mean
        torch.testing.assert_close(encoded.x0_loser, mean * adapter.vae.config.scaling_factor)
        # conditioning is exactly what the pipeline feeds its UNet
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=adapter.vae, text_encoder=adapter.text_encoder, tokenizer=adapter.tokenizer,
            unet=adapter.unet, scheduler=adapter.scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
        with torch.no_grad():
            expected, _ = pipe.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)
        torch.testing.assert_close(states, expected)

    def test_different_prompts_give_different_conditioning(self, adapter):
        states = adapter.encode_prompts(["a photo of a cat", "a blue dog"])["encoder_hidden_states"]
        assert not torch.allclose(states[0], states[1])

    def test_encode_rejects_mismatched_batch(self, adapter, pairs):
        prompts, winners, losers = pairs
        with pytest.raises(ValueError, match="one prompt per pair"):
            adapter.encode(prompts[:1], winners, losers)

    def test_schedule_is_the_schedulers(self, adapter):
        alphas_cumprod = adapter.scheduler.alphas_cumprod.double()
        for t in TIMESTEPS:
            assert adapter.schedule.a[t] ** 2 == pytest.approx(alphas_cumprod[t].item(), rel=1e-12)
            assert adapter.schedule.a[t] ** 2 + adapter.schedule.b[t] ** 2 == pytest.approx(1.0, abs=1e-12)
        assert adapter.schedule.prediction_type == "epsilon"

    def test_scheduler_betas_are_sd15s(self, adapter):
        """diffusers computes alphas_cumprod in float32; sipo's reference is float64 (SD1.5 betas:
        runwayml/stable-diffusion-v1-5 scheduler_config.json, scaled_linear 0.00085 -> 0.012)."""
        expected = ddpm_alphas_cumprod(
            SD15_BETAS["num_train_timesteps"],
            SD15_BETAS["beta_start"],
            SD15_BETAS["beta_end"],
            SD15_BETAS["beta_schedule"],
        )
        torch.testing.assert_close(adapter.scheduler.alphas_cumprod.double(), expected, rtol=1e-5, atol=1e-7)

    def test_frozen_modules_are_vae_and_text_encoder(self, adapter):
        assert adapter.frozen_modules() == [adapter.vae, adapter.text_encoder]
        assert adapter.denoiser is adapter.unet
        assert adapter.to("cpu") is adapter and adapter.device == torch.device("cpu")

    def test_missing_subfolder_is_named(self, tiny_sd15_dir, tmp_path):
        broken = tmp_path / "no_vae"
        shutil.copytree(tiny_sd15_dir, broken)
        shutil.rmtree(broken / "vae")
        with pytest.raises(SipoError, match=r"no vae/ folder \(AutoencoderKL\)"):
            load_adapter("sd15", str(broken))

    def test_missing_weights_file_is_a_sipo_error(self, tiny_sd15_dir, tmp_path):
        broken = tmp_path / "no_unet_weights"
        shutil.copytree(tiny_sd15_dir, broken)
        (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        with pytest.raises(SipoError, match="could not load the sd15 model"):
            load_adapter("sd15", str(broken))

    def test_lora_file_carries_its_config(self, adapter, tmp_path):
        from peft.utils import get_peft_model_state_dict

        inject_lora(adapter, r=4, lora_alpha=8)
        state = get_peft_model_state_dict(adapter.denoiser)
        adapter.save_lora(tmp_path, state)
        with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "pt") as file:
            keys = list(file.keys())
            metadata = json.loads(file.metadata()["lora_adapter_metadata"])
        assert len(keys) == len(state)
        assert all(key.startswith("unet.") and (".lora.down." in key or ".lora.up." in key) for key in keys)
        assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 8
        assert sorted(metadata["unet.target_modules"]) == sorted(adapter.lora_target_modules)

    def test_save_lora_rejects_a_full_state_dict(self, adapter, tmp_path):
        with pytest.raises(ValueError, match="get_peft_model_state_dict"):
            adapter.save_lora(tmp_path, dict(adapter.denoiser.state_dict()))

    def test_sample_gives_images_in_unit_range(self, adapter):
        prompts = ["a photo of a cat", "a red dog"]
        images = adapter.sample(prompts, generator=torch.Generator().manual_seed(0), num_inference_steps=2)
        assert images.shape == (2, 3, 32, 32)
        assert images.min() >= 0 and images.max() <= 1
        again = adapter.sample(prompts, generator=torch.Generator().manual_seed(0), num_inference_steps=2)
        assert torch.equal(images, again)


class TestSD15VPrediction(AdapterContract):
    """SD2.x-style ``v_prediction`` through the same adapter: the contract must hold unchanged."""

    family = "sd15"

    @pytest.fixture
    def model_dir(self, tiny_sd15_v_dir):
        return tiny_sd15_v_dir

    @pytest.fixture
    def pairs(self, image_pairs):
        return image_pairs

    def test_prediction_type_comes_from_the_scheduler(self, adapter):
        assert adapter.scheduler.config.prediction_type == "v_prediction"
        assert adapter.schedule.prediction_type == "v_prediction"

    def test_v_target_is_not_eps(self, adapter, pairs):
        x0 = adapter.encode(*pairs).x0_winner
        a_t, b_t = adapter.schedule.coefficients(torch.full((x0.shape[0],), 500))
        eps = torch.randn_like(x0)
        v = training_target(x0, eps, a_t, b_t, "v_prediction")
        torch.testing.assert_close(v, a_t[:, None, None, None] * eps - b_t[:, None, None, None] * x0)
