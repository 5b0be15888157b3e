"""Preference pairs that share an input image (an edit's source, an image-to-video clip's first frame), written
by the tests; and the one-step pipeline call the conditioned families' predict is checked against."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def gradient(size: int, tint: np.ndarray, height: int | None = None) -> np.ndarray:
    """A horizontal ramp ``[H, W, 3]`` uint8 tinted per channel."""
    ramp = np.linspace(0, 255, size, dtype=np.float64)
    return (ramp[None, :, None] * tint[None, None, :]).repeat(height or size, axis=0).astype(np.uint8)


def write_edit_pairs(directory: Path, num_pairs: int = 4, size: int = 32, seed: int = 0) -> Path:
    """PNG triples + ``pairs.jsonl`` with ``input_image``: the chosen edit is the input brightened (smooth), the
    rejected one noise; every input differs."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(num_pairs):
        source = gradient(size, rng.uniform(0.3, 0.7, size=3))
        Image.fromarray(source).save(directory / f"{i:03d}_input.png")
        Image.fromarray(np.clip(source.astype(int) + 60, 0, 255).astype(np.uint8)).save(directory / f"{i:03d}_chosen.png")
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(directory / f"{i:03d}_rejected.png")
        lines.append(json.dumps({"prompt": f"make picture {i} brighter", "chosen": f"{i:03d}_chosen.png",
                                 "rejected": f"{i:03d}_rejected.png", "input_image": f"{i:03d}_input.png"}))
    manifest = directory / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def write_i2v_pairs(directory: Path, num_pairs: int = 2, frames: int = 9, size: int = 32, fps: int = 8,
                    seed: int = 0) -> Path:
    """mp4 clips + first-frame PNGs + ``pairs.jsonl``: both clips of a pair start from the input image; the chosen
    one then moves smoothly, the rejected one turns to noise."""
    from video_fixtures import write_clip

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(num_pairs):
        first = gradient(size, rng.uniform(0.3, 1.0, size=3))
        Image.fromarray(first).save(directory / f"{i:03d}_first.png")
        smooth = np.stack([np.roll(first, 2 * k, axis=1) for k in range(frames)])
        noisy = np.concatenate([first[None], rng.integers(0, 256, (frames - 1, size, size, 3), dtype=np.uint8)])
        write_clip(directory / f"{i:03d}_chosen.mp4", smooth, fps)
        write_clip(directory / f"{i:03d}_rejected.mp4", noisy, fps)
        lines.append(json.dumps({"prompt": f"clip {i} pans to the right", "chosen": f"{i:03d}_chosen.mp4",
                                 "rejected": f"{i:03d}_rejected.mp4", "input_image": f"{i:03d}_first.png"}))
    manifest = directory / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def input_pictures(count: int, size: int, seed: int = 3, height: int | None = None) -> torch.Tensor:
    """``[count, 3, H, W]`` in ``[-1, 1]`` made from 8-bit pixels (as the data decoder gives them: exact in PIL)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (count, 3, height or size, size), generator=generator)
    return pixels.float() / 127.5 - 1


class TransformerOutputs:
    """Records what a transformer returns on each call (a forward hook), for comparing one pipeline step."""

    def __init__(self, *modules) -> None:
        self.outputs: list[torch.Tensor] = []
        self.inputs: list[dict] = []
        self.handles = [module.register_forward_hook(self._record, with_kwargs=True) for module in modules]

    def _record(self, module, args, kwargs, output) -> None:
        self.inputs.append(kwargs)
        self.outputs.append((output[0] if isinstance(output, tuple) else output.sample).detach().clone())

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """``max |ours - theirs| / max |theirs|``, in float64."""
    return float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())
