"""Qwen-Image-Edit-Plus on a tiny random-weight QwenImageEditPlusPipeline saved to disk and loaded by the real code.

The shared contracts (tests/family_contract.py) run on it with pairs that share an input image; the tests below
check what is the edit pipeline's own: ``predict`` equals the pipeline's one-step transformer call (input image,
scheduler on the one sigma) for the policy and the reference, the input's latents never enter the loss, the
text states depend on the input image, and the full-size parameter count.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conditioned_fixtures import TransformerOutputs, input_pictures, relative_error, write_edit_pairs
from family_contract import AdapterContract, FamilyContract, inject_lora
from tiny_models import make_image_pairs

from sipo.errors import SipoError
from sipo.models import load_adapter, lora_disabled
from sipo.models.qwenimage_edit import FULL_EDIT_TRANSFORMER_CONFIG, QwenImageEditPlusAdapter, to_pil

TINY_SIZE = 32
FAMILY_OVERRIDES = {"model.family": "qwenimage_edit", "model.resolution": TINY_SIZE}


@pytest.fixture(scope="module")
def tiny_edit_dir(tmp_path_factory):
    return QwenImageEditPlusAdapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_qwenimage_edit"))


def edit_pairs():
    prompts, winners, losers = make_image_pairs(size=TINY_SIZE)
    return prompts, winners, losers, None, input_pictures(len(prompts), TINY_SIZE)


class TestQwenImageEditPlus(AdapterContract, FamilyContract):
    family = "qwenimage_edit"

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tiny_edit_dir):
        return tiny_edit_dir

    @pytest.fixture
    def adapter(self, model_dir):
        return load_adapter(self.family, str(model_dir), resolution=TINY_SIZE)

    @pytest.fixture
    def pairs(self):
        return edit_pairs()

    @pytest.fixture(scope="class")
    @classmethod
    def manifest(cls, tmp_path_factory):
        return write_edit_pairs(tmp_path_factory.mktemp("edit_pairs"), num_pairs=4, size=TINY_SIZE)

    @pytest.fixture(scope="class")
    @classmethod
    def family_overrides(cls):
        return dict(FAMILY_OVERRIDES)

    def family_pipeline(self, model_dir):
        """QwenImageEditPlusPipeline over freshly loaded components (diffusers' loader builds transformers'
        Qwen2VLProcessor, which needs torchvision; the adapter reads the same processor files without it)."""
        return load_adapter(self.family, str(model_dir), resolution=TINY_SIZE).pipeline()

    def sample_kwargs(self) -> dict:
        return {"num_inference_steps": 2, "height": TINY_SIZE, "width": TINY_SIZE,
                "image": to_pil(input_pictures(1, TINY_SIZE)[0])}

    def test_trained_lora_loads_into_the_pipeline_and_generates(self, trained, model_dir, monkeypatch):
        """The contract's check, with the pipeline encoding its input at the tiny resolution (not its 1024^2 area)."""
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

        monkeypatch.setattr(module, "VAE_IMAGE_SIZE", TINY_SIZE * TINY_SIZE)
        super().test_trained_lora_loads_into_the_pipeline_and_generates(trained, model_dir)

    def test_sipo_eval_edits_each_input_image(self, trained, model_dir, manifest, family_overrides, tmp_path,
                                              monkeypatch, capsys):
        """``sipo eval --inputs`` samples base and aligned edits of the listed input images through the pipeline's
        image argument and scores them; ``--prompts`` alone stops in one sentence for this family."""
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module
        from tiny_scorers import make_tiny_clip
        from train_fixtures import write_tiny_config

        from sipo.cli import main as cli_main
        from sipo.evaluate import load_picture

        monkeypatch.setattr(module, "VAE_IMAGE_SIZE", TINY_SIZE * TINY_SIZE)
        config = write_tiny_config(tmp_path / "config.yaml", model_dir, manifest, tmp_path / "unused", **family_overrides)
        inputs = tmp_path / "inputs.jsonl"
        inputs.write_text("".join(json.dumps({"prompt": f"make picture {i} red", "input_image": str(manifest.parent / f"00{i}_input.png")}) + "\n"
                                  for i in range(2)))
        scorer = make_tiny_clip(tmp_path / "pickscore")
        common = ["--config", str(config), "--checkpoint", str(trained["dpo"]), "--scorers", "pickscore",
                  "--scorer-path", f"pickscore={scorer}", "--num-inference-steps", "2", "--output-dir", str(tmp_path / "eval"),
                  "--no-progress"]
        assert cli_main(["eval", *common, "--inputs", str(inputs)]) == 0
        assert "| pickscore |" in capsys.readouterr().out
        base, aligned = (load_picture(tmp_path / "eval" / "images" / m / "p00001_s0.png") for m in ("base", "aligned"))
        assert base.shape == aligned.shape == (3, TINY_SIZE, TINY_SIZE) and not torch.equal(base, aligned)
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a cat\n")
        assert cli_main(["eval", *common, "--prompts", str(prompts)]) != 0
        assert "edits or animates an input image; pass --inputs FILE" in capsys.readouterr().err

    @pytest.mark.parametrize("t", [0, 999])
    def test_scheduler_forward_process_is_the_schedule(self, model_dir, pairs, t):
        """Replaced (the Qwen-Image test checks the shifted grid against the scheduler): the flow forward
        process ``x_t = (1 - sigma) x0 + sigma eps`` with the scheduler's own ``scale_noise`` at sigma_t."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from sipo.schedules import add_noise

        adapter = load_adapter(self.family, str(model_dir), resolution=TINY_SIZE)
        x0 = adapter.encode(*pairs).x0_winner
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
        index = torch.full((x0.shape[0],), t)
        sigma = float(adapter.schedule.b[t])
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(adapter.scheduler.config, use_dynamic_shifting=False,
                                                                shift=1.0, shift_terminal=None)
        scheduler.set_timesteps(sigmas=[sigma])
        expected = scheduler.scale_noise(x0, scheduler.timesteps[:1].repeat(x0.shape[0]), eps)
        a_t, b_t = adapter.schedule.coefficients(index)
        torch.testing.assert_close(add_noise(x0, eps, a_t, b_t), expected.float(), rtol=0, atol=1e-5)

    # ------------------------------------------------------------------ the edit pipeline's own
    @pytest.mark.parametrize("t", [150, 700])
    def test_predict_equals_the_pipelines_one_step_call(self, model_dir, monkeypatch, t):
        """QwenImageEditPlusPipeline with its scheduler on the one sigma of ``t`` (shift off, so the sigma stays),
        our ``x_t`` as its latents and the same input image: its transformer's answer on the output tokens equals
        ``predict``, for the LoRA policy and the reference (LoRA off), to relative error 1e-5."""
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

        # the pipeline encodes its input at the 1024^2 area: the tiny run's resolution here (the adapter: model.resolution)
        monkeypatch.setattr(module, "VAE_IMAGE_SIZE", TINY_SIZE * TINY_SIZE)
        adapter = load_adapter(self.family, str(model_dir), resolution=TINY_SIZE)
        inject_lora(adapter)
        picture = input_pictures(1, TINY_SIZE)[0]
        prompt = "make the sky red"
        conditioning = adapter.encode_inputs([prompt], picture[None])
        x_t = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(t))
        timesteps = torch.tensor([t])
        sigma = float(adapter.schedule.b[t])
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(adapter.scheduler.config, use_dynamic_shifting=False,
                                                                shift=1.0, shift_terminal=None)
        pipe = adapter.pipeline(scheduler=scheduler)
        for reference in (False, True):
            recorder = TransformerOutputs(adapter.denoiser)
            with torch.no_grad(), (lora_disabled(adapter.denoiser) if reference else contextlib.nullcontext()):
                pipe(image=to_pil(picture), prompt=prompt, num_inference_steps=1, sigmas=[sigma], true_cfg_scale=1.0,
                     latents=QwenImagePipeline._pack_latents(x_t, 1, 16, 4, 4), height=TINY_SIZE, width=TINY_SIZE,
                     output_type="latent")
                recorder.close()
                ours = adapter.predict(x_t, timesteps, conditioning)
            (theirs,) = recorder.outputs
            assert recorder.inputs[0]["hidden_states"].shape[1] == 2 * 4  # 4 output tokens + 4 of the input image
            torch.testing.assert_close(recorder.inputs[0]["timestep"].float(), torch.tensor([sigma]), rtol=1e-6, atol=0)
            theirs = QwenImagePipeline._unpack_latents(theirs[:, :4], TINY_SIZE, TINY_SIZE, 8)[:, :, 0]
            assert relative_error(ours, theirs) <= 1e-5

    def test_the_input_image_conditions_twice_and_never_enters_x0(self, adapter):
        """Another input image changes the text states (Qwen2.5-VL reads it) and the image latents, the prediction
        with them, and not x0 (the pair's own pictures)."""
        prompts, winners, losers, _, inputs = edit_pairs()
        first = adapter.encode(prompts, winners, losers, input_images=inputs)
        second = adapter.encode(prompts, winners, losers, input_images=inputs.flip(-2))
        assert torch.equal(first.x0_winner, second.x0_winner) and torch.equal(first.x0_loser, second.x0_loser)
        for key in ("encoder_hidden_states", "image_latents"):
            assert not torch.allclose(first.conditioning[key], second.conditioning[key])
        torch.testing.assert_close(first.conditioning["image_latents"], adapter.encode_images(inputs))
        t = torch.tensor([400, 400])
        with torch.no_grad():
            a = adapter.predict(first.x0_winner, t, first.conditioning)
            b = adapter.predict(first.x0_winner, t, second.conditioning)
        assert not torch.allclose(a, b, atol=1e-5)

    def test_pairs_without_input_images_stop_in_one_sentence(self, adapter):
        prompts, winners, losers = make_image_pairs(size=TINY_SIZE)
        with pytest.raises(SipoError, match="edits or animates an input image, and these pairs have none"):
            adapter.encode(prompts, winners, losers)


def test_full_config_has_the_published_parameter_count():
    """Qwen-Image-Edit-2509: the 20B Qwen-Image MMDiT (its model card); its config counts 20.43B on meta."""
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**FULL_EDIT_TRANSFORMER_CONFIG)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(20.43, abs=0.01)


