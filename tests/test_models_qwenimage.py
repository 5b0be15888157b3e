"""Qwen-Image on a tiny random-weight QwenImagePipeline saved to disk and loaded by the real code.

The shared contracts (tests/family_contract.py) run on it; the tests below check what is Qwen-Image's
own: latents normalised per channel, the Qwen2.5-VL states and their mask as the pipeline computes
them, the mask making the prediction independent of the padding, the dynamically shifted sigma grid
against diffusers' scheduler at two resolutions, the timestep the transformer sees, the full-size
parameter count, and a dpo-cm run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from family_contract import AdapterContract, FamilyContract
from tiny_models import make_image_pairs
from train_fixtures import write_jsonl_pairs

from sipo.config import load_config
from sipo.models import load_adapter
from sipo.models.qwenimage import FULL_TRANSFORMER_CONFIG, SCHEDULER_CONFIG, QwenImageAdapter

TINY_SIZE = 32  # pixels; the tiny VAE downsamples 8x -> latents [16, 4, 4] -> 4 packed tokens
FAMILY_OVERRIDES = {"model.family": "qwenimage", "model.resolution": TINY_SIZE}


@pytest.fixture(scope="module")
def tiny_qwenimage_dir(tmp_path_factory):
    return QwenImageAdapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_qwenimage"))


def reference_mu(image_seq_len: int) -> float:
    """Qwen-Image's scheduler config (base 256 tokens -> 0.5, 8192 -> 0.9), the line through both, by hand."""
    return 0.5 + (image_seq_len - 256) * (0.9 - 0.5) / (8192 - 256)


