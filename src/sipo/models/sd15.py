"""Stable Diffusion 1.x/2.x (``StableDiffusionPipeline``): VAE latents, CLIP text states, a UNet.

``x0`` is the VAE latent times ``vae.config.scaling_factor``; conditioning is the CLIP text
encoder's last hidden state, exactly as ``StableDiffusionPipeline.encode_prompt`` computes it
(no clip skip). The noise schedule is the pipeline's own ``alphas_cumprod`` in the VP view of
``sipo.schedules``; ``epsilon`` (SD1.5) and ``v_prediction`` (SD2.x 768) are both supported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sipo.errors import SipoError
from sipo.models.base import (
    Conditioning,
    DiffusionAdapter,
    check_lora_state_dict,
    encode_in_chunks,
    epsilon_or_v_schedule,
)

#: sizes of ``SD15Adapter.build_random_pipeline``: "full" is runwayml/stable-diffusion-v1-5's configs
_RANDOM_SCALES: dict[str, dict[str, Any]] = {
    "full": dict(image_size=512, latent_size=64, unet_channels=(320, 640, 1280, 1280), vae_channels=(128, 256, 512, 512),
                 layers_per_block=2, attention_head_dim=8, norm_groups=32, text_dim=768, text_intermediate=3072,
                 text_layers=12, text_heads=12, vocab_size=49408),
    "tiny": dict(image_size=32, latent_size=16, unet_channels=(32, 64), vae_channels=(32, 64), layers_per_block=1,
                 attention_head_dim=4, norm_groups=8, text_dim=32, text_intermediate=64, text_layers=2,
                 text_heads=4, vocab_size=None),
}


class SD15Adapter(DiffusionAdapter):
    """SD1.5 behind the adapter protocol; the denoiser is the UNet, VAE and text encoder stay frozen."""

    family = "sd15"
    pipeline_class_names = ("StableDiffusionPipeline",)
    # The attention projections, as in diffusers' train_text_to_image_lora.py / Diffusion-DPO LoRA.
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    components = {
        "unet": "UNet2DConditionModel",
        "vae": "AutoencoderKL",
        "text_encoder": "CLIPTextModel",
        "tokenizer": "CLIPTokenizer",
        "scheduler": "scheduler config",
    }
    # An SDXL UNet is a UNet2DConditionModel too: these tell the two apart before it loads
    # (DiffusionAdapter.check_component_configs), as diffusers' UNet2DConditionModel.get_aug_embed does.
    component_config = {"unet": {"addition_embed_type": None}}
    text_width_check = ("unet", "cross_attention_dim", ("text_encoder",))

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, num_inference_steps: int = 50):
        self.denoiser: nn.Module = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.schedule = epsilon_or_v_schedule(self.family, scheduler, num_inference_steps)

    @property
    def unet(self) -> nn.Module:
        return self.denoiser

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        num_inference_steps: int = 50,
        trust_remote_code: bool = False,
        **ignored: Any,
    ) -> "SD15Adapter":
        """Load every component of a ``StableDiffusionPipeline`` directory (or hub id, where online).

        Weights: diffusers and transformers read ``*.safetensors`` when present and otherwise fall
        back to ``torch.load(weights_only=True)``; nothing executes code from the directory
        (``trust_remote_code`` is accepted for a uniform signature and never forwarded).
        """
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        source, _ = cls.locate_pipeline(path)
        try:
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
            # The training view of the schedule; any scheduler's config carries the same betas.
            scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
        except OSError as error:  # missing/corrupt weight files, or no network for a hub id
            raise SipoError(f"could not load the sd15 model from {source}: {error}") from error
        return cls(unet, vae, text_encoder, tokenizer, scheduler, num_inference_steps)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vae, self.text_encoder]

    # ------------------------------------------------------------------ random-weight builder
    @classmethod
    def build_random_pipeline(cls, directory: str | Path, scale: str = "tiny", seed: int = 0) -> Path:
        """Save a random-weight ``StableDiffusionPipeline`` to ``directory`` (nothing is downloaded).

        ``"full"``: the component configs of runwayml/stable-diffusion-v1-5, written out here (UNet
        859.5M, VAE 83.7M, CLIP text 123.1M parameters, 512 px); ``"tiny"``: the same architecture
        at toy size (32 px, latents 4x16x16), for tests and ``benchmarks/throughput.py --quick``.
        The tokenizer is the offline byte-level CLIP vocabulary of ``sipo.models.random_init``.
        """
        import tempfile

        from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from sipo.models.random_init import tiny_clip_tokenizer

        if scale not in _RANDOM_SCALES:
            raise ValueError(f"scale must be one of {sorted(_RANDOM_SCALES)}, got {scale!r}")
        sizes = _RANDOM_SCALES[scale]
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sizes["latent_size"], in_channels=4, out_channels=4,
            block_out_channels=sizes["unet_channels"], layers_per_block=sizes["layers_per_block"],
            down_block_types=("CrossAttnDownBlock2D",) * (len(sizes["unet_channels"]) - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(sizes["unet_channels"]) - 1),
            cross_attention_dim=sizes["text_dim"], attention_head_dim=sizes["attention_head_dim"],
            norm_num_groups=sizes["norm_groups"],
        )
        vae = AutoencoderKL(
            sample_size=sizes["image_size"], in_channels=3, out_channels=3, latent_channels=4,
            block_out_channels=sizes["vae_channels"], layers_per_block=sizes["layers_per_block"],
            down_block_types=("DownEncoderBlock2D",) * len(sizes["vae_channels"]),
            up_block_types=("UpDecoderBlock2D",) * len(sizes["vae_channels"]),
            norm_num_groups=sizes["norm_groups"], scaling_factor=0.18215,
        )
        with tempfile.TemporaryDirectory() as vocab_dir:
            tokenizer = tiny_clip_tokenizer(vocab_dir)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=sizes["vocab_size"] or len(tokenizer), hidden_size=sizes["text_dim"],
            intermediate_size=sizes["text_intermediate"], num_hidden_layers=sizes["text_layers"],
            num_attention_heads=sizes["text_heads"], max_position_embeddings=77, hidden_act="quick_gelu",
            projection_dim=sizes["text_dim"], bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))
        # SD1.5's scheduler_config.json (scaled_linear 0.00085 -> 0.012, epsilon, steps_offset 1)
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", prediction_type="epsilon",
                                  clip_sample=False, steps_offset=1)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(directory, safe_serialization=True)
        return Path(directory)

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in ``[-1, 1]`` -> scaled latents ``[B, 4, H/f, W/f]`` (float32), in chunks."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        return encode_in_chunks(self._encode_image_chunk, images, self.encode_chunk_size)

    def _encode_image_chunk(self, images: Tensor) -> Tensor:
        param = next(self.vae.parameters())
        posterior = self.vae.encode(images.to(device=param.device, dtype=param.dtype)).latent_dist
        # The posterior mean, not a sample: diffusers' DPO scripts call .sample(), but the VAE's
        # posterior std is tiny next to the diffusion noise, and the mean makes x0 a function of
        # the image, so cached latents, winner/loser and repeated runs are reproducible and the
        # caller stays the only source of randomness (STYLE 2).
        latents = posterior.mode() * self.vae.config.scaling_factor
        return latents.float()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Prompts -> ``{"encoder_hidden_states": [B, L, dim]}``, as StableDiffusionPipeline does."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = next(self.text_encoder.parameters()).device
        attention_mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            attention_mask = tokens.attention_mask.to(device)
        states = self.text_encoder(tokens.input_ids.to(device), attention_mask=attention_mask)[0]
        return {"encoder_hidden_states": states}

    # ------------------------------------------------------------------ denoiser
    def predict(
        self, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning, denoiser: nn.Module | None = None
    ) -> Tensor:
        model = self.denoiser if denoiser is None else denoiser
        return model(x_t, timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"]).sample

    # ------------------------------------------------------------------ saving
    def save_lora(self, output_dir: str | Path, lora_state_dict: dict[str, Tensor]) -> None:
        """Write ``pytorch_lora_weights.safetensors`` for ``StableDiffusionPipeline.load_lora_weights``.

        ``lora_state_dict`` is peft's ``get_peft_model_state_dict(unet)``. The keys are converted to
        diffusers' naming (``lora_A`` -> ``lora.down``), as diffusers' LoRA training examples do.
        The adapter's ``LoraConfig`` (rank, ``lora_alpha``, targets) is stored in the file's
        metadata: without it the loader assumes ``lora_alpha == r`` and a LoRA trained with another
        alpha would load with the wrong scale.
        """
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        check_lora_state_dict(lora_state_dict)
        StableDiffusionPipeline.save_lora_weights(
            save_directory=str(output_dir),
            unet_lora_layers=convert_state_dict_to_diffusers(lora_state_dict),
            unet_lora_adapter_metadata=self.lora_config_dict(),
            safe_serialization=True,
        )

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        generator: torch.Generator | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` from the current denoiser (DDIM, classifier-free guidance).

        ``height``/``width`` default to the UNet's ``sample_size`` times the VAE's downsampling factor.
        """
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.denoiser,
            scheduler=DDIMScheduler.from_config(self.scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        images = pipe(
            list(prompts),
            generator=generator,
            num_inference_steps=num_inference_steps or self.default_num_inference_steps,
            guidance_scale=self.default_guidance_scale if guidance_scale is None else guidance_scale,
            height=height,
            width=width,
            output_type="pt",
        ).images
        return images.float().clamp(0, 1)
