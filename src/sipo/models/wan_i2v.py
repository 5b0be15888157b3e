"""Wan2.2 image-to-video (``WanImageToVideoPipeline``): I2V-A14B's two experts, and TI2V-5B's image-to-video mode.

Conventions followed: diffusers/pipelines/wan/pipeline_wan_i2v.py (``prepare_latents`` and the denoising loop of
``__call__``: how the first frame reaches the transformer), and for what it shares with text-to-video the
`WanAdapter` this class extends (UMT5 states, normalised Wan VAE latents, the flow schedule with the checkpoint's
shift, ``timestep = sigma * T``, A14B's experts split at ``boundary_ratio``, one LoRA file per expert). diffusers
has no Wan LoRA training script; the targets and files are the ones its ``WanLoraLoaderMixin`` loads.

Two published layouts, told apart by the checkpoint's own files:

- Wan2.2-I2V-A14B (a ``WanImageToVideoPipeline`` directory, ``boundary_ratio`` 0.9, shift 5.0): the transformer
  takes 36 channels, the noisy latents (16), then a 4-channel mask (1 on the first latent frame, 0 after:
  the pipeline's ``mask_lat_size``) and the latents of the conditioning clip (16): the input image as frame 0 and
  zeros for the other ``F - 1`` frames, through the VAE, normalised (``latent_condition``). Concatenated on
  channels; every latent frame is noised and predicted, so ``x0`` is the whole clip's latents, and the input's
  latents are conditioning only (``image_condition``). No image encoder: Wan2.2's transformer has ``image_dim``
  None (only Wan2.1-I2V's CLIP tower used one, which this family refuses).
- Wan2.2-TI2V-5B (a ``WanPipeline`` directory with ``expand_timesteps``; ``WanImageToVideoPipeline.from_pretrained``
  loads it for image-to-video): the first latent frame IS the input image's latents (``first_frame_mask``: frame
  0 of the transformer's input is the condition, the rest the noisy latents) with timestep 0 on its tokens and
  ``t`` on the others. That frame is clean, so it is conditioning (``first_frame``, ``[B, 48, 1, h, w]``) and
  ``x0`` is the clip's latents from the second latent frame on: the loss never sees the input. `predict`
  prepends the condition frame and returns the prediction of the noisy frames.

The input image is decoded at the clip's frame size (``data.height x data.width``), as the pipeline resizes it to
``height x width`` before ``prepare_latents``. SIPO's ``s`` is the next sigma of the checkpoint's inference grid
with its shift (`WanAdapter`), at ``model.num_inference_steps`` (I2V-A14B's own sampler: 40 steps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sipo.errors import SipoError
from sipo.models.base import Conditioning, read_model_index
from sipo.models.wan import (
    FULL_A14B_TRANSFORMER_CONFIG,
    FULL_SCHEDULER_CONFIG,
    TINY_TRANSFORMER_CONFIG,
    TINY_VAE_CONFIG,
    WanAdapter,
)

#: Wan-AI/Wan2.2-I2V-A14B-Diffusers transformer/ and transformer_2/config.json: the A14B expert taking 36 channels
FULL_I2V_A14B_TRANSFORMER_CONFIG: dict[str, Any] = dict(FULL_A14B_TRANSFORMER_CONFIG, in_channels=36)
TINY_I2V_TRANSFORMER_CONFIG: dict[str, Any] = dict(TINY_TRANSFORMER_CONFIG, in_channels=36)
#: Wan2.2-I2V-A14B's inference settings (the Wan2.2 repository's wan_i2v_A14B config): shift 5, boundary 0.9
I2V_A14B_FLOW_SHIFT, I2V_A14B_BOUNDARY_RATIO = 5.0, 0.9
#: channels of the mask the I2V transformer reads between the noisy and the condition latents
MASK_CHANNELS = 4


class WanI2VAdapter(WanAdapter):
    """Wan2.2 image-to-video: the transformer (or both experts) trains; VAE and UMT5 stay frozen."""

    family = "wan_i2v"
    pipeline_class_names = ("WanImageToVideoPipeline", "WanPipeline")
    pipeline_class_name = "WanImageToVideoPipeline"
    needs_input_image = True
    directory_hint = ("a Wan2.2-I2V-A14B WanImageToVideoPipeline directory or a Wan2.2-TI2V-5B directory "
                      "(pipe.save_pretrained(dir) writes one)")

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, **options: Any):
        if transformer.config.get("image_dim") is not None:
            raise SipoError("this image-to-video transformer reads CLIP image states (Wan2.1-I2V), which the wan_i2v "
                            "family does not compute; use Wan2.2-I2V-A14B or Wan2.2-TI2V-5B")
        super().__init__(transformer, vae, text_encoder, tokenizer, scheduler, **options)
        in_channels, z_dim = int(transformer.config.in_channels), int(vae.config.z_dim)
        if not self.expand_timesteps and in_channels != 2 * z_dim + MASK_CHANNELS:
            raise SipoError(f"the transformer takes {in_channels} channels, not the {2 * z_dim + MASK_CHANNELS} of an "
                            "image-to-video model (noise, mask, first frame); point model.pretrained_path at "
                            "Wan2.2-I2V-A14B or Wan2.2-TI2V-5B, or set model.family=wan for text-to-video")

    @classmethod
    def check_family(cls, path: str | Path) -> None:
        """A ``WanImageToVideoPipeline``, or a ``WanPipeline`` with ``expand_timesteps`` (TI2V-5B, whose one
        transformer does text- and image-to-video); a text-to-video-only ``WanPipeline`` stops here."""
        super().check_family(path)
        index = read_model_index(path)
        if index.get("_class_name") == "WanPipeline" and not index.get("expand_timesteps"):
            raise SipoError(f"{path} holds a text-to-video WanPipeline (no expand_timesteps: Wan2.1 or Wan2.2-T2V), "
                            "not an image-to-video model; set model.family=wan, or point model.pretrained_path at "
                            "Wan2.2-I2V-A14B or Wan2.2-TI2V-5B")

    # ------------------------------------------------------------------ encoding
    def _encode_prompts_uncached(self, prompts: list[str]) -> Tensor:
        """UMT5 states through ``WanPipeline.encode_prompt``: the same text path as the image-to-video pipeline's,
        which in diffusers 0.42.1 calls ftfy unguarded (a NameError where ftfy is not installed)."""
        if self._prompt_pipeline is None:
            import diffusers

            self._prompt_pipeline = diffusers.WanPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder,
                                                          vae=self.vae, scheduler=self.scheduler)
        return super()._encode_prompts_uncached(prompts)

    def encode_clip(self, clip: Tensor) -> Tensor:
        """``x0`` of one clip: its normalised latents; TI2V-5B without the first latent frame (the input's, clean)."""
        latents = super().encode_clip(clip)
        return latents[:, :, 1:] if self.expand_timesteps else latents

    def _encode_normalised(self, video: Tensor) -> Tensor:
        """``[N, 3, F, H, W]`` in ``[-1, 1]`` -> normalised VAE posterior modes, one clip per pass."""
        param = next(self.vae.parameters())
        latents = []
        for clip in video:
            posterior = self.vae.encode(clip[None].to(device=param.device, dtype=param.dtype)).latent_dist
            latents.append(posterior.mode().float())
        latents = torch.cat(latents)
        mean, std = self._latents_mean.to(latents.device), self._latents_std.to(latents.device)
        return (latents - mean) / std

    @torch.no_grad()
    def encode_inputs(self, prompts: list[str], input_images: Tensor, num_frames: int | None = None) -> Conditioning:
        """Prompts -> UMT5 states, input images ``[N, 3, H, W]`` -> ``first_frame`` ``[N, 48, 1, h, w]`` (TI2V-5B)
        or ``image_condition`` ``[N, 16, F', h, w]`` (I2V-A14B: the image then ``num_frames - 1`` black frames,
        as the pipeline's ``video_condition``), on the denoiser's device."""
        if input_images.ndim != 4 or input_images.shape[0] != len(prompts):
            raise ValueError(f"expected one input image [N, 3, H, W] per prompt, got {tuple(input_images.shape)}")
        conditioning = self.encode_prompts(prompts)
        frames = input_images[:, :, None]
        if self.expand_timesteps:
            conditioning["first_frame"] = self._encode_normalised(frames).to(self.device)
            return conditioning
        if num_frames is None:
            raise ValueError("the I2V-A14B condition clip needs num_frames")
        clip = torch.cat([frames, frames.new_zeros(*frames.shape[:2], num_frames - 1, *frames.shape[3:])], dim=2)
        conditioning["image_condition"] = self._encode_normalised(clip).to(self.device)
        return conditioning

    # ------------------------------------------------------------------ denoiser
    def predict(
        self, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning, denoiser: nn.Module | None = None
    ) -> Tensor:
        """Flow velocity ``u_hat`` of the noisy latents, called as ``WanImageToVideoPipeline`` calls the transformer.

        I2V-A14B: ``[x_t, mask, image_condition]`` on channels, one timestep per sample (`WanExperts` routes).
        TI2V-5B: ``[first_frame, x_t]`` on frames, timestep 0 on the first frame's tokens and ``t`` on the
        others; the prediction of the frames after the first is returned (``x_t``'s shape).
        """
        model = self.denoiser if denoiser is None else denoiser
        timestep = self.model_timesteps(timesteps)
        states = conditioning["encoder_hidden_states"]
        if self.expand_timesteps:
            first = conditioning["first_frame"].to(x_t.dtype)
            hidden = torch.cat([first, x_t], dim=2)
            frames, height, width = (size // patch for size, patch in zip(hidden.shape[2:], self.patch_size))
            per_token = timestep[:, None, None].expand(-1, frames, height * width).clone()
            per_token[:, 0] = 0  # the clean first frame (the pipeline's first_frame_mask times t)
            output = model(hidden_states=hidden, timestep=per_token.flatten(1), encoder_hidden_states=states,
                           return_dict=False)[0]
            return output[:, :, 1:]
        condition = conditioning["image_condition"].to(x_t.dtype)
        mask = torch.zeros(x_t.shape[0], MASK_CHANNELS, *x_t.shape[2:], dtype=x_t.dtype, device=x_t.device)
        mask[:, :, 0] = 1
        return model(hidden_states=torch.cat([x_t, mask, condition], dim=1), timestep=timestep,
                     encoder_hidden_states=states, return_dict=False)[0]

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        negative_prompt: str = "",
        input_images: Tensor | None = None,
        **pipeline_options: Any,
    ) -> Tensor:
        """Videos ``[B, F, 3, H, W]`` in ``[0, 1]`` through ``WanImageToVideoPipeline``, one call per prompt (its
        ``image`` conditions a whole batch) with its first frame ``input_images[i]`` (``[-1, 1]``)."""
        from sipo.models.qwenimage_edit import to_pil

        self.check_input_images(input_images)
        generators = generator if isinstance(generator, list) else [generator] * len(prompts)
        dtype = next(self.denoiser.parameters()).dtype
        negative = self.encode_prompts([negative_prompt])["encoder_hidden_states"]
        pipe = self.pipeline()
        videos = []
        for prompt, picture, one_generator in zip(prompts, input_images, generators):
            positive = self.encode_prompts([prompt])["encoder_hidden_states"]
            videos.append(pipe(
                image=to_pil(picture), prompt_embeds=positive.to(dtype), negative_prompt_embeds=negative.to(dtype),
                num_frames=num_frames or self.default_num_frames, height=height or int(picture.shape[-2]),
                width=width or int(picture.shape[-1]), num_inference_steps=num_inference_steps or self.default_num_inference_steps,
                guidance_scale=self.default_guidance_scale if guidance_scale is None else guidance_scale,
                generator=one_generator, output_type="pt", max_sequence_length=self.max_sequence_length,
                **pipeline_options,
            ).frames)
        return torch.cat(videos).float().clamp(0, 1)

    # ------------------------------------------------------------------ random-weight builder
    @classmethod
    def build_random_pipeline(
        cls,
        directory: str | Path,
        scale: str = "tiny",
        seed: int = 0,
        torch_dtype: torch.dtype = torch.float32,
        with_text_encoder: bool = True,
        variant: str = "2.2-i2v-a14b",
    ) -> Path:
        """Save a random-weight image-to-video directory; ``scale="full"`` is the published configs of ``variant``.

        ``2.2-i2v-a14b``: a ``WanImageToVideoPipeline`` with two 36-channel experts, ``boundary_ratio`` 0.9 and
        shift 5; ``2.2-ti2v-5b``: Wan2.2-TI2V-5B's ``WanPipeline`` directory (`WanAdapter.build_random_pipeline`),
        which the image-to-video pipeline loads as published.
        """
        if variant == "2.2-ti2v-5b":
            return WanAdapter.build_random_pipeline(directory, scale=scale, seed=seed, torch_dtype=torch_dtype,
                                                    with_text_encoder=with_text_encoder, variant=variant)
        if variant != "2.2-i2v-a14b":
            raise ValueError(f"variant must be 2.2-i2v-a14b or 2.2-ti2v-5b, got {variant!r}")
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        from sipo.models.random_init import TINY_T5_ENCODER_CONFIG, tiny_t5_tokenizer
        from sipo.models.wan import FULL_UMT5_CONFIG, MAX_SEQUENCE_LENGTH

        if scale not in ("tiny", "full"):
            raise ValueError("scale must be tiny or full")
        torch.manual_seed(seed)
        tokenizer = tiny_t5_tokenizer(None, model_max_length=MAX_SEQUENCE_LENGTH)
        config = FULL_I2V_A14B_TRANSFORMER_CONFIG if scale == "full" else TINY_I2V_TRANSFORMER_CONFIG
        experts = [WanTransformer3DModel(**config) for _ in range(2)]
        vae = AutoencoderKLWan(**({} if scale == "full" else TINY_VAE_CONFIG))
        text_config = UMT5Config(**FULL_UMT5_CONFIG) if scale == "full" else UMT5Config(
            vocab_size=len(tokenizer), **TINY_T5_ENCODER_CONFIG)
        parts = dict(tokenizer=tokenizer, text_encoder=UMT5EncoderModel(text_config) if with_text_encoder else None,
                     vae=vae, transformer=experts[0], transformer_2=experts[1],
                     scheduler=UniPCMultistepScheduler(**dict(FULL_SCHEDULER_CONFIG, flow_shift=I2V_A14B_FLOW_SHIFT)),
                     boundary_ratio=I2V_A14B_BOUNDARY_RATIO)
        return cls.save_random_pipeline(directory, parts, torch_dtype, cast=("transformer", "transformer_2", "text_encoder"))
