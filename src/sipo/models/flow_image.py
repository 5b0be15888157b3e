"""Plumbing shared by the rectified-flow image families (FLUX, SD3.5); no math lives here.

Both load a transformer, an ``AutoencoderKL`` whose latents are ``(latent - shift_factor) *
scaling_factor``, CLIP text encoders plus a T5-XXL, and a ``FlowMatchEulerDiscreteScheduler``
from a local diffusers directory; both encode prompts through their own pipeline's
``encode_prompt`` (so the conditioning is what the pipeline feeds the transformer), write LoRA with
the pipeline's ``save_lora_weights`` and sample through the pipeline. The family modules add what
is their own: the transformer's inputs, the schedule and the random-weight builders.

T5-XXL (4.7B parameters, 19 GB in float32) need not reach the GPU: ``text_encoder_device="cpu"``
keeps every text encoder in host memory (prompts are encoded there and the embeddings moved), and
``sipo cache`` stores every embedding on disk so that no text encoder runs during training.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sipo.errors import SipoError
from sipo.models.base import (
    Conditioning,
    DiffusionAdapter,
    check_lora_state_dict,
    encode_in_chunks,
    read_model_index,
)
from sipo.models.video import TEXT_ENCODER_DEVICES, load_component  # closed dispatch on model_index.json class names


class FlowImageAdapter(DiffusionAdapter):
    """What FLUX and SD3.5 share: components by name, shifted/scaled VAE latents, prompts, saving, sampling."""

    #: the diffusers pipeline class (a name in ``diffusers``): prompts, sampling, LoRA files
    pipeline_class_name: ClassVar[str]
    #: subfolder -> default class (``(library, name)``) when model_index.json names none we accept
    component_classes: ClassVar[dict[str, tuple[str, str]]]
    #: the pipeline's prompt length for T5 (its ``__call__``'s ``max_sequence_length`` default)
    default_max_sequence_length: ClassVar[int] = 512
    #: images per VAE call: one at 1024 px, as for SDXL (a 16-channel VAE encoder peaks at GiBs per image)
    encode_chunk_size: int = 1

    def __init__(
        self, parts: dict[str, Any], *, num_inference_steps: int = 50, resolution: int | None = None,
        text_encoder_device: str = "auto",
    ) -> None:
        if text_encoder_device not in TEXT_ENCODER_DEVICES:
            raise SipoError(
                f"model.text_encoder_device={text_encoder_device!r} is not valid; choose one of {list(TEXT_ENCODER_DEVICES)}"
            )
        self.parts = parts
        self.denoiser: nn.Module = parts["transformer"]
        self.vae = parts["vae"]
        self.scheduler = parts["scheduler"]
        self.text_encoder_device = text_encoder_device
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = int(resolution or self.default_resolution())
        self._prompt_pipeline = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        num_inference_steps: int = 50,
        trust_remote_code: bool = False,
        resolution: int | None = None,
        text_encoder_device: str = "auto",
        **options: Any,
    ) -> "FlowImageAdapter":
        """Load a local directory of the family's pipeline; nothing executes code from it.

        ``resolution`` is the run's ``model.resolution`` (FLUX's inference grid depends on it);
        family options (``guidance``) go to the family's constructor.
        """
        path = cls.check_pipeline_directory(path)
        index = read_model_index(path)
        parts: dict[str, Any] = {}
        try:
            for subfolder, (library, class_name) in cls.component_classes.items():
                default = getattr(importlib.import_module(library), class_name)
                parts[subfolder] = load_component(path, subfolder, index, default)
        except OSError as error:  # missing or corrupt weight files
            raise SipoError(f"could not load the {cls.family} model from {path}: {error}") from error
        return cls(parts, num_inference_steps=num_inference_steps, resolution=resolution,
                   text_encoder_device=text_encoder_device, **cls.family_options(options))

    @classmethod
    def family_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of ``from_pretrained`` this family's constructor takes."""
        return {}

    def default_resolution(self) -> int:
        """The pipeline's own default size: the transformer's ``sample_size`` (or 128) latent pixels."""
        return int(self.denoiser.config.get("sample_size") or 128) * self.vae_scale_factor

    def text_encoders(self) -> list[nn.Module]:
        return [module for name, module in self.parts.items() if name.startswith("text_encoder") and module is not None]

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vae, *self.text_encoders()]

    def keep_fp32_modules(self) -> list[nn.Module]:
        """The VAE when its config says it overflows in fp16 (``force_upcast``)."""
        return [self.vae] if self.vae.config.get("force_upcast", True) else []

    def to(self, device: torch.device | str) -> "FlowImageAdapter":
        self.denoiser.to(device)
        self.vae.to(device)
        if self.text_encoder_device == "auto":
            for encoder in self.text_encoders():
                encoder.to(device)
        return self

    def pipeline(self, **overrides: Any):
        """The family's diffusers pipeline over this adapter's modules (no weight is copied)."""
        import diffusers

        pipe = getattr(diffusers, self.pipeline_class_name)(**{**self.parts, "transformer": self.denoiser, **overrides})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ------------------------------------------------------------------ encoding
    @property
    def max_sequence_length(self) -> int:
        """T5 tokens per prompt: the pipeline's default, or fewer where the tokenizer is shorter (tiny models)."""
        tokenizer = self.parts.get(self.t5_tokenizer_name)
        limit = int(getattr(tokenizer, "model_max_length", self.default_max_sequence_length) or self.default_max_sequence_length)
        return min(self.default_max_sequence_length, limit)

    #: which tokenizer feeds T5 (FLUX: tokenizer_2, SD3: tokenizer_3)
    t5_tokenizer_name: ClassVar[str] = "tokenizer_2"

    @property
    def spatial_multiple(self) -> int:
        """Picture sides must divide by the VAE's factor times the transformer's 2x2 patches."""
        return self.vae_scale_factor * 2

    @torch.no_grad()
    def encode_images(self, pictures: Tensor) -> Tensor:
        """``[N, 3, H, W]`` in ``[-1, 1]`` -> ``(mode - shift_factor) * scaling_factor`` ``[N, C, H/f, W/f]`` (float32).

        The posterior mean, not a sample (as the other families: cacheable, reproducible), shifted
        and scaled as diffusers' train_dreambooth_lora_flux.py / _sd3.py do before noising.
        """
        if pictures.ndim != 4 or pictures.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got {tuple(pictures.shape)}")
        height, width = pictures.shape[-2:]
        if height % self.spatial_multiple or width % self.spatial_multiple:
            raise SipoError(
                f"{self.family} needs picture sides divisible by {self.spatial_multiple}, got {height}x{width}; "
                f"set model.resolution to a multiple of {self.spatial_multiple} (e.g. 1024)"
            )
        param = next(self.vae.parameters())

        def encode_chunk(part: Tensor) -> Tensor:
            latents = self.vae.encode(part.to(device=param.device, dtype=param.dtype)).latent_dist.mode().float()
            return self.normalize_latents(latents)

        return encode_in_chunks(encode_chunk, pictures, self.encode_chunk_size)

    def normalize_latents(self, latents: Tensor) -> Tensor:
        """The VAE's posterior mean -> the model's ``x0``: ``(latent - shift_factor) * scaling_factor``
        (FLUX.2 overrides it with its patchify and batch-norm statistics)."""
        shift = float(self.vae.config.get("shift_factor") or 0.0)
        return (latents - shift) * float(self.vae.config.scaling_factor)

    def text_device(self) -> torch.device:
        return next(self.text_encoders()[0].parameters()).device

    # ------------------------------------------------------------------ denoiser
    def model_timesteps(self, timesteps: Tensor) -> Tensor:
        """Training index ``t`` -> what the transformer is given (family-specific scale of sigma)."""
        raise NotImplementedError

    def sigmas(self, timesteps: Tensor) -> Tensor:
        """``sigma_t`` (= ``b_t``) as float32 on ``timesteps``' device."""
        return self.schedule.b[timesteps.long().cpu()].float().to(timesteps.device)

    # ------------------------------------------------------------------ saving
    def save_lora(self, output_dir: str | Path, lora_state_dict: dict[str, Tensor]) -> None:
        """``pytorch_lora_weights.safetensors`` for the family pipeline's ``load_lora_weights``.

        peft's key names, as diffusers' own flux/sd3 LoRA scripts save them; the ``LoraConfig``
        (rank, alpha) in the file's metadata so the loader restores the trained scale.
        """
        import diffusers

        check_lora_state_dict(lora_state_dict)
        getattr(diffusers, self.pipeline_class_name).save_lora_weights(
            save_directory=str(output_dir),
            transformer_lora_layers=lora_state_dict,
            transformer_lora_adapter_metadata=self.lora_config_dict(),
            safe_serialization=True,
        )

    def save_full(self, output_dir: str | Path) -> None:
        """The fine-tuned transformer in diffusers format, where the pipeline looks for it."""
        self.denoiser.save_pretrained(Path(output_dir) / "transformer", safe_serialization=True)

    # ------------------------------------------------------------------ random-weight builders
    @classmethod
    def save_random_pipeline(cls, directory: str | Path, parts: dict[str, Any], torch_dtype: torch.dtype,
                             pipeline_class_name: str | None = None) -> Path:
        """Save ``parts`` as the family's pipeline (``torch_dtype`` for every module but the VAE);
        ``pipeline_class_name`` where the family has several (FLUX.2 [klein] and [dev])."""
        import diffusers

        if torch_dtype != torch.float32:
            for name, part in parts.items():
                if isinstance(part, nn.Module) and name != "vae":
                    part.to(torch_dtype)
        pipeline = getattr(diffusers, pipeline_class_name or cls.pipeline_class_name)(**parts)
        pipeline.save_pretrained(str(directory), safe_serialization=True)
        return Path(directory)
