"""Where each training picture came from: its original size and the crop taken from it.

SDXL is conditioned on (original height, original width, crop top, crop left, target size)
(Podell et al. 2023, section 2.2), so the image datasets record, per pair, the chosen picture's
size before resizing and the top-left corner of the centre crop in the resized picture, as
diffusers' SDXL training scripts do. The geometry is `resize_crop_box`, the one
``sipo.data.decode`` crops with, so the recorded crop is the crop that was taken.
"""

from __future__ import annotations

import io
import os

import torch
from PIL import Image

#: EXIF orientations that rotate by 90 degrees (``ImageOps.exif_transpose`` swaps width and height)
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


def resize_crop_box(width: int, height: int, resolution: int) -> tuple[int, int, int, int]:
    """Shorter side -> ``resolution``, then the centred square: ``(new_width, new_height, left, top)``."""
    if width <= height:
        new_width, new_height = resolution, int(resolution * height / width)
    else:
        new_width, new_height = int(resolution * width / height), resolution
    left = int(round((new_width - resolution) / 2.0))
    top = int(round((new_height - resolution) / 2.0))
    return new_width, new_height, left, top


def original_size(source: bytes | str | os.PathLike[str]) -> tuple[int, int] | None:
    """``(height, width)`` of an encoded image as decoded (after its EXIF rotation); reads the header only.

    ``None`` when the header cannot be read: the pixels' own decoding reports that problem.
    """
    try:
        opened = Image.open(io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else source)
        with opened as image:
            width, height = image.size
            if image.getexif().get(0x0112) in _SWAPPING_ORIENTATIONS:
                width, height = height, width
    except Exception:  # noqa: BLE001 - untrusted bytes; decode_image classifies the failure
        return None
    return height, width


def size_info(original: tuple[int, int], resolution: int, flipped: bool = False) -> torch.Tensor:
    """``[4]`` long: (orig_h, orig_w, crop_top, crop_left) of a picture cropped to ``resolution``.

    A horizontal flip mirrors the crop: its left edge becomes ``new_width - left - resolution``
    (as diffusers' train_text_to_image_sdxl.py records it).
    """
    height, width = original
    new_width, _, left, top = resize_crop_box(width, height, resolution)
    if flipped:
        left = new_width - left - resolution
    return torch.tensor([height, width, top, left], dtype=torch.long)
