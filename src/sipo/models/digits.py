"""The demo's family: a tiny class-conditional pixel-space DDPM on scikit-learn's 8x8 digits.

A ``SipoDigitsPipeline`` directory (written by :meth:`DigitsAdapter.save_pretrained`, which the
demo's pretraining calls) holds::

    model_index.json            {"_class_name": "SipoDigitsPipeline", ...}
    unet/                       diffusers UNet2DModel (num_class_embeds=10), safetensors
    scheduler/                  DDPMScheduler: epsilon-prediction, T = 1000, linear betas

Prompts are ``"a handwritten digit N"`` and become class labels ``N``; images ``[B, 3, H, W]``
in ``[-1, 1]`` become grey ``x0`` ``[B, 1, H, W]`` (the mean of the channels: the data loader
turns a grey PNG into three equal channels). There is no VAE and no text encoder, so the
adapter has no frozen modules. The schedule is the scheduler's ``alphas_cumprod`` in the VP view
of ``sipo.schedules``. No diffusers pipeline class exists for this family, so LoRA weights are
written as one safetensors file with their ``LoraConfig`` in its metadata and read back by
:meth:`DigitsAdapter.load_lora`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sipo.errors import SipoError
from sipo.models.base import Conditioning, DiffusionAdapter, check_lora_state_dict
from sipo.schedules import vp_schedule

PIPELINE_CLASS_NAME = "SipoDigitsPipeline"
NUM_CLASSES = 10
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"
PROMPT_PATTERN = re.compile(r"^\s*a handwritten digit ([0-9])\s*$", re.IGNORECASE)


def digit_prompt(label: int) -> str:
    """The prompt of class ``label``: ``"a handwritten digit N"``."""
    return f"a handwritten digit {int(label)}"


def parse_digit_prompt(prompt: str) -> int:
    """``"a handwritten digit N"`` -> ``N``; anything else stops with the expected form."""
    match = PROMPT_PATTERN.match(prompt) if isinstance(prompt, str) else None
    if match is None:
        raise SipoError(
            f"prompt {prompt!r} is not a digits prompt; the digits family understands exactly "
            "'a handwritten digit N' with N in 0-9: fix the prompt field of the data"
        )
    return int(match.group(1))


def build_digits_unet(
    resolution: int = 8,
    block_out_channels: tuple[int, ...] = (32, 64),
    attention: bool = True,
    layers_per_block: int = 1,
):
    """A fresh (random) class-conditional ``UNet2DModel`` for grey ``resolution``-pixel images.

    Two resolution levels; with ``attention`` the lowest level of the encoder and decoder carries a
    self-attention block (the LoRA targets of :class:`DigitsAdapter`).
    """
    from diffusers import UNet2DModel

    levels = len(block_out_channels)
    last = "Attn" if attention else ""
    return UNet2DModel(
        sample_size=resolution,
        in_channels=1,
        out_channels=1,
        layers_per_block=layers_per_block,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownBlock2D",) * (levels - 1) + (f"{last}DownBlock2D",),
        up_block_types=(f"{last}UpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        num_class_embeds=NUM_CLASSES,
        norm_num_groups=8,
        attention_head_dim=8,
    )


def build_digits_scheduler():
    """DDPM's own schedule: T = 1000, linear betas 1e-4 -> 0.02, epsilon-prediction, x0 clipped to [-1, 1]."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=True,
        clip_sample_range=1.0,
    )


