"""The digits adapter (the demo's family) on a tiny random-weight model saved to disk.

It passes the shared ``AdapterContract`` of every family (shapes, the eps -> x0_hat round trip,
``lora_disabled``, wrong-family errors), except that LoRA loads through the adapter's own
``load_lora``: no diffusers pipeline class exists for a 10-class pixel-space digits model.
"""

from __future__ import annotations

import json

import pytest
import torch
from family_contract import AdapterContract, inject_lora, noisy_input

from sipo.errors import SipoError
from sipo.models import load_adapter
from sipo.models.digits import (
    LORA_WEIGHT_NAME,
    DigitsAdapter,
    build_digits_scheduler,
    build_digits_unet,
    digit_prompt,
    parse_digit_prompt,
)
from sipo.schedules import add_noise, ddpm_alphas_cumprod, predicted_x0_and_eps, training_target

RESOLUTION = 8


def make_tiny_digits(directory, seed: int = 0):
    """A random-weight ``SipoDigitsPipeline`` directory (the demo's architecture at toy width)."""
    torch.manual_seed(seed)
    unet = build_digits_unet(RESOLUTION, block_out_channels=(8, 16), attention=True)
    return DigitsAdapter(unet, build_digits_scheduler()).save_pretrained(directory)


def make_digit_pairs(batch_size: int = 3, seed: int = 0):
    """``(prompts, winners, losers)``: grey pictures as the data loader returns them (3 equal channels)."""
    generator = torch.Generator().manual_seed(seed)
    grey = torch.rand(2, batch_size, 1, RESOLUTION, RESOLUTION, generator=generator) * 2 - 1
    winners, losers = (g.expand(-1, 3, -1, -1).clone() for g in grey)
    return [digit_prompt(i % 10) for i in range(batch_size)], winners, losers


@pytest.fixture(scope="module")
def tiny_digits_dir(tmp_path_factory):
    return make_tiny_digits(tmp_path_factory.mktemp("tiny_digits"))


