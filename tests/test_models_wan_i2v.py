"""Wan2.2 image-to-video on tiny random weights: TI2V-5B's image-to-video mode and I2V-A14B's two experts.

The shared contracts (tests/family_contract.py) run on each with clips that start from a shared input image;
the tests below check what is the image-to-video pipeline's own: ``predict`` equals WanImageToVideoPipeline's
one-step transformer call (the same input image, its scheduler on the one sigma) for the policy and the
reference, TI2V-5B's clean first frame kept out of ``x0`` with timestep 0 on its tokens, I2V-A14B's mask and
condition clip on channels, and the full-size parameter counts.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conditioned_fixtures import TransformerOutputs, input_pictures, relative_error, write_i2v_pairs
from family_contract import AdapterContract, FamilyContract, inject_lora

from sipo.models import load_adapter, lora_disabled
from sipo.models.qwenimage_edit import to_pil
from sipo.models.wan import FULL_TI2V_5B_TRANSFORMER_CONFIG
from sipo.models.wan_i2v import FULL_I2V_A14B_TRANSFORMER_CONFIG, WanI2VAdapter

FRAMES, SIZE = 9, 32
VIDEO_OVERRIDES = {"model.family": "wan_i2v", "model.resolution": SIZE, "data.num_frames": FRAMES, "data.fps": 8,
                   "data.height": SIZE, "data.width": SIZE, "train.batch_size": 1}


@pytest.fixture(scope="module")
def i2v_manifest(tmp_path_factory):
    return write_i2v_pairs(tmp_path_factory.mktemp("i2v_pairs"), num_pairs=2, frames=FRAMES, size=SIZE)


def video_pairs(count: int = 2):
    generator = torch.Generator().manual_seed(0)
    winners = torch.rand(count, FRAMES, 3, SIZE, SIZE, generator=generator) * 2 - 1
    losers = torch.rand(count, FRAMES, 3, SIZE, SIZE, generator=generator) * 2 - 1
    prompts = ["a cat walks to the left", "the dog turns around"][:count]
    return prompts, winners, losers, None, input_pictures(count, SIZE)


def flow_sigma(t: int, shift: float) -> float:
    """sigma of training index t by hand: s = (t + 1) / 1000 shifted as the Wan schedulers shift it."""
    s = (t + 1) / 1000
    return shift * s / (1 + (shift - 1) * s)


def one_step_pipeline(adapter, sigma: float):
    """WanImageToVideoPipeline over the adapter's modules, its scheduler set to the one sigma (shift 1 keeps it):
    the pipeline's own ``set_timesteps(1)`` call gets ``sigmas=[sigma]``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    one_sigma = scheduler.set_timesteps
    scheduler.set_timesteps = lambda num_inference_steps=None, device=None, **_: one_sigma(sigmas=[sigma], device=device)
    return adapter.pipeline(scheduler=scheduler)


