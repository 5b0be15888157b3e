"""Wan2.2 (tiny random weights): TI2V-5B's layout and T2V-A14B's two experts, each through the video contract.

What is Wan2.2's own: TI2V-5B's 48-channel VAE at 16x and its per-token timesteps; A14B's routing of
each sample to the expert its timestep selects (checked against the experts called one by one), the
gradients reaching only the expert that predicted, the reference as both experts with adapters off,
and the two LoRA files that ``WanPipeline.load_lora_weights`` loads into ``transformer`` and
``transformer_2``.
"""

from __future__ import annotations

import math

import pytest
import torch
from family_contract import inject_lora
from safetensors.torch import load_file
from video_contract import TINY_FRAMES, TINY_SIZE, VideoFamilyContract, video_overrides

from sipo.checkpoints import list_checkpoints
from sipo.config import load_config
from sipo.models import load_adapter, lora_disabled
from sipo.models.wan import FULL_A14B_TRANSFORMER_CONFIG, FULL_TI2V_5B_TRANSFORMER_CONFIG, WanAdapter


@pytest.fixture(scope="module")
def ti2v_dir(tmp_path_factory):
    return WanAdapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_wan22_ti2v"), variant="2.2-ti2v-5b")


@pytest.fixture(scope="module")
def a14b_dir(tmp_path_factory):
    return WanAdapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_wan22_a14b"), variant="2.2-t2v-a14b")


def flow_sigma(t: int, shift: float) -> float:
    """sigma of training index t by hand: s = (t + 1) / 1000 shifted as FlowMatchEuler / UniPC(flow) shift it."""
    s = (t + 1) / 1000
    return shift * s / (1 + (shift - 1) * s)


def _dpo_cm_two_steps(model_dir, manifest, output_dir):
    from sipo.train import train

    config = load_config(None, video_overrides("wan", model_dir, manifest, output_dir, **{"objective.name": "dpo-cm"}))
    result = train(config, progress=False)
    assert result.steps == 2 and all(math.isfinite(r["loss"]) for r in result.history)


