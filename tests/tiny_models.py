"""Tiny random-weight pipelines built from configs, saved the way users' models are saved.

Nothing here downloads: the CLIP tokenizer is built from a byte-level vocab.json + merges.txt
written on the spot, and every weight is drawn from a seeded generator. The shapes follow the
real families at toy scale (after diffusers' own ``get_dummy_components`` test helpers):

- SD1.5: 32-px RGB images -> 2-level VAE (downsample 2x) -> latents ``[4, 16, 16]``; a two-level
  UNet with cross-attention on 32-d CLIP text states of length 77; DDPMScheduler with SD1.5's
  ``scaled_linear`` betas (0.00085 -> 0.012 over 1000 steps).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from sipo.models.random_init import TINY_MAX_LENGTH, tiny_clip_tokenizer

#: image side (pixels) the tiny SD1.5 VAE is built for; latents are ``[4, 16, 16]``.
TINY_SD15_IMAGE_SIZE = 32
TINY_SD15_LATENT_SHAPE = (4, 16, 16)
#: width of the tiny CLIP text encoder (= the UNet's cross_attention_dim).
TINY_TEXT_DIM = 32
#: SD1.5's scheduler config (runwayml/stable-diffusion-v1-5 scheduler_config.json).
SD15_BETAS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

def make_tiny_sd15(directory: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save a tiny SD1.5-shaped ``StableDiffusionPipeline`` (random weights) to ``directory``.

    ``prediction_type`` is ``epsilon`` (SD1.5) or ``v_prediction`` (SD2.x-style); it lands in
    ``scheduler/scheduler_config.json``, where the adapter reads it.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    directory = Path(directory)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_SD15_LATENT_SHAPE[1],
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        sample_size=TINY_SD15_IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
    )
    with tempfile.TemporaryDirectory() as vocab_dir:
        tokenizer = tiny_clip_tokenizer(vocab_dir)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TINY_TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TINY_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # clip_sample False and steps_offset 1 as in SD1.5's own scheduler config
    scheduler = DDPMScheduler(**SD15_BETAS, prediction_type=prediction_type, clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def make_other_family_dir(directory: str | Path, seed: int = 0) -> Path:
    """Save a tiny unconditional ``DDPMPipeline``: a valid diffusers directory of another family."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(directory, safe_serialization=True)
    return Path(directory)


def make_image_pairs(batch_size: int = 2, size: int = TINY_SD15_IMAGE_SIZE, seed: int = 0):
    """``(prompts, winners, losers)``: RGB images ``[B, 3, size, size]`` in ``[-1, 1]``."""
    generator = torch.Generator().manual_seed(seed)
    winners = torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1
    losers = torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1
    prompts = ["a photo of a cat", "a red dog on the painting", "a blue digit", "the cat in red"]
    return [prompts[i % len(prompts)] for i in range(batch_size)], winners, losers