class TestDigits(AdapterContract):
    family = "digits"

    @pytest.fixture
    def model_dir(self, tiny_digits_dir):
        return tiny_digits_dir

    @pytest.fixture
    def pairs(self):
        return make_digit_pairs()

    def test_saved_lora_loads_with_the_pipeline(self, adapter, pairs, model_dir, tmp_path):
        """The family's loader: a fresh base + ``load_lora(out)`` reproduces the LoRA model's output."""
        from peft.utils import get_peft_model_state_dict

        encoded = adapter.encode(*pairs)
        x_t, timesteps = noisy_input(adapter, encoded)
        with torch.no_grad():
            base = adapter.predict(x_t, timesteps, encoded.conditioning)
            inject_lora(adapter)  # r=4, alpha=8: the scale 2 must survive the file
            with_lora = adapter.predict(x_t, timesteps, encoded.conditioning)
        adapter.save_lora(tmp_path / "lora", get_peft_model_state_dict(adapter.denoiser))
        assert (tmp_path / "lora" / LORA_WEIGHT_NAME).is_file()

        fresh = load_adapter(self.family, str(model_dir))
        fresh.load_lora(tmp_path / "lora")
        with torch.no_grad():
            loaded = fresh.predict(x_t, timesteps, encoded.conditioning)
        torch.testing.assert_close(loaded, with_lora, rtol=0, atol=1e-5)
        assert (with_lora - base).abs().max() > 1e-2

    def test_exact_target_round_trips_to_x0_and_eps(self, adapter, pairs):
        """The contract's round trip, with the float32 tolerance this schedule needs.

        DDPM's linear betas end at ``a_999 = sqrt(abar_999) = 0.0064`` (SD1.5's end at 0.068), and
        ``x0_hat = (x_t - b eps) / a`` divides float32 rounding of ``x_t`` (~|x_t| * 6e-8) by ``a``:
        atol ``1e-6 / a_t``. In float64 the same round trip is exact to 1e-12.
        """
        x0 = adapter.encode(*pairs).x0_winner
        for t in (0, 1, 250, 500, 999):
            timesteps = torch.full((x0.shape[0],), t)
            a_t, b_t = adapter.schedule.coefficients(timesteps)
            eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
            for dtype, atol in ((torch.float32, 1e-6 / float(a_t[0])), (torch.float64, 1e-12)):
                a, b = adapter.schedule.a[timesteps].to(dtype), adapter.schedule.b[timesteps].to(dtype)
                x_t = add_noise(x0.to(dtype), eps.to(dtype), a, b)
                target = training_target(x0.to(dtype), eps.to(dtype), a, b, "epsilon")
                x0_hat, eps_hat = predicted_x0_and_eps(target, x_t, a, b, "epsilon")
                torch.testing.assert_close(x0_hat, x0.to(dtype), rtol=0, atol=atol)
                torch.testing.assert_close(eps_hat, eps.to(dtype), rtol=0, atol=0)

    def test_encode_is_channel_mean_and_class_labels(self, adapter):
        prompts = ["a handwritten digit 7", "A handwritten digit 0 "]
        generator = torch.Generator().manual_seed(3)
        winners = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=generator) * 2 - 1
        losers = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=generator) * 2 - 1
        encoded = adapter.encode(prompts, winners, losers)
        assert encoded.x0_winner.shape == (2, 1, RESOLUTION, RESOLUTION)
        torch.testing.assert_close(encoded.x0_winner, winners.mean(dim=1, keepdim=True))
        torch.testing.assert_close(encoded.x0_loser, losers.mean(dim=1, keepdim=True))
        assert encoded.conditioning["class_labels"].tolist() == [7, 0]
        assert encoded.conditioning["class_labels"].dtype == torch.long

    @pytest.mark.parametrize("prompt", ["a handwritten digit 12", "a photo of a cat", "digit 3", ""])
    def test_bad_prompt_names_the_expected_form(self, adapter, prompt):
        _, winners, losers = make_digit_pairs(1)
        with pytest.raises(SipoError, match="'a handwritten digit N'"):
            adapter.encode([prompt], winners, losers)

    def test_prompt_round_trip(self):
        assert [parse_digit_prompt(digit_prompt(n)) for n in range(10)] == list(range(10))

    def test_wrong_resolution_names_the_fix(self, adapter):
        images = torch.zeros(1, 3, 16, 16)
        with pytest.raises(SipoError, match=f"model.resolution={RESOLUTION}"):
            adapter.encode([digit_prompt(1)], images, images)

    def test_class_label_changes_the_prediction(self, adapter):
        x_t = torch.randn(2, 1, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0))
        x_t = torch.cat([x_t[:1], x_t[:1]])
        t = torch.tensor([500, 500])
        with torch.no_grad():
            out = adapter.predict(x_t, t, {"class_labels": torch.tensor([1, 8])})
        assert not torch.allclose(out[0], out[1])

    def test_schedule_is_ddpm_linear(self, adapter):
        """T=1000, linear betas 1e-4 -> 0.02 (Ho et al. 2020); diffusers computes them in float32."""
        expected = ddpm_alphas_cumprod(1000, 0.0001, 0.02, "linear")
        torch.testing.assert_close(adapter.scheduler.alphas_cumprod.double(), expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(adapter.schedule.a.pow(2), adapter.scheduler.alphas_cumprod.double())
        assert adapter.schedule.prediction_type == "epsilon"
        assert adapter.frozen_modules() == []

    def test_sample_is_a_function_of_the_noise(self, adapter):
        labels = torch.tensor([0, 3, 9])
        noise = torch.randn(3, 1, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(1))
        first = adapter.sample_labels(labels, noise=noise, num_inference_steps=4)
        again = adapter.sample_labels(labels, noise=noise.clone(), num_inference_steps=4)
        assert first.shape == (3, 1, RESOLUTION, RESOLUTION)
        assert torch.equal(first, again)
        assert first.min() >= -1 and first.max() <= 1
        other = adapter.sample_labels(labels, noise=-noise, num_inference_steps=4)
        assert not torch.equal(first, other)
        # a generator instead of explicit noise draws the same x_T as torch.randn on that seed
        drawn = adapter.sample_labels(labels, generator=torch.Generator().manual_seed(1), num_inference_steps=4)
        assert torch.equal(first, drawn)
        # batching changes only float rounding (convolutions pick kernels by batch size)
        split = adapter.sample_labels(labels, noise=noise, num_inference_steps=4, batch_size=2)
        torch.testing.assert_close(split, first, rtol=0, atol=1e-4)

    def test_sample_takes_prompts_and_a_generator_per_picture_as_every_family(self, adapter):
        """What eval, compare, pairs and validation call: picture i from its prompt and its own
        generator, [B, 3, H, W] in [0, 1]; equal to sample_labels on the x_T each generator draws."""
        prompts = [digit_prompt(2), digit_prompt(7)]
        pictures = adapter.sample(prompts, generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
                                  num_inference_steps=3, guidance_scale=1.0)
        assert pictures.shape == (2, 3, RESOLUTION, RESOLUTION) and 0 <= pictures.min() and pictures.max() <= 1
        noise = torch.cat([torch.randn(1, 1, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
        grey = adapter.sample_labels(torch.tensor([2, 7]), noise=noise, num_inference_steps=3)
        torch.testing.assert_close(pictures, ((grey + 1) / 2).expand(-1, 3, -1, -1), rtol=0, atol=1e-6)
        with pytest.raises(SipoError, match="without classifier-free guidance"):
            adapter.sample(prompts, num_inference_steps=3, guidance_scale=7.5)

    def test_save_pretrained_round_trip(self, adapter, tmp_path):
        adapter.save_pretrained(tmp_path / "copy")
        index = json.loads((tmp_path / "copy" / "model_index.json").read_text())
        assert index["_class_name"] == "SipoDigitsPipeline"
        assert any(p.suffix == ".safetensors" for p in (tmp_path / "copy" / "unet").iterdir())
        again = load_adapter("digits", str(tmp_path / "copy"))
        for (name, p), (_, q) in zip(adapter.denoiser.state_dict().items(), again.denoiser.state_dict().items()):
            assert torch.equal(p, q), name

    def test_load_lora_without_a_file(self, adapter, tmp_path):
        with pytest.raises(SipoError, match=LORA_WEIGHT_NAME):
            adapter.load_lora(tmp_path)

    def test_missing_subfolder_is_named(self, tiny_digits_dir, tmp_path):
        import shutil

        broken = tmp_path / "no_scheduler"
        shutil.copytree(tiny_digits_dir, broken)
        shutil.rmtree(broken / "scheduler")
        with pytest.raises(SipoError, match="no scheduler/ folder"):
            load_adapter("digits", str(broken))
