"""Video clips -> ``[F, 3, H, W]`` tensors in [-1, 1]: frame-rate resampling, frame count, size.

A clip is first resampled in time, then cut to length, then every kept frame is resized and
centre-cropped (the image path's geometry, generalised to a non-square ``H x W``):

- ``fps``: keep the frames nearest to ``k / fps`` seconds, ``k = 0, 1, ...`` (frame index
  ``round(k * native_fps / fps)``; the native rate is the container's average rate, so a
  variable-frame-rate clip is read as if it were constant). ``None`` keeps every frame.
- ``num_frames``: the first ``num_frames`` of those, from the clip's start; a clip with fewer is
  skipped as too short (its length and the length needed go in the message). ``None`` keeps all.
- ``height`` x ``width``: scale so the frame covers the box (bicubic), crop the centre.

CogVideoX was trained on 49 frames at 8 fps (6 s) at 480x720, Wan2.1 on 81 frames at 16 fps (5 s)
at 480x832; the configs in configs/ set those values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from PIL import Image

from sipo.data.report import VIDEO_TOO_SHORT, MalformedRow


@dataclass(frozen=True)
class VideoSpec:
    """How clips are sampled: ``None`` fields keep the clip's own value (size: the square resolution)."""

    num_frames: int | None = None
    fps: float | None = None
    height: int | None = None
    width: int | None = None

    def size(self, resolution: int) -> tuple[int, int]:
        return (self.height or resolution, self.width or resolution)


def frame_indices(num_frames: int, native_fps: float, fps: float | None) -> list[int]:
    """Indices of the native frames that make ``num_frames`` frames at ``fps`` from the start."""
    if fps is None:
        return list(range(num_frames))
    step = native_fps / fps
    return [int(math.floor(k * step + 0.5)) for k in range(num_frames)]


def select_frames(frames: Iterable[Image.Image], native_fps: float, spec: VideoSpec, source: str = "") -> list[Image.Image]:
    """The frames of ``frames`` (a lazy iterator of decoded frames) that ``spec`` keeps.

    Decoding stops at the last frame needed. Raises ``MalformedRow(VIDEO_TOO_SHORT)`` when the
    clip ends first.
    """
    native_fps = native_fps if native_fps and native_fps > 0 else float(spec.fps or 1.0)
    iterator: Iterator[Image.Image] = iter(frames)
    if spec.num_frames is None:
        everything = list(iterator)
        if spec.fps is None:
            return everything
        count = int(math.floor((len(everything) - 1) * spec.fps / native_fps + 1e-9)) + 1
        return [everything[i] for i in frame_indices(count, native_fps, spec.fps) if i < len(everything)]
    wanted = frame_indices(spec.num_frames, native_fps, spec.fps)
    wanted_set, last = set(wanted), wanted[-1]
    kept: dict[int, Image.Image] = {}
    seen = 0
    for index, frame in enumerate(iterator):
        seen = index + 1
        if index in wanted_set:
            kept[index] = frame
        if index >= last:
            break
    if seen <= last:
        have = f"{seen} frames at {native_fps:.3g} fps ({seen / native_fps:.2f} s)"
        rate = f"{spec.fps:.3g} fps" if spec.fps else "its own rate"
        need = f"{spec.num_frames} frames at {rate} ({(last + 1) / native_fps:.2f} s)"
        raise MalformedRow(VIDEO_TOO_SHORT, f"{source} has {have}, needs {need}".strip())
    return [kept[i] for i in wanted]


def resize_cover_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale so the image covers ``height x width`` (bicubic), then take the centred box.

    For a square box this is the image path's ``Resize(r) + CenterCrop(r)``.
    """
    source_width, source_height = image.size
    scale = max(width / source_width, height / source_height)
    new_width = max(width, int(round(source_width * scale)))
    new_height = max(height, int(round(source_height * scale)))
    if (new_width, new_height) != (source_width, source_height):
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left = int(round((new_width - width) / 2.0))
    top = int(round((new_height - height) / 2.0))
    return image.crop((left, top, left + width, top + height))