class WanI2VContract(AdapterContract, FamilyContract):
    family = "wan_i2v"
    shift: float

    @pytest.fixture
    def adapter(self, model_dir):
        return load_adapter(self.family, str(model_dir))

    @pytest.fixture
    def pairs(self):
        return video_pairs()

    @pytest.fixture(scope="class")
    @classmethod
    def manifest(cls, i2v_manifest):
        return i2v_manifest

    @pytest.fixture(scope="class")
    @classmethod
    def family_overrides(cls):
        return dict(VIDEO_OVERRIDES)

    def family_pipeline(self, model_dir):
        from diffusers import WanImageToVideoPipeline

        return WanImageToVideoPipeline.from_pretrained(str(model_dir))

    def scheduler_forward(self, adapter, x0, eps, timesteps):
        """The flow forward process with the checkpoint's shift, by hand."""
        sigma = torch.tensor([flow_sigma(int(t), self.shift) for t in timesteps]).view(-1, 1, 1, 1, 1)
        return (1 - sigma) * x0 + sigma * eps

    def load_run_lora(self, pipe, run) -> None:
        pipe.load_lora_weights(str(run))

    def test_trained_lora_loads_into_the_pipeline_and_generates(self, trained, model_dir):
        """Replaced: WanImageToVideoPipeline from the directory, the run's LoRA loaded with its own loader, a
        2-step clip from an input image (prompt states from the adapter: the pipeline's prompt cleaning needs ftfy)."""
        adapter = load_adapter(self.family, str(model_dir))
        pipe = self.family_pipeline(model_dir)
        pipe.set_progress_bar_config(disable=True)
        states = adapter.encode_prompts(["a photo of a cat"])["encoder_hidden_states"]

        def generate():
            return pipe(image=to_pil(input_pictures(1, SIZE)[0]), prompt_embeds=states, negative_prompt_embeds=states,
                        num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=2, output_type="pt",
                        generator=torch.Generator().manual_seed(0)).frames

        base = generate()
        self.load_run_lora(pipe, trained["dpo"])
        tuned = generate()
        assert tuned.shape == base.shape == (1, FRAMES, 3, SIZE, SIZE) and torch.isfinite(tuned).all()
        assert not torch.allclose(tuned, base, atol=1e-6)

    def check_one_step(self, model_dir, timesteps: list[int]) -> None:
        """``predict`` == the pipeline's one-step transformer call, for the LoRA policy and the reference."""
        adapter = load_adapter(self.family, str(model_dir))
        inject_lora(adapter)
        picture = input_pictures(1, SIZE)[0]
        conditioning = adapter.encode_inputs(["a cat walks"], picture[None], num_frames=FRAMES)
        states = conditioning["encoder_hidden_states"]
        latent_frames = (FRAMES - 1) // 4 + 1
        side = SIZE // adapter.vae_scale_spatial
        channels = adapter.vae.config.z_dim
        for t in timesteps:
            full = torch.randn(1, channels, latent_frames, side, side, generator=torch.Generator().manual_seed(t))
            x_t = full[:, :, 1:] if adapter.expand_timesteps else full
            pipe = one_step_pipeline(adapter, float(adapter.schedule.b[t]))
            modules = (adapter.experts.transformer, adapter.experts.transformer_2) if adapter.experts else (adapter.denoiser,)
            for reference in (False, True):
                recorder = TransformerOutputs(*modules)
                with torch.no_grad(), (lora_disabled(adapter.denoiser) if reference else contextlib.nullcontext()):
                    pipe(image=to_pil(picture), prompt_embeds=states, guidance_scale=1.0, num_frames=FRAMES, height=SIZE,
                         width=SIZE, num_inference_steps=1, latents=full, output_type="latent")
                    recorder.close()
                    ours = adapter.predict(x_t, torch.tensor([t]), conditioning)
                (theirs,) = recorder.outputs
                theirs = theirs[:, :, 1:] if adapter.expand_timesteps else theirs
                assert relative_error(ours, theirs) <= 1e-5, (t, reference)
        self.seen_inputs = recorder.inputs[0]


