"""FLUX.2 [klein] base and [dev] on tiny random-weight pipelines saved to disk and loaded by the real code.

The shared contracts (tests/family_contract.py) run on [klein]; [dev] shares every line of the adapter
but the text model and the guidance embedding, which the tests below check against ``Flux2Pipeline``:
one step of each family's own pipeline (its scheduler set to the one sigma) equals ``x_t - sigma
u_hat`` for the policy and the reference, the latents are the pipeline's patchified batch-norm
normalised ones, the conditioning its ``encode_prompt``, ``s`` the next sigma of its grid, and the
full-size builders have the published sizes.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from family_contract import AdapterContract, FamilyContract, inject_lora
from tiny_models import make_image_pairs
from train_fixtures import write_jsonl_pairs

from sipo.models import load_adapter, lora_disabled
from sipo.models.flux2 import FULL_TRANSFORMER_CONFIGS, PUBLISHED_PARAMETERS, Flux2Adapter

TINY_SIZE = 32  # pixels; VAE factor 4 -> latents [4, 8, 8] -> patchified [16, 4, 4] -> 16 tokens
FAMILY_OVERRIDES = {"model.family": "flux2", "model.resolution": TINY_SIZE}


@pytest.fixture(scope="module")
def tiny_klein_dir(tmp_path_factory) -> Path:
    return Flux2Adapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_klein"), variant="klein-4b")


@pytest.fixture(scope="module")
def tiny_dev_dir(tmp_path_factory) -> Path:
    return Flux2Adapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_flux2_dev"), variant="dev")


def one_step_velocity(adapter, x_t: torch.Tensor, t: int, conditioning, guidance_scale: float) -> tuple[torch.Tensor, float]:
    """``(x_t - x_next) / sigma`` of one step of the family's own pipeline from ``x_t`` at the sigma of
    training index ``t``: its scheduler is given the one grid point ``tau`` whose exponential shift by the
    pipeline's own ``mu`` (for one step) is that sigma, and the final sigma 0 follows it."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    sigma = adapter.schedule.b[t].item()
    mu = compute_empirical_mu(adapter.image_seq_len(TINY_SIZE, TINY_SIZE), 1)
    tau = 1.0 / (1.0 + math.exp(mu) * (1.0 / sigma - 1.0))
    captured = {}

    def grab(pipe, step, timestep, tensors):
        captured["latents"] = tensors["latents"]
        return tensors

    pipe = adapter.pipeline()
    pipe(prompt_embeds=conditioning["encoder_hidden_states"], latents=x_t, height=TINY_SIZE, width=TINY_SIZE,
         num_inference_steps=1, sigmas=[tau], guidance_scale=guidance_scale, output_type="latent",
         max_sequence_length=adapter.max_sequence_length, callback_on_step_end=grab)
    used = pipe.scheduler.sigmas.tolist()
    assert used[0] == pytest.approx(sigma, abs=1e-6) and used[1] == 0.0
    packed = captured["latents"]  # [B, tokens, C]
    after = packed.permute(0, 2, 1).reshape(x_t.shape)
    return (x_t - after) / used[0], sigma


def check_predict_equals_pipeline(adapter, guidance_scale: float) -> dict[str, float]:
    """Max relative error of ``predict`` against the pipeline's step, for the policy (LoRA on) and the reference."""
    encoded = adapter.encode(*make_image_pairs(size=TINY_SIZE))
    inject_lora(adapter)
    errors = {}
    for role in ("policy", "reference"):
        for t in (999, 500, 60):
            x_t = 0.5 * encoded.x0_winner + torch.randn(encoded.x0_winner.shape, generator=torch.Generator().manual_seed(t))
            with torch.no_grad(), (lora_disabled(adapter.denoiser) if role == "reference" else contextlib.nullcontext()):
                expected, _ = one_step_velocity(adapter, x_t, t, encoded.conditioning, guidance_scale)
                ours = adapter.predict(x_t, torch.full((x_t.shape[0],), t), encoded.conditioning)
            error = ((ours - expected).abs().max() / expected.abs().max()).item()
            errors[role] = max(errors.get(role, 0.0), error)
    return errors