class DigitsAdapter(DiffusionAdapter):
    """The digits UNet behind the adapter protocol; pixel space, epsilon-prediction, class labels."""

    family = "digits"
    default_num_inference_steps = 25  # DDIM on 16 px digits
    default_guidance_scale = 1.0  # no classifier-free guidance: the class label conditions every step
    pipeline_class_names = (PIPELINE_CLASS_NAME,)
    # Attention projections plus the ResNet convolutions: the tiny UNet has one attention block per
    # side, so LoRA on attention alone would leave most of the network out of reach.
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
    components = {"unet": "UNet2DModel", "scheduler": "DDPMScheduler config"}
    directory_hint = "a digits model written by `sipo demo` (its base/ folder)"

    def __init__(self, unet: nn.Module, scheduler, num_inference_steps: int = 50):
        self.denoiser: nn.Module = unet
        self.scheduler = scheduler
        if scheduler.config.prediction_type != "epsilon":
            raise SipoError(
                f"the scheduler's prediction_type is {scheduler.config.prediction_type!r}; the digits "
                "family is epsilon-prediction only: rebuild the model with `sipo demo`"
            )
        self.schedule = vp_schedule(scheduler.alphas_cumprod, "epsilon", num_inference_steps)

    @property
    def unet(self) -> nn.Module:
        return self.denoiser

    @property
    def resolution(self) -> int:
        return int(self.denoiser.config.sample_size)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        num_inference_steps: int = 50,
        trust_remote_code: bool = False,
        **ignored: Any,
    ) -> "DigitsAdapter":
        """Load a ``SipoDigitsPipeline`` directory (local only: the demo writes it; nothing is downloaded)."""
        from diffusers import DDPMScheduler, UNet2DModel

        path = cls.check_pipeline_directory(path)
        try:
            unet = UNet2DModel.from_pretrained(str(path), subfolder="unet")
            scheduler = DDPMScheduler.from_pretrained(str(path), subfolder="scheduler")
        except OSError as error:
            raise SipoError(f"could not load the digits model from {path}: {error}") from error
        return cls(unet, scheduler, num_inference_steps)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the pipeline directory :meth:`from_pretrained` reads (safetensors only)."""
        import diffusers

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.denoiser.save_pretrained(path / "unet", safe_serialization=True)
        self.scheduler.save_pretrained(path / "scheduler")
        index = {
            "_class_name": PIPELINE_CLASS_NAME,
            "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DModel"],
            "scheduler": ["diffusers", "DDPMScheduler"],
        }
        (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        return path

    def save_lora(self, output_dir: str | Path, lora_state_dict: dict[str, Tensor]) -> None:
        """Write ``pytorch_lora_weights.safetensors``: peft's LoRA tensors and their ``LoraConfig``.

        ``lora_state_dict`` is ``peft.utils.get_peft_model_state_dict(unet)``; the config (rank,
        ``lora_alpha``, targets) goes into the file's metadata so :meth:`load_lora` restores the
        same scale.
        """
        from safetensors.torch import save_file

        check_lora_state_dict(lora_state_dict)
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        metadata = {LORA_METADATA_KEY: json.dumps(self.lora_config_dict() or {})}
        tensors = {key: value.detach().cpu().contiguous() for key, value in lora_state_dict.items()}
        save_file(tensors, str(output_dir / LORA_WEIGHT_NAME), metadata=metadata)

    def load_lora(self, directory: str | Path) -> None:
        """Inject LoRA layers as saved by :meth:`save_lora` and load their weights into the denoiser."""
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from safetensors import safe_open

        file = Path(directory) / LORA_WEIGHT_NAME
        if not file.is_file():
            raise SipoError(f"{directory} has no {LORA_WEIGHT_NAME}; pass the output_dir of a LoRA run")
        with safe_open(str(file), "pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get(LORA_METADATA_KEY, "{}"))
            state = {key: handle.get_tensor(key) for key in handle.keys()}
        if not metadata:
            raise SipoError(f"{file} carries no LoraConfig; save it with DigitsAdapter.save_lora")
        fields = {key: metadata[key] for key in ("r", "lora_alpha", "target_modules", "lora_dropout") if key in metadata}
        inject_adapter_in_model(LoraConfig(**fields), self.denoiser)
        result = set_peft_model_state_dict(self.denoiser, state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise SipoError(f"{file} holds LoRA weights this model lacks (e.g. {unexpected[0]}); use the base model it was trained on")

    # ------------------------------------------------------------------ encoding
    def labels(self, prompts: list[str]) -> Tensor:
        """Prompts -> class labels ``[B]`` (long)."""
        return torch.tensor([parse_digit_prompt(p) for p in prompts], dtype=torch.long)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` (or ``[B, 1, H, W]``) in ``[-1, 1]`` -> grey ``x0`` ``[B, 1, H, W]`` float32."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [B, 3, H, W] or [B, 1, H, W], got {tuple(images.shape)}")
        if images.shape[-2:] != (self.resolution, self.resolution):
            raise SipoError(
                f"images are {images.shape[-2]}x{images.shape[-1]} but the digits model is "
                f"{self.resolution}x{self.resolution}; set model.resolution={self.resolution}"
            )
        return images.float().mean(dim=1, keepdim=True).to(self.device)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Prompts -> ``{"class_labels": [N]}`` on the denoiser's device."""
        return {"class_labels": self.labels(prompts).to(self.device)}

    # ------------------------------------------------------------------ denoiser
    def predict(
        self, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning, denoiser: nn.Module | None = None
    ) -> Tensor:
        model = self.denoiser if denoiser is None else denoiser
        return model(x_t, timesteps, class_labels=conditioning["class_labels"]).sample

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> Tensor:
        """Pictures ``[B, 3, H, W]`` in ``[0, 1]`` for prompts "a handwritten digit N", as every family's
        ``sample`` gives them to eval, compare, pairs and validation: picture ``i``'s initial noise is
        drawn from ``generator[i]`` (a list: one per picture, as diffusers' pipelines take it), then
        :meth:`sample_labels`. The model has no classifier-free guidance: ``guidance_scale`` is 1 or None."""
        if guidance_scale is not None and float(guidance_scale) != 1.0:
            raise SipoError(f"the digits model samples without classifier-free guidance, so guidance {guidance_scale:g} "
                            "cannot apply; leave --guidance-scale out (or pass 1)")
        labels = self.labels(list(prompts))
        shape = (1, 1, self.resolution, self.resolution)
        generators = generator if isinstance(generator, (list, tuple)) else [generator] * len(labels)
        noise = torch.cat([torch.randn(shape, generator=g) for g in generators])
        grey = self.sample_labels(labels, noise=noise, num_inference_steps=num_inference_steps or self.default_num_inference_steps)
        return ((grey + 1) / 2).expand(-1, 3, -1, -1).contiguous()

    @torch.no_grad()
    def sample_labels(
        self,
        labels: Tensor | list[int],
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        num_inference_steps: int = 25,
        denoiser: nn.Module | None = None,
        batch_size: int = 512,
    ) -> Tensor:
        """Grey images ``[B, 1, H, W]`` in ``[-1, 1]`` by DDIM (eta = 0): a function of the noise.

        ``noise`` (``[B, 1, H, W]``) is the initial ``x_T``; without it, it is drawn from
        ``generator`` on the CPU. Same labels + same noise + same weights = the same images, which
        is what a win rate "on the same prompts and noise" needs.
        """
        from diffusers import DDIMScheduler

        labels = torch.as_tensor(labels, dtype=torch.long)
        shape = (labels.shape[0], 1, self.resolution, self.resolution)
        if noise is None:
            noise = torch.randn(shape, generator=generator)
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        model = self.denoiser if denoiser is None else denoiser
        was_training = model.training
        model.eval()
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps)
        outputs = []
        device = self.device
        for start in range(0, shape[0], batch_size):
            x = noise[start:start + batch_size].to(device)
            cond = {"class_labels": labels[start:start + batch_size].to(device)}
            for t in scheduler.timesteps:
                eps = self.predict(x, t.expand(x.shape[0]).to(device), cond, denoiser=model)
                x = scheduler.step(eps, t, x).prev_sample
            outputs.append(x.clamp(-1, 1).cpu())
        model.train(was_training)
        return torch.cat(outputs)