class TestWan22TI2VImageToVideo(WanI2VContract):
    shift = 5.0

    def test_sipo_eval_animates_each_input_image(self, trained, model_dir, manifest, family_overrides, tmp_path, capsys):
        """``sipo eval --inputs``: base and aligned clips from each listed first frame, scored frame by frame."""
        import json

        from tiny_scorers import make_tiny_clip
        from train_fixtures import write_tiny_config

        from sipo.cli import main as cli_main
        from sipo.evaluate import load_picture

        config = write_tiny_config(tmp_path / "config.yaml", model_dir, manifest, tmp_path / "unused", **family_overrides)
        inputs = tmp_path / "inputs.jsonl"
        inputs.write_text(json.dumps({"prompt": "the clip pans", "input_image": str(manifest.parent / "000_first.png")}) + "\n")
        assert cli_main(["eval", "--config", str(config), "--checkpoint", str(trained["dpo"]), "--inputs", str(inputs),
                         "--scorers", "pickscore", "--scorer-path", f"pickscore={make_tiny_clip(tmp_path / 'pickscore')}",
                         "--num-inference-steps", "2", "--output-dir", str(tmp_path / "eval"), "--no-progress"]) == 0
        assert "| pickscore |" in capsys.readouterr().out
        base, aligned = (load_picture(tmp_path / "eval" / "images" / m / "p00000_s0") for m in ("base", "aligned"))
        assert base.shape == aligned.shape == (FRAMES, 3, SIZE, SIZE) and not torch.equal(base, aligned)

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tmp_path_factory):
        return WanI2VAdapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_ti2v_i2v"), variant="2.2-ti2v-5b")

    def test_predict_equals_the_pipelines_one_step_call(self, model_dir):
        self.check_one_step(model_dir, [200, 900])
        timestep = self.seen_inputs["timestep"]
        assert timestep.shape == (1, 3 * 1 * 1)  # 3 latent frames of 1x1 tokens
        assert timestep[0, 0] == 0 and torch.all(timestep[0, 1:] > 0)  # the clean first frame

    def test_the_first_frame_is_conditioning_not_x0(self, adapter):
        """x0 is the clip's latents after the first latent frame; the first frame's latents come from the input image."""
        prompts, winners, losers, _, inputs = video_pairs(1)
        encoded = adapter.encode(prompts, winners, losers, input_images=inputs)
        with torch.no_grad():
            full = adapter.vae.encode(winners.permute(0, 2, 1, 3, 4)).latent_dist.mode()
            first = adapter.vae.encode(inputs[:, :, None]).latent_dist.mode()
        mean = torch.tensor(adapter.vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(adapter.vae.config.latents_std).view(1, -1, 1, 1, 1)
        torch.testing.assert_close(encoded.x0_winner, ((full - mean) / std)[:, :, 1:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(encoded.conditioning["first_frame"], (first - mean) / std, rtol=1e-5, atol=1e-5)


class TestWan22I2VA14B(WanI2VContract):
    shift = 5.0

    def test_training_from_the_cache_equals_training_from_pictures(self, model_dir, manifest, tmp_path):
        """``sipo cache`` stores the input's latents (TI2V's first frame, A14B's condition clip) with the UMT5
        states; two steps from the cache equal two steps from the clips."""
        from safetensors.torch import load_file
        from train_fixtures import tiny_overrides

        from sipo.checkpoints import list_checkpoints
        from sipo.config import load_config
        from sipo.data.cache import build_cache
        from sipo.train import train

        def config(output, **extra):
            values = {**VIDEO_OVERRIDES, "data.cache_dir": str(tmp_path / "cache"), "train.deterministic": True,
                      "train.checkpoint_every": 2, **extra}
            return load_config(None, tiny_overrides(model_dir, manifest, output, **values))

        build_cache(config(tmp_path / "unused"), progress=False)
        pictures = train(config(tmp_path / "pictures", **{"data.use_cache": "never"}), progress=False)
        cached = train(config(tmp_path / "cached", **{"data.use_cache": "always"}), progress=False)
        first, second = (load_file(list_checkpoints(tmp_path / n)[-1] / "trainable.safetensors") for n in ("pictures", "cached"))
        for key in first:
            torch.testing.assert_close(second[key], first[key], rtol=0, atol=1e-5)
        assert [r["loss"] for r in cached.history] == pytest.approx([r["loss"] for r in pictures.history], abs=1e-5)

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tmp_path_factory):
        return WanI2VAdapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_i2v_a14b"), variant="2.2-i2v-a14b")

    def load_run_lora(self, pipe, run) -> None:
        pipe.load_lora_weights(str(run))
        pipe.load_lora_weights(str(run), weight_name=WanI2VAdapter.TRANSFORMER_2_LORA_FILE, load_into_transformer_2=True)

    def test_saved_lora_loads_with_the_pipeline(self, adapter, pairs, model_dir, tmp_path):
        """Replaced for two experts: both LoRA files load into WanImageToVideoPipeline's experts and reproduce the
        adapter at a high- (t 950) and a low-noise (t 300) step (boundary 0.9, shift 5)."""
        from peft.utils import get_peft_model_state_dict

        from sipo.models.wan import WanExperts

        encoded = adapter.encode(*pairs)
        x_t, t = encoded.x0_winner, torch.tensor([950, 300])
        assert [flow_sigma(950, 5.0) >= 0.9, flow_sigma(300, 5.0) >= 0.9] == [True, False]
        inject_lora(adapter)
        with torch.no_grad():
            policy = adapter.predict(x_t, t, encoded.conditioning)
        adapter.save_lora(tmp_path, get_peft_model_state_dict(adapter.denoiser))
        pipe = self.family_pipeline(model_dir)
        self.load_run_lora(pipe, tmp_path)
        loaded = WanExperts(pipe.transformer, pipe.transformer_2, 0.9 * 1000)
        with torch.no_grad():
            torch.testing.assert_close(adapter.predict(x_t, t, encoded.conditioning, denoiser=loaded), policy,
                                       rtol=1e-4, atol=1e-5)

    def test_predict_equals_the_pipelines_one_step_call(self, model_dir):
        """One high-noise and one low-noise step: the pipeline's boundary picks the expert, WanExperts the same."""
        self.check_one_step(model_dir, [950, 300])
        assert self.seen_inputs["hidden_states"].shape[1] == 16 + 4 + 16  # noise, mask, condition clip

    def test_the_condition_clip_is_the_image_then_black_frames(self, adapter):
        _, _, _, _, inputs = video_pairs(1)
        condition = adapter.encode_inputs(["a cat"], inputs, num_frames=FRAMES)["image_condition"]
        clip = torch.cat([inputs[:, :, None], torch.zeros(1, 3, FRAMES - 1, SIZE, SIZE)], dim=2)
        with torch.no_grad():
            latents = adapter.vae.encode(clip).latent_dist.mode()
        mean = torch.tensor(adapter.vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(adapter.vae.config.latents_std).view(1, -1, 1, 1, 1)
        torch.testing.assert_close(condition, (latents - mean) / std, rtol=1e-5, atol=1e-5)
        assert adapter.boundary_ratio == 0.9 and adapter.flow_shift == 5.0


def test_a_text_to_video_directory_is_not_image_to_video(tmp_path):
    from sipo.errors import SipoError
    from sipo.models.wan import WanAdapter

    directory = WanAdapter.build_random_pipeline(tmp_path / "t2v")
    with pytest.raises(SipoError, match="text-to-video WanPipeline"):
        load_adapter("wan_i2v", str(directory))


def test_full_configs_have_the_published_parameter_counts():
    """Wan2.2-I2V-A14B: two 14B experts (the model card: 27B total, 14B active), 14.29B each from their
    36-channel config on meta; TI2V-5B: 5B (its card), 5.00B (the same transformer does image-to-video)."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        expert = WanTransformer3DModel(**FULL_I2V_A14B_TRANSFORMER_CONFIG)
        ti2v = WanTransformer3DModel(**FULL_TI2V_5B_TRANSFORMER_CONFIG)
    assert sum(p.numel() for p in expert.parameters()) / 1e9 == pytest.approx(14.29, abs=0.01)
    assert sum(p.numel() for p in ti2v.parameters()) / 1e9 == pytest.approx(5.00, abs=0.01)


@pytest.mark.parametrize("name, family, frames, fps, size, steps", [
    ("wan22_i2v_a14b_lora.yaml", "wan_i2v", 81, 16, (480, 832), 40),
    ("wan22_ti2v_5b_i2v_lora.yaml", "wan_i2v", 121, 24, (704, 1280), 50),
    ("qwenimage_edit_plus_lora.yaml", "qwenimage_edit", None, None, (None, None), 50),
])
def test_the_packaged_conditioned_configs_load_with_their_models_formats(name, family, frames, fps, size, steps):
    """Each shipped config validates and names its family, clip format, sampler grid and a CPU text encoder."""
    from pathlib import Path

    import sipo
    from sipo.config import load_config

    config = load_config(Path(sipo.__file__).parent / "configs" / name)
    assert config.model.family == family and config.model.num_inference_steps == steps
    assert (config.data.num_frames, config.data.fps, (config.data.height, config.data.width)) == (frames, fps, size)
    assert config.model.text_encoder_device == "cpu" and config.data.format == "jsonl"
    assert config.objective.name == "sipo" and config.objective.beta == 20.0