class TestFlux2Klein(AdapterContract, FamilyContract):
    family = "flux2"

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tiny_klein_dir):
        return tiny_klein_dir

    @pytest.fixture
    def pairs(self):
        return make_image_pairs(size=TINY_SIZE)

    @pytest.fixture(scope="class")
    @classmethod
    def manifest(cls, tmp_path_factory):
        return write_jsonl_pairs(tmp_path_factory.mktemp("flux2_pairs"), num_pairs=4, size=TINY_SIZE)

    @pytest.fixture(scope="class")
    @classmethod
    def family_overrides(cls):
        return dict(FAMILY_OVERRIDES)

    def scheduler_forward(self, adapter, x0, eps, timesteps):
        """FlowMatchEulerDiscreteScheduler.scale_noise at its own timestep of index t (entry 999 - t)."""
        scheduler = adapter.scheduler
        return scheduler.scale_noise(x0, scheduler.timesteps[999 - timesteps], eps)

    def sample_kwargs(self):
        return {"num_inference_steps": 2, "height": TINY_SIZE, "width": TINY_SIZE, "max_sequence_length": 64,
                "guidance_scale": 1.0}

    @pytest.mark.parametrize("t", (200, 500, 980))
    def test_log_w_is_the_gaussian_log_density_ratio(self, model_dir, pairs, t):
        """The contract's check at low, middle and high noise. FLUX.2's grid at the tiny model's default
        512 px (4096 tokens, mu = compute_empirical_mu(4096, 50) = 2.02) ends at sigma 0.133, below which
        no inference step lies (the contract's t = 60 has none); so low noise is t = 200 here."""
        super().test_log_w_is_the_gaussian_log_density_ratio(model_dir, pairs, t)

    # ------------------------------------------------------------------ FLUX.2's own inputs
    def test_predict_equals_the_pipelines_step_for_policy_and_reference(self, adapter):
        """Flux2KleinPipeline (no CFG: guidance_scale 1) one step from x_t: packing, ids, timestep/1000."""
        assert not adapter.has_guidance_embedding and adapter.pipeline_class_name == "Flux2KleinPipeline"
        errors = check_predict_equals_pipeline(adapter, guidance_scale=1.0)
        print(f"flux2 [klein] predict vs Flux2KleinPipeline, max relative error: {errors}")  # docs/models.md (pytest -s)
        assert errors["policy"] <= 1e-5 and errors["reference"] <= 1e-5, errors

    def test_latents_are_the_pipelines_patchified_normalised_ones(self, adapter, pairs):
        """Flux2KleinPipeline._encode_vae_image (argmax latents, patchify, batch-norm statistics) is x0."""
        _, winners, _ = pairs
        with torch.no_grad():
            expected = adapter.pipeline()._encode_vae_image(winners, generator=None)
        x0 = adapter.encode_images(winners)
        assert x0.shape == (2, 16, 4, 4)
        torch.testing.assert_close(x0, expected, rtol=1e-5, atol=1e-5)
        assert adapter.vae.bn.running_mean.abs().max() > 0  # the builder's statistics are not the identity

    def test_conditioning_is_the_pipelines_encode_prompt(self, adapter, pairs):
        prompts = pairs[0]
        cond = adapter.encode_prompts(prompts)
        with torch.no_grad():
            states, _ = adapter.pipeline().encode_prompt(prompts, max_sequence_length=64)
        assert cond["encoder_hidden_states"].shape == (2, 64, 48)  # 3 layers (9, 18, 27) x 16
        torch.testing.assert_close(cond["encoder_hidden_states"], states)

    # ------------------------------------------------------------------ schedule
    @pytest.mark.parametrize("resolution, steps", [(1024, 50), (512, 28)])
    def test_previous_step_is_the_next_sigma_of_the_pipelines_grid(self, tiny_klein_dir, resolution, steps):
        """At grid points, s is the next sigma of set_timesteps(sigmas=linspace(1, 1/n, n), mu=compute_empirical_mu(L, n))."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        adapter = load_adapter("flux2", str(tiny_klein_dir), resolution=resolution, num_inference_steps=steps)
        mu = compute_empirical_mu((resolution // adapter.spatial_multiple) ** 2, steps)
        assert adapter.mu == pytest.approx(mu)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(adapter.scheduler.config)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        grid = scheduler.sigmas.double()
        for k in range(1, steps - 1):
            t = round(grid[k].item() * 1000) - 1  # the training index nearest grid point k
            b_t = adapter.schedule.b[t].item()
            b_s = adapter.schedule.previous_coefficients(torch.tensor([t]))[1].item()
            assert b_s == pytest.approx(grid[k + 1].item(), abs=abs(b_t - grid[k].item()) * 2 + 1e-6)
        assert adapter.schedule.b[499].item() == pytest.approx(0.5)  # training sigmas are unshifted


def test_dev_predict_equals_flux2pipeline_with_guidance(tiny_dev_dir):
    """[dev]: Mistral3 prompts through Flux2Pipeline.encode_prompt, the guidance embedding given model.guidance."""
    adapter = load_adapter("flux2", str(tiny_dev_dir), resolution=TINY_SIZE, guidance=2.5)
    assert adapter.pipeline_class_name == "Flux2Pipeline" and adapter.has_guidance_embedding
    prompts = ["a photo of a cat", "a red dog"]
    with torch.no_grad():
        states, _ = adapter.pipeline().encode_prompt(prompts, max_sequence_length=64)
    cond = adapter.encode_prompts(prompts)
    assert cond["encoder_hidden_states"].shape == (2, 64, 48)  # 3 layers (10, 20, 30) x 16
    torch.testing.assert_close(cond["encoder_hidden_states"], states)
    errors = check_predict_equals_pipeline(adapter, guidance_scale=2.5)
    print(f"flux2 [dev] predict vs Flux2Pipeline, max relative error: {errors}")  # docs/models.md (pytest -s)
    assert errors["policy"] <= 1e-5 and errors["reference"] <= 1e-5, errors
    # guidance reaches the transformer: another value, another prediction
    x_t, t, cat = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500]), cond
    with torch.no_grad():
        high = adapter.predict(x_t, t, {"encoder_hidden_states": cat["encoder_hidden_states"][:1]})
        adapter.guidance = 1.0
        low = adapter.predict(x_t, t, {"encoder_hidden_states": cat["encoder_hidden_states"][:1]})
    assert not torch.allclose(low, high)


def test_dev_lora_loads_into_flux2pipeline(tiny_dev_dir, tmp_path):
    from diffusers import Flux2Pipeline
    from peft.utils import get_peft_model_state_dict

    adapter = load_adapter("flux2", str(tiny_dev_dir), resolution=TINY_SIZE)
    inject_lora(adapter)
    x_t = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    t, cond = torch.tensor([100, 800]), adapter.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        with_lora = adapter.predict(x_t, t, cond)
    adapter.save_lora(tmp_path, get_peft_model_state_dict(adapter.denoiser))
    pipe = Flux2Pipeline.from_pretrained(str(tiny_dev_dir))
    pipe.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        loaded = adapter.predict(x_t, t, cond, denoiser=pipe.transformer)
    torch.testing.assert_close(loaded, with_lora, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(FULL_TRANSFORMER_CONFIGS))
def test_full_configs_have_the_published_sizes(variant):
    """klein 4B: 3,875,544,576; klein 9B: 9,078,581,248; dev: 32,223,281,152 counted on the meta device,
    against the published "4B", "9B" and "32B" (within 5%: the names are rounded)."""
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**FULL_TRANSFORMER_CONFIGS[variant])
    count = sum(p.numel() for p in model.parameters())
    assert count == {"klein-4b": 3_875_544_576, "klein-9b": 9_078_581_248, "dev": 32_223_281_152}[variant]
    assert abs(count / PUBLISHED_PARAMETERS[variant] - 1) < 0.05