class TestWan22TI2V(VideoFamilyContract):
    family = "wan"
    prediction_kind = "flow"

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, ti2v_dir):
        return ti2v_dir

    def test_latents_are_48_channel_normalised_vae_means_at_16x(self, adapter):
        video = torch.rand(1, TINY_FRAMES, 3, TINY_SIZE, TINY_SIZE) * 2 - 1
        x0 = adapter.encode_images(video)
        assert x0.shape == (1, 48, 3, 2, 2)  # [B, z_dim 48, (9-1)/4+1, 32/16, 32/16]
        with torch.no_grad():
            mean = adapter.vae.encode(video.permute(0, 2, 1, 3, 4)).latent_dist.mean
        mu = torch.tensor(adapter.vae.config.latents_mean).view(1, -1, 1, 1, 1)
        sd = torch.tensor(adapter.vae.config.latents_std).view(1, -1, 1, 1, 1)
        torch.testing.assert_close(x0 * sd + mu, mean, rtol=1e-5, atol=1e-5)
        assert adapter.spatial_multiple == 32  # 16x VAE x 2x2 patches: WanPipeline's h_multiple_of

    def test_the_transformer_gets_one_timestep_per_token(self, adapter):
        """WanPipeline with expand_timesteps: timestep [B, F * h/2 * w/2], every token t (text-to-video)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        assert adapter.flow_shift == 5.0  # TI2V-5B's scheduler config
        seen = {}
        handle = adapter.denoiser.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
        x = torch.randn(2, 48, 3, 2, 2, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([100, 900])
        with torch.no_grad():
            adapter.predict(x, t, adapter.encode_prompts(["a cat", "a dog"]))
        handle.remove()
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
        expected = scheduler.timesteps[999 - t].float()[:, None].expand(2, 3)  # 3 latent frames x 1 x 1 tokens
        torch.testing.assert_close(seen["timestep"].float(), expected, rtol=1e-5, atol=1e-3)

    def test_dpo_cm_trains_two_steps(self, model_dir, manifest, tmp_path):
        _dpo_cm_two_steps(model_dir, manifest, tmp_path)


class TestWan22A14B(VideoFamilyContract):
    family = "wan"
    prediction_kind = "flow"

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, a14b_dir):
        return a14b_dir

    def test_saved_lora_loads_into_the_family_pipeline_and_generates(self, trained, model_dir, tmp_path):
        """Replaced for two experts: a LoRA on both experts, saved by the adapter, loads with
        ``pipe.load_lora_weights(dir)`` (transformer) and ``load_into_transformer_2=True`` (the second
        file) and reproduces the adapter at a high- and a low-noise timestep; the trained run's files
        load the same way and the pipeline generates."""
        from diffusers import WanPipeline
        from peft.utils import get_peft_model_state_dict

        adapter = load_adapter(self.family, str(model_dir))
        x = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        cond = adapter.encode_prompts(["a moving gradient 0"])
        high, low = torch.tensor([950]), torch.tensor([300])  # sigma 0.98 and 0.56 for shift 3 (boundary 0.875)
        inject_lora(adapter)
        adapter.save_lora(tmp_path, get_peft_model_state_dict(adapter.denoiser))
        pipe = WanPipeline.from_pretrained(str(model_dir))
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            base = [adapter.predict(x, t, cond, denoiser=m) for t, m in ((high, pipe.transformer), (low, pipe.transformer_2))]
            pipe.load_lora_weights(str(tmp_path))
            pipe.load_lora_weights(str(tmp_path), weight_name=WanAdapter.TRANSFORMER_2_LORA_FILE, load_into_transformer_2=True)
            for (t, model), before in zip(((high, pipe.transformer), (low, pipe.transformer_2)), base):
                loaded = adapter.predict(x, t, cond, denoiser=model)
                torch.testing.assert_close(loaded, adapter.predict(x, t, cond), rtol=1e-4, atol=1e-5)
                assert (loaded - before).abs().max() > 1e-3
        result, config = trained
        run = WanPipeline.from_pretrained(str(model_dir))
        run.set_progress_bar_config(disable=True)
        run.load_lora_weights(str(config.train.output_dir))
        run.load_lora_weights(str(config.train.output_dir), weight_name=WanAdapter.TRANSFORMER_2_LORA_FILE,
                              load_into_transformer_2=True)
        video = run(prompt="a moving gradient", num_frames=TINY_FRAMES, height=TINY_SIZE, width=TINY_SIZE,
                    num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt",
                    max_sequence_length=adapter.max_sequence_length).frames
        assert video.shape == (1, TINY_FRAMES, 3, TINY_SIZE, TINY_SIZE) and torch.isfinite(video).all()

    def test_each_sample_goes_to_the_expert_its_timestep_selects(self, adapter):
        """A batch straddling the boundary == each sample through its expert alone, the expert chosen by hand:
        high noise where sigma * 1000 >= 0.875 * 1000 (WanPipeline's switch), sigma from the shift-3 formula."""
        experts = adapter.experts
        assert experts is not None and experts.boundary_timestep == 875.0
        t = [100, 650, 750, 990]
        sigmas = [flow_sigma(i, 3.0) for i in t]  # 0.25, 0.848, 0.900, 0.997
        chosen = [experts.transformer if s >= 0.875 else experts.transformer_2 for s in sigmas]
        assert [m is experts.transformer for m in chosen] == [False, False, True, True]
        x = torch.randn(4, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1))
        cond = adapter.encode_prompts(["a cat", "a dog", "a red cat", "a blue dog"])
        with torch.no_grad():
            routed = adapter.predict(x, torch.tensor(t), cond)
            alone = torch.cat([
                model(hidden_states=x[i:i + 1], timestep=torch.tensor([sigmas[i] * 1000]),
                      encoder_hidden_states=cond["encoder_hidden_states"][i:i + 1], return_dict=False)[0]
                for i, model in enumerate(chosen)
            ])
            other = experts.transformer_2(hidden_states=x[2:3], timestep=torch.tensor([sigmas[2] * 1000]),
                                          encoder_hidden_states=cond["encoder_hidden_states"][2:3], return_dict=False)[0]
        torch.testing.assert_close(routed, alone, rtol=1e-4, atol=1e-5)
        assert (other - alone[2:3]).abs().max() > 1e-3  # the experts differ: routing is visible

    def test_gradients_reach_only_the_expert_that_predicted(self, adapter):
        inject_lora(adapter)
        for name, param in adapter.denoiser.named_parameters():
            param.requires_grad_("lora_" in name)
        x = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(2))
        cond = adapter.encode_prompts(["a cat", "a dog"])

        def grads(t):
            adapter.denoiser.zero_grad(set_to_none=True)
            adapter.predict(x, torch.tensor(t), cond).square().mean().backward()
            return {expert: any(p.grad is not None and p.grad.abs().max() > 0 for n, p in
                                getattr(adapter.denoiser, expert).named_parameters() if "lora_" in n)
                    for expert in ("transformer", "transformer_2")}

        assert grads([100, 300]) == {"transformer": False, "transformer_2": True}
        assert grads([950, 990]) == {"transformer": True, "transformer_2": False}
        assert grads([100, 990]) == {"transformer": True, "transformer_2": True}

    def test_the_reference_is_both_experts_with_adapters_off(self, adapter, model_dir):
        fresh = load_adapter(self.family, str(model_dir))
        x = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(3))
        cond = adapter.encode_prompts(["a cat", "a dog"])
        t = torch.tensor([100, 990])  # one sample per expert
        inject_lora(adapter)
        with torch.no_grad():
            policy = adapter.predict(x, t, cond)
            with lora_disabled(adapter.denoiser):
                reference = adapter.predict(x, t, cond)
            base = fresh.predict(x, t, cond)
        torch.testing.assert_close(reference, base, rtol=0, atol=0)
        assert all((policy[i] - base[i]).abs().max() > 1e-3 for i in range(2))

    def test_the_pipeline_runs_both_experts_and_the_boundary(self, adapter):
        pipe = adapter.pipeline()
        assert pipe.transformer is adapter.experts.transformer and pipe.transformer_2 is adapter.experts.transformer_2
        assert pipe.config.boundary_ratio == 0.875

    def test_dpo_trains_two_steps_with_finite_loss_and_changes_lora(self, model_dir, manifest, tmp_path):
        """Replaced: two steps of one pair each train the expert(s) their timesteps chose, so the moved
        LoRA B may sit in either expert's file (here both draws fall below the boundary)."""
        from sipo.train import train

        config = load_config(None, video_overrides(self.family, model_dir, manifest, tmp_path, **{"objective.name": "dpo"}))
        result = train(config, progress=False)
        assert result.steps == 2 and all(math.isfinite(r["loss"]) for r in result.history)
        saved = {**{f"high.{k}": v for k, v in load_file(tmp_path / "pytorch_lora_weights.safetensors").items()},
                 **{f"low.{k}": v for k, v in load_file(tmp_path / WanAdapter.TRANSFORMER_2_LORA_FILE).items()}}
        assert any("lora_B" in k and v.abs().max() > 0 for k, v in saved.items())

    def test_the_trained_run_has_one_lora_file_per_expert(self, trained):
        _, config = trained
        run = config.train.output_dir
        high = load_file(f"{run}/pytorch_lora_weights.safetensors")
        low = load_file(f"{run}/{WanAdapter.TRANSFORMER_2_LORA_FILE}")
        trainable = load_file(list_checkpoints(run)[-1] / "trainable.safetensors")
        assert len(high) == len(low) == len(trainable) // 2 and all(k.startswith("transformer.") for k in (*high, *low))

    def test_dpo_cm_trains_two_steps(self, model_dir, manifest, tmp_path):
        _dpo_cm_two_steps(model_dir, manifest, tmp_path)


def test_full_configs_have_the_published_parameter_counts():
    """Wan2.2-TI2V-5B: 5B (Wan-AI/Wan2.2-TI2V-5B model card), 5.00B from its config on meta; T2V-A14B: two
    14B experts (the card: 27B total, 14B active per step), 14.29B each from their config."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        ti2v = WanTransformer3DModel(**FULL_TI2V_5B_TRANSFORMER_CONFIG)
        expert = WanTransformer3DModel(**FULL_A14B_TRANSFORMER_CONFIG)
    assert sum(p.numel() for p in ti2v.parameters()) / 1e9 == pytest.approx(5.00, abs=0.01)
    assert sum(p.numel() for p in expert.parameters()) / 1e9 == pytest.approx(14.29, abs=0.01)