class TestQwenImage(AdapterContract, FamilyContract):
    family = "qwenimage"

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tiny_qwenimage_dir):
        return tiny_qwenimage_dir

    @pytest.fixture
    def adapter(self, model_dir):
        return load_adapter(self.family, str(model_dir), resolution=TINY_SIZE)

    @pytest.fixture
    def pairs(self):
        return make_image_pairs(size=TINY_SIZE)

    @pytest.fixture(scope="class")
    @classmethod
    def manifest(cls, tmp_path_factory):
        return write_jsonl_pairs(tmp_path_factory.mktemp("qwenimage_pairs"), num_pairs=4, size=TINY_SIZE)

    @pytest.fixture(scope="class")
    @classmethod
    def family_overrides(cls):
        return dict(FAMILY_OVERRIDES)

    def sample_kwargs(self) -> dict:
        return {"num_inference_steps": 2, "height": TINY_SIZE, "width": TINY_SIZE}

    @pytest.mark.parametrize("t", [0, 250, 500, 999])
    def test_scheduler_forward_process_is_the_schedule(self, model_dir, pairs, t):
        """Replaced: Qwen-Image's scheduler noises on its inference grid only. With model.training_sigmas=shifted,
        at the grid points t = 999 - 20k (k = 0, 25, 49 of 50 steps) its ``scale_noise`` equals ``a_t x0 + b_t eps``."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from sipo.schedules import add_noise

        k = {0: 49, 250: 37, 500: 25, 999: 0}[t]  # the grid step nearest each contract timestep
        adapter = load_adapter(self.family, str(model_dir), resolution=TINY_SIZE, training_sigmas="shifted")
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(model_dir), subfolder="scheduler")
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 50, 50), mu=reference_mu(4))
        x0 = adapter.encode(*pairs).x0_winner
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
        index = torch.full((x0.shape[0],), 999 - 20 * k)
        a_t, b_t = adapter.schedule.coefficients(index)
        expected = scheduler.scale_noise(x0, scheduler.timesteps[k].repeat(x0.shape[0]), eps)
        torch.testing.assert_close(add_noise(x0, eps, a_t, b_t), expected.float(), rtol=0, atol=1e-5)

    # ------------------------------------------------------------------ Qwen-Image's own
    def test_latents_are_normalised_vae_means(self, adapter, pairs):
        _, winners, _ = pairs
        x0 = adapter.encode_images(winners)
        assert x0.shape == (2, 16, 4, 4)
        with torch.no_grad():
            mean = adapter.vae.encode(winners[:, :, None]).latent_dist.mean[:, :, 0]
        config = adapter.vae.config
        mu = torch.tensor(config.latents_mean).view(1, -1, 1, 1)
        sd = torch.tensor(config.latents_std).view(1, -1, 1, 1)
        # QwenImagePipeline decodes latents * std + mean: x0 must be the inverse
        torch.testing.assert_close(x0 * sd + mu, mean, rtol=1e-5, atol=1e-5)

    def test_conditioning_is_the_pipelines_states_and_mask_padded(self, adapter):
        prompts = ["a cat", "a photo of a red dog on the blue painting"]
        cond = adapter.encode_prompts(prompts)
        assert cond["encoder_hidden_states"].shape == (2, 256, 32)
        with torch.no_grad():
            states, mask = adapter.pipeline().encode_prompt(prompts, device="cpu")
        valid = mask.sum(dim=1)
        # "a cat" = a, Ġ, c, a, t + <|im_end|> \n <|im_start|> assistant \n after the 34 dropped template tokens
        assert valid[0] == 5 + 5
        torch.testing.assert_close(cond["encoder_hidden_states_mask"][:, : states.shape[1]], mask.long())
        assert cond["encoder_hidden_states_mask"][:, states.shape[1]:].sum() == 0
        for i, length in enumerate(valid.tolist()):
            torch.testing.assert_close(cond["encoder_hidden_states"][i, :length], states[i, :length].float())
            assert cond["encoder_hidden_states"][i, length:].abs().max() == 0

    def test_the_mask_makes_the_prediction_independent_of_the_padding(self, adapter, pairs):
        """Trimmed to the longest prompt's tokens (mask all ones there) vs padded to 256: same prediction."""
        x0 = adapter.encode_images(pairs[1])
        cond = adapter.encode_prompts(["a cat", "a dog"])
        longest = int(cond["encoder_hidden_states_mask"].sum(dim=1).max())
        trimmed = {k: v[:, :longest] for k, v in cond.items()}
        x_t = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([300, 800])
        with torch.no_grad():
            padded_out, trimmed_out = adapter.predict(x_t, t, cond), adapter.predict(x_t, t, trimmed)
        torch.testing.assert_close(padded_out, trimmed_out, rtol=1e-4, atol=1e-5)
        without_mask = dict(cond, encoder_hidden_states_mask=torch.ones_like(cond["encoder_hidden_states_mask"]))
        with torch.no_grad():
            assert not torch.allclose(adapter.predict(x_t, t, without_mask), padded_out, atol=1e-5)  # the mask acts

    @pytest.mark.parametrize("resolution", [32, 1328])
    def test_shifted_sigma_grid_is_the_schedulers_at_the_runs_resolution(self, model_dir, resolution):
        """model.training_sigmas=shifted: every 20th training sigma from t = 999 down == FlowMatchEulerDiscreteScheduler's
        50-step grid with mu of (resolution/16)^2 tokens (QwenImagePipeline's call); the last step's s is sigma 0."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        adapter = load_adapter(self.family, str(model_dir), resolution=resolution, training_sigmas="shifted")
        tokens = (resolution // 16) ** 2
        assert adapter.mu == pytest.approx(reference_mu(tokens), rel=1e-12)
        scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 50, 50), mu=reference_mu(tokens))
        grid = torch.arange(999, -1, -20)
        torch.testing.assert_close(adapter.schedule.b[grid].float(), scheduler.sigmas[:50].float(), rtol=0, atol=1e-6)
        _, b_s = adapter.schedule.previous_coefficients(grid)
        torch.testing.assert_close(b_s, scheduler.sigmas[1:51].float(), rtol=0, atol=1e-6)
        assert float(adapter.schedule.b[19]) == pytest.approx(0.02)  # shift_terminal: the grid's last sigma
        assert torch.all(adapter.schedule.b[1:] > adapter.schedule.b[:-1]) and adapter.schedule.b[0] > 0

    @pytest.mark.parametrize("resolution", [32, 1024])
    def test_default_training_sigmas_are_the_scripts_unshifted_ones(self, model_dir, resolution):
        """Issue 26 item 4: diffusers' train_dreambooth_lora_qwen_image.py draws from the scheduler's own training
        table, which use_dynamic_shifting leaves unshifted: sigma_t = (t + 1)/1000 (its shift=3.0 is inert). The
        mean over uniform t is 0.5005 (the shifted table's is 0.607 at 1024 px). s stays one step of the
        pipeline's grid lower: at the training index nearest grid sigma k, s is near grid sigma k + 1."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        adapter = load_adapter(self.family, str(model_dir), resolution=resolution)
        unshifted = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)  # before set_timesteps: the training table
        t = torch.arange(1000)
        torch.testing.assert_close(adapter.schedule.b[t].float(), unshifted.sigmas[999 - t].float(), rtol=0, atol=1e-6)
        assert float(adapter.schedule.b.mean()) == pytest.approx(0.5005, abs=1e-9)
        shifted = load_adapter(self.family, str(model_dir), resolution=resolution, training_sigmas="shifted")
        if resolution == 1024:
            assert float(shifted.schedule.b.mean()) == pytest.approx(0.607, abs=0.001)
        scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 50, 50), mu=reference_mu((resolution // 16) ** 2))
        grid = scheduler.sigmas.double()
        for k in range(1, 48):
            index = round(grid[k].item() * 1000) - 1
            _, b_t = adapter.schedule.coefficients(torch.tensor([index]))
            _, b_s = adapter.schedule.previous_coefficients(torch.tensor([index]))
            tolerance = abs(b_t.item() - grid[k].item()) * 3 + 1e-6
            assert b_s.item() == pytest.approx(grid[k + 1].item(), abs=tolerance), k

    def test_the_transformer_sees_sigma_as_its_timestep(self, adapter, pairs):
        """QwenImagePipeline passes its scheduler timestep / 1000 = sigma."""
        seen = {}
        handle = adapter.denoiser.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
        x0 = adapter.encode_images(pairs[1])
        cond = adapter.encode_prompts(["a cat", "a dog"])
        with torch.no_grad():
            adapter.predict(x0, torch.tensor([999, 499]), cond)
        handle.remove()
        # the default training table is unshifted: t = 999 -> sigma 1; t = 499 -> sigma 0.5
        torch.testing.assert_close(seen["timestep"].double(), torch.tensor([1.0, 0.5], dtype=torch.float64), rtol=0, atol=1e-6)
        assert seen["hidden_states"].shape == (2, 4, 64) and seen["img_shapes"] == [[(1, 2, 2)]] * 2

    def test_sides_not_divisible_by_16_are_one_sentence(self, adapter):
        from sipo.errors import SipoError

        with pytest.raises(SipoError, match="model.resolution"):
            adapter.encode_images(torch.zeros(1, 3, 24, 24))

    def test_dpo_cm_trains_two_steps(self, model_dir, manifest, tmp_path):
        from sipo.train import train

        config = self._config(FAMILY_OVERRIDES, model_dir, manifest, tmp_path, **{"objective.name": "dpo-cm", "objective.tau": 0.05})
        result = train(config, progress=False)
        assert result.steps == 2 and all(math.isfinite(r["loss"]) for r in result.history)


def test_full_config_has_the_published_parameter_count():
    """Qwen-Image: a 20B MMDiT (Qwen/Qwen-Image model card); its published config counts 20.43B on meta."""
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**FULL_TRANSFORMER_CONFIG)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(20.43, abs=0.01)


def test_config_resolution_reaches_the_schedule(tiny_qwenimage_dir, tmp_path):
    from sipo.models import adapter_from_config

    config = load_config(None, ["model.family=qwenimage", f"model.pretrained_path={tiny_qwenimage_dir}", "model.resolution=64"])
    assert adapter_from_config(config.model).mu == pytest.approx(reference_mu(16))
