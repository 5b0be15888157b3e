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
from sipo.models.base import Conditioning, DiffusionAdapter, EncodedPairs, check_lora_state_dict
from sipo.schedules import vp_schedule

#: subfolder -> what it holds, for the "missing subfolder" error.
_COMPONENTS = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
    "tokenizer": "CLIPTokenizer",
    "scheduler": "scheduler config",
}


def _is_local(path: str | Path) -> bool:
    """A path we must find on disk (never sent to the hub): it exists, or it is written like a path."""
    text = str(path)
    return Path(text).exists() or text.startswith(("/", ".", "~")) or text.count("/") != 1


class SD15Adapter(DiffusionAdapter):
    """SD1.5 behind the adapter protocol; the denoiser is the UNet, VAE and text encoder stay frozen."""

    family = "sd15"
    pipeline_class_names = ("StableDiffusionPipeline",)
    # The attention projections, as in diffusers' train_text_to_image_lora.py / Diffusion-DPO LoRA.
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, num_inference_steps: int = 50):
        self.denoiser: nn.Module = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise SipoError(
                f"the scheduler's prediction_type is {prediction_type!r}; the sd15 family trains "
                "'epsilon' or 'v_prediction' models only: use a model with one of those"
            )
        self.schedule = vp_schedule(scheduler.alphas_cumprod, prediction_type, num_inference_steps)

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

        if _is_local(path):
            path = Path(path).expanduser()
            cls.check_family(path)
            for subfolder, holds in _COMPONENTS.items():
                if not (Path(path) / subfolder).is_dir():
                    raise SipoError(
                        f"{path} has no {subfolder}/ folder ({holds}); point model.pretrained_path at a "
                        "complete StableDiffusionPipeline directory (pipe.save_pretrained(dir) writes one)"
                    )
        else:
            cls._check_hub_family(str(path))
        source = str(path)
        try:
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
            # The training view of the schedule; any scheduler's config carries the same betas.
            scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
        except OSError as error:  # missing/corrupt weight files, or no network for a hub id
            raise SipoError(f"could not load the sd15 model from {path}: {error}") from error
        return cls(unet, vae, text_encoder, tokenizer, scheduler, num_inference_steps)

    @classmethod
    def _check_hub_family(cls, repo_id: str) -> None:
        from diffusers import DiffusionPipeline

        try:
            index = DiffusionPipeline.load_config(repo_id)
        except OSError as error:
            raise SipoError(
                f"{repo_id} is neither a local directory nor a reachable hub model ({error}); set "
                "model.pretrained_path to a local StableDiffusionPipeline directory"
            ) from error
        class_name = index.get("_class_name", "?")
        if class_name not in cls.pipeline_class_names:
            raise SipoError(
                f"{repo_id} holds a {class_name}, not a {cls.family} model "
                f"({' or '.join(cls.pipeline_class_names)}); set model.family to the matching family"
            )

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vae, self.text_encoder]

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in ``[-1, 1]`` -> scaled latents ``[B, 4, H/f, W/f]`` (float32)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
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

    def encode(self, prompts: list[str], winners: Tensor, losers: Tensor, size_info: Tensor | None = None) -> EncodedPairs:
        if len(prompts) != winners.shape[0] or winners.shape != losers.shape:
            raise ValueError(
                f"{len(prompts)} prompts, winners {tuple(winners.shape)}, losers {tuple(losers.shape)}: "
                "expected one prompt per pair and equal-shaped images"
            )
        # One VAE pass over winners and losers together.
        latents = self.encode_images(torch.cat([winners, losers], dim=0))
        x0_winner, x0_loser = latents.chunk(2, dim=0)
        return EncodedPairs(x0_winner=x0_winner, x0_loser=x0_loser, conditioning=self.encode_prompts(prompts))

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
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
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
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            output_type="pt",
        ).images
        return images.float().clamp(0, 1)
