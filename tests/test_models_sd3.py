"""SD3.5 on a tiny random-weight StableDiffusion3Pipeline saved to disk and loaded by the real code.

The shared contracts (tests/family_contract.py) run on it; the tests below check what is SD3's own
against diffusers' StableDiffusion3Pipeline and FlowMatchEulerDiscreteScheduler: the shifted/scaled
latents, the three text encoders' conditioning, the shifted training grid and the timestep the
transformer gets, one Euler step of the pipeline, and the full-size parameter counts.
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
from sipo.models.sd3 import FULL_LARGE_TRANSFORMER_CONFIG, FULL_MEDIUM_TRANSFORMER_CONFIG, SD3Adapter

TINY_SIZE = 32  # pixels; the tiny VAE downsamples 4x -> latents [4, 8, 8] -> 16 patches of 2x2
FAMILY_OVERRIDES = {"model.family": "sd3", "model.resolution": TINY_SIZE}


@pytest.fixture(scope="module")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    return SD3Adapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_sd3"), scale="tiny", seed=0)


class TestSD3(AdapterContract, FamilyContract):
    family = "sd3"

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tiny_sd3_dir):
        return tiny_sd3_dir

    @pytest.fixture
    def pairs(self):
        return make_image_pairs(size=TINY_SIZE)

    @pytest.fixture(scope="class")
    @classmethod
    def manifest(cls, tmp_path_factory):
        return write_jsonl_pairs(tmp_path_factory.mktemp("sd3_pairs"), num_pairs=4, size=TINY_SIZE)

    @pytest.fixture(scope="class")
    @classmethod
    def family_overrides(cls):
        return dict(FAMILY_OVERRIDES)

    def scheduler_forward(self, adapter, x0, eps, timesteps):
        """FlowMatchEulerDiscreteScheduler.scale_noise at its own timestep of index t (entry T - 1 - t)."""
        scheduler = adapter.scheduler
        return scheduler.scale_noise(x0, scheduler.timesteps[999 - timesteps], eps)

    def sample_kwargs(self):
        return {"num_inference_steps": 2, "max_sequence_length": 16}

    # ------------------------------------------------------------------ SD3's own inputs
    def test_latents_are_shifted_and_scaled_vae_means(self, adapter, pairs):
        prompts, winners, losers = pairs
        encoded = adapter.encode(prompts, winners, losers)
        with torch.no_grad():
            mean = adapter.vae.encode(losers).latent_dist.mean
        assert (adapter.vae.config.shift_factor, adapter.vae.config.scaling_factor) == (0.0609, 1.5305)  # SD3's VAE
        # StableDiffusion3Pipeline decodes latents / scaling_factor + shift_factor: x0 must be the inverse
        torch.testing.assert_close(encoded.x0_loser / 1.5305 + 0.0609, mean, rtol=1e-5, atol=1e-5)
        assert encoded.x0_winner.shape == (2, 4, 8, 8)

    def test_conditioning_is_clip_l_g_and_t5_as_the_pipeline_builds_it(self, adapter, pairs):
        """By hand: penultimate states of both CLIPs side by side (16 + 16 = T5's 32 features, so no
        padding here), then T5's 16 states; pooled = both CLIPs' projections side by side."""
        prompts, winners, losers = pairs
        cond = adapter.encode(prompts, winners, losers).conditioning
        parts = adapter.parts
        states, pooled = [], []
        with torch.no_grad():
            for tokenizer, encoder in ((parts["tokenizer"], parts["text_encoder"]), (parts["tokenizer_2"], parts["text_encoder_2"])):
                ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
                output = encoder(ids, output_hidden_states=True)
                states.append(output.hidden_states[-2])
                pooled.append(output.text_embeds)
            ids = parts["tokenizer_3"](prompts, padding="max_length", max_length=16, truncation=True,
                                       add_special_tokens=True, return_tensors="pt").input_ids
            t5 = parts["text_encoder_3"](ids)[0]
        expected = torch.cat([torch.cat(states, dim=-1), t5], dim=1)
        assert cond["encoder_hidden_states"].shape == (2, 77 + 16, 32)
        torch.testing.assert_close(cond["encoder_hidden_states"], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cond["pooled_projections"], torch.cat(pooled, dim=-1), rtol=1e-5, atol=1e-6)

    def test_prediction_is_the_pipelines_euler_step(self, adapter, tiny_sd3_dir):
        """One StableDiffusion3Pipeline step without guidance from x_1 = eps (sigmas [1, 0]) is
        eps - u_hat(eps, sigma = 1): the transformer gets sigma * 1000 as the pipeline passes it."""
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir))
        pipe.set_progress_bar_config(disable=True)
        eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        cond = adapter.encode_prompts(["a red cat"])
        with torch.no_grad():
            latents = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
                           latents=eps, num_inference_steps=1, guidance_scale=1.0, output_type="latent").images
            expected = eps - adapter.predict(eps, torch.tensor([999]), cond)  # index 999: sigma = 1
        assert pipe.scheduler.sigmas.tolist() == pytest.approx([1.0, 0.0])
        torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-5)

    def test_training_grid_is_the_shifted_scheduler_grid(self, adapter):
        """shift 3.0 (SD3.5's scheduler config): index t is the scheduler's entry 999 - t, sigma =
        3 s / (1 + 2 s), s = (t + 1) / 1000, and the transformer gets the scheduler's timestep sigma * 1000."""
        scheduler = adapter.scheduler
        assert adapter.flow_shift == 3.0
        t = torch.tensor([0, 25, 500, 999])
        s = (t + 1).double() / 1000
        torch.testing.assert_close(adapter.schedule.b[t], 3 * s / (1 + 2 * s), rtol=0, atol=1e-12)
        torch.testing.assert_close(adapter.schedule.b[t].float(), scheduler.sigmas[999 - t].float(), rtol=0, atol=1e-6)
        torch.testing.assert_close(adapter.model_timesteps(t), scheduler.timesteps[999 - t].float(), rtol=1e-5, atol=1e-3)

    @pytest.mark.parametrize("steps", [28, 50])
    def test_previous_step_is_the_next_sigma_of_the_pipelines_grid(self, model_dir, steps):
        """For t whose sigma lies (nearest index) on the grid StableDiffusion3Pipeline samples on --
        the scheduler's own set_timesteps(n) -- s is that grid's next sigma."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from sipo.models import load_adapter

        adapter = load_adapter("sd3", str(model_dir), num_inference_steps=steps)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(adapter.scheduler.config)
        scheduler.set_timesteps(steps)
        grid = scheduler.sigmas.double()
        sigma = adapter.schedule.b
        for k in range(1, steps - 1):
            t = int((sigma - grid[k]).abs().argmin())
            _, b_s = adapter.schedule.previous_coefficients(torch.tensor([t]))
            # off by at most the distance of sigma_t from the grid point, carried through the grid's slope
            tolerance = 3 * abs(sigma[t].item() - grid[k].item()) + 1e-6
            assert b_s.item() == pytest.approx(grid[k + 1].item(), abs=tolerance)
        # not the training grid's every T/n-th index: at n = 28 those differ by more than the tolerance above
        if steps == 28:
            t = int((sigma - grid[10]).abs().argmin())
            assert abs(adapter.schedule.b[t - 1000 // 28].item() - grid[11].item()) > 1e-3

    def test_a_dynamic_shift_scheduler_is_refused(self, model_dir, tmp_path):
        import json
        import shutil

        from sipo.errors import SipoError
        from sipo.models import load_adapter

        copy = tmp_path / "dynamic"
        shutil.copytree(model_dir, copy)
        config_file = copy / "scheduler" / "scheduler_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "use_dynamic_shifting": True}))
        with pytest.raises(SipoError, match="shift 3.0"):
            load_adapter("sd3", str(copy))

    # ------------------------------------------------------------------ the third objective
    def test_dpo_cm_trains_two_steps(self, model_dir, manifest, tmp_path):
        from sipo.train import train

        config = load_config(None, tiny_overrides(model_dir, manifest, tmp_path, **FAMILY_OVERRIDES, **{
            "objective.name": "dpo-cm", "objective.tau": 0.05, "train.checkpoint_every": 0}))
        result = train(config, progress=False)
        assert result.steps == 2 and all(math.isfinite(r["loss"]) for r in result.history)


@pytest.mark.parametrize("config, expected, published", [
    # SD3.5 Medium's card says "2.5 billion parameters" (MMDiT-X); its published transformer config counts
    # 2,243,171,520 in diffusers. SD3.5 Large's card: "8.1 billion parameters"; its config counts 8,056,627,520.
    (FULL_MEDIUM_TRANSFORMER_CONFIG, 2_243_171_520, 2.5e9),
    (FULL_LARGE_TRANSFORMER_CONFIG, 8_056_627_520, 8.1e9),
])
def test_full_configs_have_the_published_parameter_counts(config, expected, published):
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    count = sum(p.numel() for p in model.parameters())
    assert count == expected
    assert abs(count - published) / published < 0.11  # the cards round (medium: 10% above the config's count)
