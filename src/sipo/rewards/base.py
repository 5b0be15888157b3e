"""The one scoring interface every reward model implements, and the CLIP preprocessing on tensors.

``Scorer.score(images, prompts) -> Tensor[B]``: images ``[B, 3, H, W]`` in ``[0, 1]`` (or video
``[B, F, 3, H, W]``, scored frame by frame and averaged over frames), one prompt per image. The
scorer runs on its own device in eval mode under ``no_grad`` and returns float32 scores on the CPU,
one per image, higher = better.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sipo.errors import SipoError

#: OpenAI CLIP's image normalisation (open_clip and the LAION CLIPs use the same numbers).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(
    images: Tensor, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> Tensor:
    """``[B, 3, H, W]`` in ``[0, 1]`` -> CLIP input ``[B, 3, size, size]``.

    What ``CLIPImageProcessor`` does to a picture, on tensors: resize the shorter side to ``size``
    (bicubic, antialiased), center-crop ``size x size``, subtract ``mean`` and divide by ``std``.
    """
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    if (new_h, new_w) != (height, width):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    images = images[..., top : top + size, left : left + size].clamp(0, 1)
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def require_files(name: str, directory: str | Path, groups: dict[str, Sequence[str]]) -> Path:
    """Check a scorer directory holds, for each role, at least one of the accepted file names.

    ``groups`` maps a role ("weights") to accepted names (``model.safetensors``, ``pytorch_model.bin``).
    Stops with one sentence naming the directory and every missing role.
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise SipoError(
            f"{name} scorer directory {directory} does not exist; download the checkpoint docs/evaluation.md "
            f"names and pass --scorer-path {name}=DIR"
        )
    missing = [f"{role} ({' or '.join(names)})" for role, names in groups.items()
               if not any((directory / n).exists() for n in names)]
    if missing:
        raise SipoError(
            f"{name} scorer directory {directory} lacks {', '.join(missing)}; "
            "put the files docs/evaluation.md lists for this scorer there"
        )
    return directory


def first_existing(directory: Path, names: Sequence[str]) -> Path:
    """The first of ``names`` present in ``directory`` (callers checked one exists)."""
    return next(directory / n for n in names if (directory / n).exists())


class Scorer(ABC):
    """A reward model: ``score(images, prompts) -> [B]`` (higher is better)."""

    #: registry name (``sipo eval --scorers NAME``)
    name: ClassVar[str]
    #: False for prompt-free scorers (aesthetic): the prompt is accepted and ignored.
    uses_prompts: ClassVar[bool] = True

    device: torch.device

    @classmethod
    @abstractmethod
    def load(cls, source: str | Path | None, device: torch.device | str = "cpu") -> "Scorer":
        """Load from a local directory (or the default published checkpoint when ``source`` is None)."""

    @abstractmethod
    def _score_images(self, images: Tensor, prompts: list[str]) -> Tensor:
        """``[N, 3, H, W]`` in ``[0, 1]`` on ``self.device`` -> ``[N]`` scores."""

    @torch.no_grad()
    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Scores ``[B]`` (float32, CPU) of images ``[B, 3, H, W]`` or videos ``[B, F, 3, H, W]`` in ``[0, 1]``.

        A video's score is the mean of its frames' scores, each frame scored with the video's prompt.
        """
        prompts = list(prompts)
        if images.ndim not in (4, 5) or images.shape[-3] != 3:
            raise ValueError(f"expected images [B, 3, H, W] or videos [B, F, 3, H, W], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts: pass one prompt per image")
        batch = images.shape[0]
        if images.ndim == 5:
            frames = images.shape[1]
            flat = images.reshape(batch * frames, *images.shape[2:])
            flat_prompts = [p for p in prompts for _ in range(frames)]
            return self.score(flat, flat_prompts).view(batch, frames).mean(dim=1)
        images = images.to(self.device, torch.float32).clamp(0, 1)
        return self._score_images(images, prompts).float().reshape(batch).cpu()
