"""The small protocol every model family implements.

An adapter knows how to load its family from a local diffusers directory, turn a batch of
preference pairs into clean model inputs ``x0`` (VAE latents, or pixels for the demo) plus
conditioning, and run the denoiser. It returns the raw prediction in the model's own target
space; the schedule (``sipo.schedules``) and the objectives (``sipo.objectives``) do all the math.
Adding a family is one file in this folder, one entry in ``FAMILIES`` and one YAML in configs/.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
from torch import Tensor, nn

from sipo.errors import SipoError
from sipo.schedules import GaussianSchedule

Conditioning = dict[str, Tensor]


@dataclass
class EncodedPairs:
    """A batch of preference pairs in model space: ``x0`` for winner and loser, shared conditioning."""

    x0_winner: Tensor
    x0_loser: Tensor
    conditioning: Conditioning


def concat_conditioning(first: Conditioning, second: Conditioning) -> Conditioning:
    """Stack two conditioning dicts along the batch so winner and loser share one forward pass."""
    return {key: torch.cat([first[key], second[key]], dim=0) for key in first}


def read_model_index(path: str | Path) -> dict[str, Any]:
    """The ``model_index.json`` of a diffusers pipeline directory, with a clear error if absent."""
    index = Path(path) / "model_index.json"
    if not Path(path).is_dir():
        raise SipoError(
            f"model directory {path} does not exist; set model.pretrained_path to a local diffusers "
            "pipeline directory (the one containing model_index.json)"
        )
    if not index.is_file():
        raise SipoError(
            f"{path} has no model_index.json; point model.pretrained_path at a diffusers pipeline "
            "directory saved with save_pretrained"
        )
    return json.loads(index.read_text())


class DiffusionAdapter(ABC):
    """One model family behind the interface the trainer, analysis and evaluation use."""

    family: ClassVar[str]
    #: ``_class_name`` values of ``model_index.json`` this family accepts.
    pipeline_class_names: ClassVar[tuple[str, ...]] = ()
    #: default LoRA target modules of the denoiser.
    lora_target_modules: ClassVar[tuple[str, ...]] = ()

    schedule: GaussianSchedule
    denoiser: nn.Module

    @classmethod
    def check_family(cls, path: str | Path) -> None:
        """Stop with one sentence when ``path`` holds another family's pipeline."""
        class_name = read_model_index(path).get("_class_name", "?")
        if class_name not in cls.pipeline_class_names:
            raise SipoError(
                f"{path} holds a {class_name}, not a {cls.family} model "
                f"({' or '.join(cls.pipeline_class_names)}); set model.family to the matching "
                "family or model.pretrained_path to a matching model"
            )

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str | Path, **options: Any) -> "DiffusionAdapter":
        """Load every component from a local diffusers directory (or a hub id where online)."""

    @abstractmethod
    def encode(self, prompts: list[str], winners: Tensor, losers: Tensor, size_info: Tensor | None = None) -> EncodedPairs:
        """Images/videos in ``[-1, 1]`` (``[B, C, H, W]`` or ``[B, F, C, H, W]``) -> ``x0`` + conditioning.

        ``size_info`` (``[B, 4]``: original height/width, crop top/left) is for families whose
        conditioning needs it (SDXL); others ignore it.

        Runs frozen encoders only, under ``no_grad``.
        """

    @abstractmethod
    def predict(
        self, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning, denoiser: nn.Module | None = None
    ) -> Tensor:
        """The denoiser's output at ``(x_t, t)`` in its own target space (eps, v or flow u).

        ``denoiser`` defaults to ``self.denoiser``; the trainer passes a frozen copy for the
        reference model of a full fine-tune.
        """

    @abstractmethod
    def save_lora(self, output_dir: str | Path, lora_state_dict: dict[str, Tensor]) -> None:
        """Write LoRA weights so the family's diffusers pipeline loads them with ``load_lora_weights``."""

    def save_full(self, output_dir: str | Path) -> None:
        """Write the fine-tuned denoiser in diffusers format (``save_pretrained``, safetensors)."""
        self.denoiser.save_pretrained(Path(output_dir) / "unet", safe_serialization=True)

    def frozen_modules(self) -> list[nn.Module]:
        """Modules that never train (VAE, text encoders); the trainer freezes and casts them."""
        return []

    def lora_config_dict(self) -> dict[str, Any] | None:
        """The denoiser's peft ``LoraConfig`` as a JSON-safe dict (``None`` without one).

        Saved beside LoRA weights: without ``lora_alpha`` a loader assumes ``alpha == r`` and a
        LoRA trained with another alpha would load at the wrong scale.
        """
        configs = getattr(self.denoiser, "peft_config", None) or {}
        config = configs.get("default") if "default" in configs else next(iter(configs.values()), None)
        if config is None:
            return None
        # JSON round trip: sets -> lists, enums -> their string values.
        as_json = json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v))
        return json.loads(as_json)

    def freeze_encoders(self) -> None:
        """Freeze the modules that never train and put them in eval mode."""
        for module in self.frozen_modules():
            module.requires_grad_(False).eval()

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device: torch.device | str) -> "DiffusionAdapter":
        self.denoiser.to(device)
        for module in self.frozen_modules():
            module.to(device)
        return self


def check_lora_state_dict(lora_state_dict: dict[str, Tensor]) -> None:
    """``save_lora`` takes ``peft.utils.get_peft_model_state_dict(denoiser)``: LoRA tensors only."""
    not_lora = [key for key in lora_state_dict if "lora" not in key]
    if not lora_state_dict or not_lora:
        raise ValueError(
            "save_lora expects peft.utils.get_peft_model_state_dict(unet); "
            f"got {len(lora_state_dict)} keys, non-LoRA ones: {not_lora[:3]}"
        )


def add_lora(adapter: DiffusionAdapter, config) -> None:
    """Inject trainable LoRA layers (peft) into the denoiser; everything else is frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = config.train.lora_target_modules or list(adapter.lora_target_modules)
    lora_config = LoraConfig(
        r=config.train.lora_rank,
        lora_alpha=config.train.lora_alpha,
        target_modules=targets,
        init_lora_weights="gaussian",
    )
    adapter.denoiser.requires_grad_(False)
    try:
        inject_adapter_in_model(lora_config, adapter.denoiser)
    except ValueError as error:
        raise SipoError(
            f"LoRA target modules {targets} were not found in the {adapter.family} denoiser; "
            "set train.lora_target_modules to module names it has"
        ) from error
    for name, param in adapter.denoiser.named_parameters():
        param.requires_grad_("lora_" in name)


@contextlib.contextmanager
def lora_disabled(module: nn.Module) -> Iterator[None]:
    """Run ``module`` as its base model: every peft LoRA layer switched off, then back on.

    This is the LoRA reference model of Diffusion-DPO without a second copy of the weights.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