def test_training_from_the_cache_equals_training_from_pictures_with_mirrored_inputs(tiny_edit_dir, tmp_path):
    """``sipo cache`` stores each pair's input latents and image-dependent text states (and, with random_flip,
    those of the mirrored input); two steps from the cache equal two steps from the pictures."""
    from safetensors.torch import load_file
    from train_fixtures import tiny_overrides

    from sipo.checkpoints import list_checkpoints
    from sipo.config import load_config
    from sipo.data.cache import build_cache, open_cache
    from sipo.train import train

    manifest = write_edit_pairs(tmp_path / "pairs", num_pairs=2, size=TINY_SIZE)

    def config(output, **extra):
        values = {**FAMILY_OVERRIDES, "data.random_flip": True, "data.cache_dir": str(tmp_path / "cache"),
                  "train.deterministic": True, "train.checkpoint_every": 2, **extra}
        return load_config(None, tiny_overrides(tiny_edit_dir, manifest, output, **values))

    build_cache(config(tmp_path / "unused"), progress=False)
    cached_pairs = open_cache(config(tmp_path / "unused"))
    item = cached_pairs[0]
    assert item["conditioning"]["image_latents"].shape == (16, 4, 4)
    assert set(item["conditioning"]) == {"encoder_hidden_states", "encoder_hidden_states_mask", "image_latents"}
    pictures = train(config(tmp_path / "pictures", **{"data.use_cache": "never"}), progress=False)
    cached = train(config(tmp_path / "cached", **{"data.use_cache": "always"}), progress=False)
    first, second = (load_file(list_checkpoints(tmp_path / name)[-1] / "trainable.safetensors") for name in ("pictures", "cached"))
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=1e-5)
    assert [r["loss"] for r in cached.history] == pytest.approx([r["loss"] for r in pictures.history], abs=1e-5)


def test_a_rewritten_input_image_changes_the_cache_key(tmp_path):
    """The key stamps every file a manifest names, its input images too: a new input under the old name is a new key."""
    import os

    from PIL import Image
    from train_fixtures import tiny_overrides

    from sipo.config import load_config
    from sipo.data.cache import cache_key

    manifest = write_edit_pairs(tmp_path / "pairs", num_pairs=1, size=TINY_SIZE)
    config = load_config(None, tiny_overrides(tmp_path / "model", manifest, tmp_path / "out", **FAMILY_OVERRIDES))
    before = cache_key(config)
    source = tmp_path / "pairs" / "000_input.png"
    Image.new("RGB", (TINY_SIZE, TINY_SIZE), (9, 9, 9)).save(source)
    os.utime(source, ns=(1, 1))  # another size or mtime, whatever the clock
    assert cache_key(config) != before
