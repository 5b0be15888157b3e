"""SDXL on a tiny random-weight StableDiffusionXLPipeline saved to disk and loaded by the real code.

The shared contracts (tests/family_contract.py) run on it; the tests below check what is SDXL's own:
two text encoders and the pooled embedding as the pipeline computes them, the size/crop
micro-conditioning recorded by the datasets, the fp16 VAE handling, and the full-size configs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from family_contract import AdapterContract, FamilyContract, inject_lora
from PIL import Image
from safetensors import safe_open
from tiny_models import make_image_pairs
from train_fixtures import tiny_overrides, write_jsonl_pairs

from sipo.config import DataConfig, load_config
from sipo.data import collate_pairs, open_preference_dataset
from sipo.data.sizes import original_size, size_info
from sipo.errors import SipoError
from sipo.models import adapter_from_config, load_adapter
from sipo.models.sdxl import SDXLAdapter, sdxl_component_configs

REPO = Path(__file__).resolve().parents[1]
TINY_SIZE = 32  # pixels; the tiny VAE downsamples 2x -> latents [4, 16, 16]
FAMILY_OVERRIDES = {"model.family": "sdxl", "model.resolution": TINY_SIZE}


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    return SDXLAdapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_sdxl"), scale="tiny", seed=0)


class TestSDXL(AdapterContract, FamilyContract):
    family = "sdxl"

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tiny_sdxl_dir):
        return tiny_sdxl_dir

    @pytest.fixture
    def pairs(self):
        return make_image_pairs(size=TINY_SIZE)

    @pytest.fixture(scope="class")
    @classmethod
    def manifest(cls, tmp_path_factory):
        return write_jsonl_pairs(tmp_path_factory.mktemp("sdxl_pairs"), size=TINY_SIZE)

    @pytest.fixture(scope="class")
    @classmethod
    def family_overrides(cls):
        return dict(FAMILY_OVERRIDES)

    # ------------------------------------------------------------------ SDXL's own conditioning
    def test_conditioning_is_what_the_pipeline_feeds_its_unet(self, adapter, pairs):
        prompts, winners, losers = pairs
        encoded = adapter.encode(prompts, winners, losers)
        cond = encoded.conditioning
        # tiny: two 32-d encoders -> 64-d states; pooled = text_encoder_2's 32-d projection
        assert cond["encoder_hidden_states"].shape == (2, 77, 64)
        assert cond["text_embeds"].shape == (2, 32)
        with torch.no_grad():
            states, _, pooled, _ = adapter.pipeline().encode_prompt(
                prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        torch.testing.assert_close(cond["encoder_hidden_states"], states)
        torch.testing.assert_close(cond["text_embeds"], pooled)
        # x0 is the VAE posterior mean times SDXL's scaling factor 0.13025
        with torch.no_grad():
            mean = adapter.vae.encode(losers).latent_dist.mean
        assert adapter.vae.config.scaling_factor == 0.13025
        torch.testing.assert_close(encoded.x0_loser, mean * 0.13025)
        assert encoded.x0_winner.shape == (2, 4, 16, 16)

    def test_vae_chunks_do_not_change_the_latents(self, adapter, pairs):
        _, winners, losers = pairs
        pictures = torch.cat([winners, losers])
        assert adapter.encode_chunk_size == 1
        one_by_one = adapter.encode_images(pictures)
        adapter.encode_chunk_size = 4
        torch.testing.assert_close(adapter.encode_images(pictures), one_by_one, rtol=1e-5, atol=1e-6)

    def test_time_ids_come_from_size_info(self, adapter, pairs):
        prompts, winners, losers = pairs
        sizes = torch.tensor([[512, 683, 0, 43], [1024, 1024, 0, 0]])
        ids = adapter.encode(prompts, winners, losers, size_info=sizes).conditioning["time_ids"]
        # (orig_h, orig_w, crop_top, crop_left, target_h, target_w); target = the training pictures' size
        torch.testing.assert_close(ids, torch.tensor([[512.0, 683, 0, 43, 32, 32], [1024.0, 1024, 0, 0, 32, 32]]))
        default = adapter.encode(prompts, winners, losers).conditioning["time_ids"]
        torch.testing.assert_close(default, torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2))
        with pytest.raises(ValueError, match="size_info must be"):
            adapter.encode(prompts, winners, losers, size_info=sizes[:1])

    def test_time_ids_change_the_prediction(self, adapter, pairs):
        """The size conditioning reaches the UNet (added_cond_kwargs), so recording it matters."""
        prompts, winners, losers = pairs
        plain = adapter.encode(prompts, winners, losers)
        cropped = adapter.encode(prompts, winners, losers, size_info=torch.tensor([[64, 96, 0, 16]] * 2))
        x_t = torch.randn(plain.x0_winner.shape, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([500, 500])
        with torch.no_grad():
            assert not torch.allclose(adapter.predict(x_t, t, plain.conditioning), adapter.predict(x_t, t, cropped.conditioning))

    def test_schedule_is_sdxls_epsilon_schedule(self, adapter):
        # SDXL base 1.0 scheduler_config.json: scaled_linear 0.00085 -> 0.012, epsilon; abar_999 =
        # prod(1 - beta_i), beta_i = (sqrt(0.00085) + i/999*(sqrt(0.012) - sqrt(0.00085)))^2
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        abar = torch.cumprod(1 - betas, 0)
        assert adapter.schedule.prediction_type == "epsilon"
        for t in (0, 500, 999):
            assert adapter.schedule.a[t].item() ** 2 == pytest.approx(abar[t].item(), rel=1e-5)

    def test_frozen_and_fp32_modules(self, adapter):
        assert adapter.frozen_modules() == [adapter.vae, adapter.text_encoder, adapter.text_encoder_2]
        assert adapter.vae.config.force_upcast is True
        assert adapter.keep_fp32_modules() == [adapter.vae]  # SDXL's own VAE overflows in fp16

    def test_fp16_safe_vae_from_vae_path(self, tiny_sdxl_dir, tmp_path):
        from diffusers import AutoencoderKL

        config = {**sdxl_component_configs("tiny")["vae"], "force_upcast": False}
        torch.manual_seed(5)
        AutoencoderKL(**config).save_pretrained(tmp_path / "vae_fp16_fix", safe_serialization=True)
        run = load_config(None, ["model.family=sdxl", f"model.pretrained_path={tiny_sdxl_dir}",
                                 f"model.vae_path={tmp_path / 'vae_fp16_fix'}"])
        adapter = adapter_from_config(run.model)
        assert adapter.keep_fp32_modules() == []
        own = load_adapter("sdxl", str(tiny_sdxl_dir))
        assert not torch.equal(next(adapter.vae.parameters()), next(own.vae.parameters()))  # the replacement is used

    def test_missing_vae_path_is_a_sipo_error(self, tiny_sdxl_dir, tmp_path):
        with pytest.raises(SipoError, match="model.vae_path .* holds no AutoencoderKL"):
            load_adapter("sdxl", str(tiny_sdxl_dir), vae_path=str(tmp_path))

    def test_sd15_directory_is_not_sdxl(self, tiny_sd15_dir):
        with pytest.raises(SipoError, match="StableDiffusionPipeline, not a sdxl model"):
            load_adapter("sdxl", str(tiny_sd15_dir))

    def test_lora_file_is_unet_only_with_its_config(self, adapter, tmp_path):
        from peft.utils import get_peft_model_state_dict

        inject_lora(adapter, r=4, lora_alpha=8)
        adapter.save_lora(tmp_path, get_peft_model_state_dict(adapter.denoiser))
        with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "pt") as file:
            keys = list(file.keys())
            metadata = json.loads(file.metadata()["lora_adapter_metadata"])
        assert keys and all(key.startswith("unet.") for key in keys)
        assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 8
        assert sorted(metadata["unet.target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]

    def test_sample_gives_images_in_unit_range(self, adapter):
        prompts = ["a photo of a cat", "a red dog"]
        images = adapter.sample(prompts, generator=torch.Generator().manual_seed(0), num_inference_steps=2)
        assert images.shape == (2, 3, TINY_SIZE, TINY_SIZE)
        assert images.min() >= 0 and images.max() <= 1
        again = adapter.sample(prompts, generator=torch.Generator().manual_seed(0), num_inference_steps=2)
        assert torch.equal(images, again)

    def test_trainer_passes_the_recorded_sizes(self, tiny_sdxl_dir, tmp_path):
        """Non-square pictures: the trainer's encode call receives each pair's original size and crop."""
        from sipo.train import train

        Image.new("RGB", (65, 48), (200, 30, 30)).save(tmp_path / "a.png")
        Image.new("RGB", (65, 48), (30, 30, 200)).save(tmp_path / "b.png")  # another picture: identical pairs are skipped
        manifest = tmp_path / "pairs.jsonl"
        manifest.write_text(json.dumps({"prompt": "a red cat", "chosen": "a.png", "rejected": "b.png"}) + "\n")
        adapter = load_adapter("sdxl", str(tiny_sdxl_dir))
        seen = []
        encode = adapter.encode

        def recording_encode(*args, **kwargs):
            seen.append(kwargs.get("size_info"))
            return encode(*args, **kwargs)

        adapter.encode = recording_encode
        config = load_config(None, tiny_overrides(tiny_sdxl_dir, manifest, tmp_path / "run", **{
            **FAMILY_OVERRIDES, "train.max_steps": 1, "train.batch_size": 1, "objective.name": "dpo"}))
        train(config, progress=False, adapter=adapter)
        # 48x65 -> shorter side 32: 32x43, centre crop left = round(11/2) = 6, top 0
        assert torch.equal(seen[0], torch.tensor([[48, 65, 0, 6]]))


# ---------------------------------------------------------------------- size_info in the datasets
def _png(width: int, height: int, orientation: int | None = None, color=(10, 120, 200)) -> bytes:
    image = Image.new("RGB", (width, height), color)
    buffer = io.BytesIO()
    if orientation is None:
        image.save(buffer, format="PNG")
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def test_size_info_by_hand():
    # 48 high x 65 wide at 32: resized to 32 x floor(32*65/48) = 32 x 43; left = round(5.5) = 6
    assert size_info((48, 65), 32).tolist() == [48, 65, 0, 6]
    # flipped: the crop's mirror image starts at 43 - 6 - 32 = 5
    assert size_info((48, 65), 32, flipped=True).tolist() == [48, 65, 0, 5]
    # 100 high x 40 wide: 80 x 32, top = round(24) = 24
    assert size_info((100, 40), 32).tolist() == [100, 40, 24, 0]


def test_original_size_follows_exif_rotation():
    assert original_size(_png(65, 48)) == (48, 65)
    assert original_size(_png(65, 48, orientation=6)) == (65, 48)  # rotated 90 degrees on display
    assert original_size(b"not an image") is None


def test_jsonl_and_pickapic_items_carry_size_info(tmp_path):
    (tmp_path / "wide.png").write_bytes(_png(65, 48))
    (tmp_path / "square.png").write_bytes(_png(40, 40, color=(200, 30, 30)))  # another picture: identical pairs are skipped
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text(json.dumps({"prompt": "p", "chosen": "wide.png", "rejected": "square.png"}) + "\n")
    item = open_preference_dataset(DataConfig(format="jsonl", path=str(manifest)), 32)[0]
    assert item["size_info"].tolist() == [48, 65, 0, 6]  # the chosen picture's

    table = pa.table({
        "caption": pa.array(["a", "b"]), "jpg_0": pa.array([_png(65, 48), _png(40, 40)], pa.binary()),
        "jpg_1": pa.array([_png(40, 40, color=(200, 30, 30)), _png(100, 40, color=(200, 30, 30))], pa.binary()),
        "label_0": pa.array([1.0, 0.0]),
    })
    pq.write_table(table, tmp_path / "train-0.parquet")
    dataset = open_preference_dataset(DataConfig(format="pickapic", path=str(tmp_path / "train-0.parquet")), 32)
    assert dataset[0]["size_info"].tolist() == [48, 65, 0, 6]
    assert dataset[1]["size_info"].tolist() == [40, 100, 0, 24]  # jpg_1 won: its size; 40 high x 100 wide
    batch = collate_pairs([dataset[0], dataset[1]])
    assert batch["size_info"].tolist() == [[48, 65, 0, 6], [40, 100, 0, 24]]


def test_collate_leaves_size_info_out_unless_every_pair_has_it():
    picture = torch.zeros(3, 8, 8)
    with_size = {"prompt": "a", "chosen": picture, "rejected": picture, "index": 0, "size_info": torch.tensor([8, 8, 0, 0])}
    without = {"prompt": "b", "chosen": picture, "rejected": picture, "index": 1}
    assert "size_info" not in collate_pairs([with_size, without])
    assert collate_pairs([with_size]).get("size_info").shape == (1, 4)


# ---------------------------------------------------------------------- full size and configs
def test_full_configs_have_sdxl_base_parameter_counts():
    """Built on the meta device (no memory). Reference counts: the published SDXL base 1.0
    components as loaded by diffusers/transformers (UNet 2,567,463,684; VAE 83,653,863;
    CLIP ViT-L text 123,060,480; OpenCLIP bigG text with projection 694,659,840)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = sdxl_component_configs("full")
    with init_empty_weights():
        models = {
            "unet": UNet2DConditionModel(**configs["unet"]),
            "vae": AutoencoderKL(**configs["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])),
        }
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}


def test_unknown_scale_is_refused():
    with pytest.raises(ValueError, match="tiny' or 'full"):
        sdxl_component_configs("huge")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("sdxl_*.yaml")), ids=lambda p: p.name)
def test_shipped_sdxl_configs_load(path):
    config = load_config(path)
    assert config.model.family == "sdxl" and config.model.resolution == 1024
    assert config.train.gradient_checkpointing
