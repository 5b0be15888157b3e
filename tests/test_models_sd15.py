"""The SD1.5 adapter on tiny random-weight pipelines saved to disk and loaded by the real code.

``AdapterContract`` holds the checks every family must pass (STYLE 9): shapes, the target-space
round trip, LoRA saved by the adapter loading with the diffusers pipeline's ``load_lora_weights``
and ``lora_disabled`` giving the base model back. A family's test class supplies the fixtures
``model_dir`` (a saved tiny pipeline) and ``pairs`` (``(prompts, winners, losers)``).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from tiny_models import SD15_BETAS, TINY_SD15_LATENT_SHAPE, TINY_TEXT_DIM, TINY_MAX_LENGTH

from sipo.errors import SipoError
from sipo.models import adapter_class, load_adapter, lora_disabled
from sipo.models.base import concat_conditioning
from sipo.schedules import add_noise, ddpm_alphas_cumprod, predicted_x0_and_eps, training_target


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared, busy CPU the OpenMP workers'
    spin-waiting made these tests ~50x slower (measured: a 2x4x16x16 UNet call 1.3-2.5 s with 2
    threads under load, 0.025 s with 1)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
        prompts, winners, losers = pairs
        first = adapter.encode(prompts, winners, losers)
        second = adapter.encode(prompts, winners, losers)
        assert torch.equal(first.x0_winner, second.x0_winner)
        assert first.x0_winner.shape == first.x0_loser.shape
        assert not torch.equal(first.x0_winner, first.x0_loser)
        for value in first.conditioning.values():
            assert value.shape[0] == len(prompts)
            assert not value.requires_grad

    def test_predict_shape_matches_input(self, adapter, pairs):
        prompts, winners, losers = pairs
        encoded = adapter.encode(prompts, winners, losers)
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
        prompts, winners, losers = pairs
        x0 = adapter.encode(prompts, winners, losers).x0_winner
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
        from diffusers import DiffusionPipeline
        from peft.utils import get_peft_model_state_dict

        prompts, winners, losers = pairs
        encoded = adapter.encode(prompts, winners, losers)
        x_t, timesteps = noisy_input(adapter, encoded)
        with torch.no_grad():
            base = adapter.predict(x_t, timesteps, encoded.conditioning)
            inject_lora(adapter)
            with_lora = adapter.predict(x_t, timesteps, encoded.conditioning)
        adapter.save_lora(tmp_path / "lora", get_peft_model_state_dict(adapter.denoiser))

        pipe = DiffusionPipeline.from_pretrained(str(model_dir))
        assert type(pipe).__name__ in adapter.pipeline_class_names
        pipe.load_lora_weights(str(tmp_path / "lora"))
        loaded_denoiser = getattr(pipe, "unet", None) or pipe.transformer
        with torch.no_grad():
            loaded = adapter.predict(x_t, timesteps, encoded.conditioning, denoiser=loaded_denoiser)
        torch.testing.assert_close(loaded, with_lora, rtol=0, atol=1e-5)
        assert (with_lora - base).abs().max() > 1e-2

    def test_lora_disabled_is_the_base_model(self, adapter, pairs, model_dir):
        prompts, winners, losers = pairs
        encoded = adapter.encode(prompts, winners, losers)
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
