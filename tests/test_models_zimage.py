"""Z-Image on a tiny random-weight ZImagePipeline saved to disk and loaded by the real code.

The shared contracts (tests/family_contract.py) run on it; the tests below check what is Z-Image's own
against ZImagePipeline: one step of the pipeline (its scheduler set to the one sigma) equals
``x_t - sigma u_hat`` for the policy and the reference (so the ``1 - sigma`` timestep and the negated
output are the pipeline's), the conditioning is its ``_encode_prompt`` with the padding dropped, ``s``
is the next sigma of its shifted grid, and the full-size builder has the published size.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from family_contract import AdapterContract, FamilyContract, inject_lora
from tiny_models import make_image_pairs
from train_fixtures import write_jsonl_pairs

from sipo.models import load_adapter, lora_disabled
from sipo.models.zimage import FULL_TRANSFORMER_CONFIG, PUBLISHED_PARAMETERS, ZImageAdapter

TINY_SIZE = 32  # pixels; VAE factor 4 -> latents [16, 8, 8] -> 16 patches of 2x2
FAMILY_OVERRIDES = {"model.family": "zimage", "model.resolution": TINY_SIZE}


@pytest.fixture(scope="module")
def tiny_zimage_dir(tmp_path_factory) -> Path:
    return ZImageAdapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_zimage"))


def one_step_velocity(adapter, x_t: torch.Tensor, t: int, conditioning) -> torch.Tensor:
    """``(x_t - x_next) / sigma`` of one ZImagePipeline step from ``x_t`` at the sigma of index ``t``: its
    scheduler is given the grid point ``u`` its constant shift maps to that sigma (then sigma 0)."""
    sigma = adapter.schedule.b[t].item()
    shift = float(adapter.scheduler.config.shift)
    u = sigma / (shift - (shift - 1) * sigma)
    captured = {}

    def grab(pipe, step, timestep, tensors):
        captured["latents"] = tensors["latents"]
        return tensors

    masks = conditioning["encoder_hidden_states_mask"].bool()
    captions = [row[keep] for row, keep in zip(conditioning["encoder_hidden_states"], masks)]
    pipe = adapter.pipeline()
    pipe(prompt_embeds=captions, latents=x_t, height=TINY_SIZE, width=TINY_SIZE, num_inference_steps=1, sigmas=[u],
         guidance_scale=0.0, output_type="latent", callback_on_step_end=grab)
    used = pipe.scheduler.sigmas.tolist()
    assert used[0] == pytest.approx(sigma, abs=1e-6) and used[1] == 0.0
    return (x_t - captured["latents"]) / used[0]


class TestZImage(AdapterContract, FamilyContract):
    family = "zimage"

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tiny_zimage_dir):
        return tiny_zimage_dir

    @pytest.fixture
    def pairs(self):
        return make_image_pairs(size=TINY_SIZE)

    @pytest.fixture(scope="class")
    @classmethod
    def manifest(cls, tmp_path_factory):
        return write_jsonl_pairs(tmp_path_factory.mktemp("zimage_pairs"), num_pairs=4, size=TINY_SIZE)

    @pytest.fixture(scope="class")
    @classmethod
    def family_overrides(cls):
        return dict(FAMILY_OVERRIDES)

    def scheduler_forward(self, adapter, x0, eps, timesteps):
        """FlowMatchEulerDiscreteScheduler.scale_noise at its own (shifted) timestep of index t (entry 999 - t)."""
        scheduler = adapter.scheduler
        return scheduler.scale_noise(x0, scheduler.timesteps[999 - timesteps], eps)

    def sample_kwargs(self):
        return {"num_inference_steps": 2, "height": TINY_SIZE, "width": TINY_SIZE, "guidance_scale": 0.0}

    # ------------------------------------------------------------------ Z-Image's own inputs
    def test_predict_equals_the_pipelines_step_for_policy_and_reference(self, adapter, pairs):
        """ZImagePipeline's step: lists in, (1000 - t) / 1000 as the timestep, the output negated."""
        encoded = adapter.encode(*pairs)
        inject_lora(adapter)
        errors = {}
        for role in ("policy", "reference"):
            for t in (999, 500, 60):
                noise = torch.randn(encoded.x0_winner.shape, generator=torch.Generator().manual_seed(t))
                x_t = 0.5 * encoded.x0_winner + noise
                switch = lora_disabled(adapter.denoiser) if role == "reference" else contextlib.nullcontext()
                with torch.no_grad(), switch:
                    expected = one_step_velocity(adapter, x_t, t, encoded.conditioning)
                    ours = adapter.predict(x_t, torch.full((x_t.shape[0],), t), encoded.conditioning)
                errors[role] = max(errors.get(role, 0.0), ((ours - expected).abs().max() / expected.abs().max()).item())
        print(f"zimage predict vs ZImagePipeline, max relative error: {errors}")  # docs/models.md (pytest -s)
        assert errors["policy"] <= 1e-5 and errors["reference"] <= 1e-5, errors
        # the sign matters: the raw transformer output, given 1 - sigma, is the negated velocity
        x_t, t = encoded.x0_winner, torch.tensor([500, 500])
        masks = encoded.conditioning["encoder_hidden_states_mask"].bool()
        captions = [row[keep] for row, keep in zip(encoded.conditioning["encoder_hidden_states"], masks)]
        with torch.no_grad():
            raw = adapter.denoiser(list(x_t.unsqueeze(2).unbind(0)), adapter.model_timesteps(t), captions, return_dict=False)[0]
            torch.testing.assert_close(adapter.predict(x_t, t, encoded.conditioning), -torch.stack(raw).squeeze(2))
        torch.testing.assert_close(adapter.model_timesteps(t), 1 - adapter.sigmas(t), rtol=0, atol=1e-6)

    def test_conditioning_is_the_pipelines_captions_padded(self, adapter, pairs):
        prompts = pairs[0]
        cond = adapter.encode_prompts(prompts)
        with torch.no_grad():
            captions = adapter.pipeline()._encode_prompt(list(prompts), max_sequence_length=64)
        assert cond["encoder_hidden_states"].shape == (2, 64, 16)
        for row, caption in enumerate(captions):
            length = caption.shape[0]
            assert cond["encoder_hidden_states_mask"][row].tolist() == [1] * length + [0] * (64 - length)
            torch.testing.assert_close(cond["encoder_hidden_states"][row, :length], caption)
            assert not cond["encoder_hidden_states"][row, length:].any()
        assert captions[0].shape[0] != captions[1].shape[0]  # the two prompts differ in length: padding is exercised

    def test_latents_are_shifted_and_scaled_vae_means(self, adapter, pairs):
        _, winners, _ = pairs
        with torch.no_grad():
            mean = adapter.vae.encode(winners).latent_dist.mean
        # ZImagePipeline decodes latents / scaling_factor + shift_factor
        torch.testing.assert_close(adapter.encode_images(winners) / 0.3611 + 0.1159, mean, rtol=1e-5, atol=1e-5)

    # ------------------------------------------------------------------ schedule
    @pytest.mark.parametrize("steps", [50, 28])
    def test_previous_step_is_the_next_sigma_of_the_pipelines_grid(self, tiny_zimage_dir, steps):
        """Training sigmas are the scheduler's shifted ones; s is the next sigma of the pipeline's
        set_timesteps(sigmas=linspace(1, 1/n, n)) (constant shift 3, its mu ignored) at every grid point."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        adapter = load_adapter("zimage", str(tiny_zimage_dir), num_inference_steps=steps)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(adapter.scheduler.config)
        t = torch.arange(1000)
        torch.testing.assert_close(adapter.schedule.b[t].float(), scheduler.sigmas[999 - t].float(), rtol=0, atol=1e-6)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=0.9)
        grid = scheduler.sigmas.double()
        for k in range(steps - 1):
            u = 1 - k / steps
            index = round(u * 1000) - 1
            if abs((index + 1) / 1000 - u) > 1e-9:
                continue  # n = 28: only the grid points on the 1/1000 lattice
            assert adapter.schedule.b[index].item() == pytest.approx(grid[k].item(), abs=1e-6)
            assert adapter.schedule.previous_coefficients(torch.tensor([index]))[1].item() == pytest.approx(
                grid[k + 1].item(), abs=1e-6)


def test_full_config_has_the_published_size():
    """6,154,908,736 parameters on the meta device; the Z-Image paper: "6B"."""
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**FULL_TRANSFORMER_CONFIG)
    count = sum(p.numel() for p in model.parameters())
    assert count == 6_154_908_736 and abs(count / PUBLISHED_PARAMETERS - 1) < 0.05
