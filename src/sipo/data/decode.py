"""Image and video decoding shared by every dataset format: bytes or a file -> tensor in [-1, 1].

One path for all pixels: PIL decodes, the mode is mapped to 8-bit RGB (transparency composited
on white; 16-bit and float greyscale rescaled, not clipped), the shorter side is resized to the
training resolution with bicubic filtering and the centre is cropped, the same geometry as
``torchvision.transforms.Resize(r) + CenterCrop(r)`` that Diffusion-DPO's training script uses.

Anything wrong with the pixels raises `MalformedRow` carrying one of the reason strings of
``sipo.data.report``; the dataset turns it into a `SkippedRow` (or a `SipoError` when strict).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence

from sipo.data.report import (
    CORRUPT_IMAGE,
    IMAGE_TOO_LARGE,
    IMAGE_TOO_SMALL,
    MISSING_FILE,
    NOT_A_PICTURE,
    UNREADABLE_VIDEO,
    UNSUPPORTED_MODE,
    VIDEO_NEEDS_AV,
    MalformedRow,  # re-exported: `from sipo.data.decode import MalformedRow` keeps working
)
from sipo.data.video import VideoSpec, resize_cover_crop, select_frames

#: images with a side below this many pixels are skipped: upscaling them invents the picture
MIN_IMAGE_SIDE = 8
#: file suffixes read as videos; .gif through PIL, the others through PyAV
GIF_SUFFIXES = (".gif",)
AV_VIDEO_SUFFIXES = (".mp4", ".webm", ".mov")

_TRANSPARENT_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def decode_image(source: bytes | str | os.PathLike[str], resolution: int) -> torch.Tensor:
    """Decode an encoded image (bytes or a file path) to a float tensor ``[3, r, r]`` in [-1, 1].

    Raises `MalformedRow` for corrupt bytes, images beyond PIL's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``), images with a side below 8 px and unconvertible modes.
    """
    data = _read_bytes(source)
    with warnings.catch_warnings():
        _quiet_pil_warnings()
        try:
            with Image.open(io.BytesIO(data)) as image:
                _check_size(image.size)
                image.load()
                image = ImageOps.exif_transpose(image)
                return _to_tensor(_resize_center_crop(_to_rgb8(image), resolution))
        except (MalformedRow, MemoryError):  # out of memory is the machine's problem, not the picture's
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise MalformedRow(IMAGE_TOO_LARGE, str(error)) from None
        except Exception as error:  # noqa: BLE001 - PIL raises a zoo of types on untrusted bytes
            raise MalformedRow(CORRUPT_IMAGE, f"{type(error).__name__}: {error}") from None


def decode_input_image(source: bytes | str | os.PathLike[str], resolution: int, video: VideoSpec | None = None,
                       media: str | None = None) -> torch.Tensor:
    """A pair's input image (what an edit starts from, or an image-to-video clip's first frame) -> ``[3, H, W]``
    in [-1, 1], the size of one frame of the pair's pictures: ``r x r`` for an image model, a clip frame's
    ``data.height x data.width`` for a video model (``media == "video"``), through the same geometry.

    A still picture only: a video suffix raises `MalformedRow` ("a video clip where the model needs a
    picture"); a GIF gives its first frame. Other problems as `decode_image`.
    """
    if not isinstance(source, (bytes, bytearray, memoryview)) and media_of_path(os.fspath(source)) == "video":
        raise MalformedRow(NOT_A_PICTURE, f"input_image {os.fspath(source)} is a clip")
    spec = video or VideoSpec()
    if media != "video" or (spec.height is None and spec.width is None):
        return decode_image(source, resolution)
    data = _read_bytes(source)
    with warnings.catch_warnings():
        _quiet_pil_warnings()
        try:
            with Image.open(io.BytesIO(data)) as image:
                _check_size(image.size)
                image.load()
                return _frame_tensor(ImageOps.exif_transpose(image), resolution, spec)
        except (MalformedRow, MemoryError):
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise MalformedRow(IMAGE_TOO_LARGE, str(error)) from None
        except Exception as error:  # noqa: BLE001 - untrusted bytes, see decode_image
            raise MalformedRow(CORRUPT_IMAGE, f"{type(error).__name__}: {error}") from None


def decode_video(
    path: str | os.PathLike[str], resolution: int, spec: VideoSpec | None = None
) -> torch.Tensor:
    """Decode a .gif (PIL) or .mp4/.webm/.mov (PyAV) to ``[F, 3, H, W]`` in [-1, 1].

    ``spec`` (`sipo.data.video.VideoSpec`) sets the frame rate, frame count and ``H x W``; by
    default every frame is kept at ``resolution x resolution``. A clip shorter than the spec asks
    raises `MalformedRow` ("video too short").
    """
    spec = spec or VideoSpec()
    suffix = Path(path).suffix.lower()
    if suffix in GIF_SUFFIXES:
        return _decode_gif(_read_bytes(path), resolution, spec, os.fspath(path))
    if suffix in AV_VIDEO_SUFFIXES:
        return _decode_with_av(path, resolution, spec)
    raise ValueError(f"{path} is not a video suffix: {GIF_SUFFIXES + AV_VIDEO_SUFFIXES}")


def is_video_path(path: str) -> bool:
    """True when ``path`` may name a video by its suffix (a GIF may also be a still picture)."""
    return path.lower().endswith(GIF_SUFFIXES + AV_VIDEO_SUFFIXES)


def media_of_path(path: str) -> str | None:
    """``"video"`` or ``"image"`` by the suffix alone; ``None`` for a GIF, which may be either."""
    lowered = path.lower()
    if lowered.endswith(GIF_SUFFIXES):
        return None
    return "video" if lowered.endswith(AV_VIDEO_SUFFIXES) else "image"


def decode_file(path: str | os.PathLike[str], resolution: int, video: VideoSpec | None = None,
                media: str | None = None) -> torch.Tensor:
    """Decode a file: an image to ``[3, r, r]``, a video to ``[F, 3, H, W]`` per ``video``.

    The suffix decides, except for a GIF: a still (1-frame) GIF is a picture and an animated one
    a clip, unless ``media`` (the model's kind, ``"image"`` or ``"video"``) says which it must be.
    An animated GIF where a picture is needed raises `MalformedRow` (a clip is not a picture).
    """
    name = os.fspath(path)
    if media_of_path(name) is None:  # a GIF
        if media == "video":
            return decode_video(path, resolution, video)
        data = _read_bytes(path)
        frames = _frame_count(data)
        if frames == 1 or (frames is None and media == "image"):
            return decode_image(data, resolution)
        if frames is not None and media == "image":
            raise MalformedRow(NOT_A_PICTURE, f"{name} is an animated GIF")
        # animated, or unreadable where either kind would do: the clip decoder classifies it
        return _decode_gif(data, resolution, video or VideoSpec(), name)
    if is_video_path(name):
        return decode_video(path, resolution, video)
    return decode_image(path, resolution)


# --- helpers -------------------------------------------------------------------------------
def _read_bytes(source: bytes | str | os.PathLike[str]) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    try:
        return Path(source).read_bytes()
    except FileNotFoundError:
        raise MalformedRow(MISSING_FILE, os.fspath(source)) from None
    except OSError as error:  # a directory, a permission problem, a broken disk
        raise MalformedRow(MISSING_FILE, f"{os.fspath(source)}: {error.strerror}") from None


def _frame_count(data: bytes) -> int | None:
    """Frames in an encoded GIF (PIL counts them from the headers); None when unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return int(getattr(image, "n_frames", 1))
    except Exception:  # noqa: BLE001 - untrusted bytes; the decoder then says what is wrong
        return None


def _quiet_pil_warnings() -> None:
    """Inside ``warnings.catch_warnings()``: bomb warnings become errors, per-file chatter is muted.

    PIL warns between 1x and 2x ``MAX_IMAGE_PIXELS`` and raises beyond; both mean "too large".
    Its UserWarnings about odd metadata ("Corrupt EXIF data", "Tag data larger than file") would
    repeat for every bad row of a large dataset; a row that cannot be used is counted instead.
    """
    warnings.simplefilter("ignore", UserWarning)
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def _check_size(size: tuple[int, int]) -> None:
    width, height = size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise MalformedRow(IMAGE_TOO_SMALL, f"{width}x{height} px, need at least {MIN_IMAGE_SIDE}")
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        raise MalformedRow(IMAGE_TOO_LARGE, f"{width}x{height} px > PIL.Image.MAX_IMAGE_PIXELS")


def _to_rgb8(image: Image.Image) -> Image.Image:
    """Map any PIL mode to 8-bit RGB without losing the picture."""
    mode = image.mode
    if mode in _TRANSPARENT_MODES or "transparency" in image.info:
        # Composite on white: converting RGBA straight to RGB drops alpha and shows whatever
        # colour the transparent pixels happen to store (often black).
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return image
    if mode == "I" or mode.startswith("I;16"):
        # 16-bit greyscale; "I" (32-bit) is what older Pillows and TIFF give for 16-bit data.
        # PIL's own convert("L") clips at 255, which turns a 16-bit image all white.
        levels = np.asarray(image).astype(np.float64) / 257.0  # 65535 -> 255
        return _grey_to_rgb(levels)
    if mode == "F":
        # Float images follow the [0, 1] convention of numpy/tifffile pipelines.
        levels = np.nan_to_num(np.asarray(image, dtype=np.float64)) * 255.0
        return _grey_to_rgb(levels)
    try:
        return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, HSV, ...
    except (ValueError, OSError) as error:
        raise MalformedRow(UNSUPPORTED_MODE, f"{mode}: {error}") from None


def _grey_to_rgb(levels: np.ndarray) -> Image.Image:
    grey = np.clip(np.rint(levels), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Shorter side -> ``resolution`` (bicubic), then the centred square, as torchvision does."""
    from sipo.data.sizes import resize_crop_box  # the one geometry, also recorded for SDXL

    width, height = image.size
    new_width, new_height, left, top = resize_crop_box(width, height, resolution)
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    return image.crop((left, top, left + resolution, top + resolution))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # [H, W, 3], a writable copy
    return pixels.permute(2, 0, 1).contiguous().float().div_(127.5).sub_(1.0)


def _frame_tensor(image: Image.Image, resolution: int, spec: VideoSpec) -> torch.Tensor:
    if spec.height is None and spec.width is None:
        return _to_tensor(_resize_center_crop(_to_rgb8(image), resolution))
    return _to_tensor(resize_cover_crop(_to_rgb8(image), *spec.size(resolution)))


def _decode_gif(data: bytes, resolution: int, spec: VideoSpec, source: str = "") -> torch.Tensor:
    with warnings.catch_warnings():
        _quiet_pil_warnings()
        try:
            with Image.open(io.BytesIO(data)) as image:
                _check_size(image.size)
                duration_ms = float(image.info.get("duration") or 100.0)  # GIF's per-frame delay
                chosen = select_frames(
                    (frame.copy() for frame in ImageSequence.Iterator(image)), 1000.0 / duration_ms, spec, source
                )
                frames = [_frame_tensor(frame, resolution, spec) for frame in chosen]
        except (MalformedRow, MemoryError):
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise MalformedRow(IMAGE_TOO_LARGE, str(error)) from None
        except Exception as error:  # noqa: BLE001 - untrusted bytes, see decode_image
            raise MalformedRow(UNREADABLE_VIDEO, f"{type(error).__name__}: {error}") from None
    if not frames:
        raise MalformedRow(UNREADABLE_VIDEO, "no frames")
    return torch.stack(frames)


def _decode_with_av(path: str | os.PathLike[str], resolution: int, spec: VideoSpec) -> torch.Tensor:
    try:
        import av  # optional: only video manifests need it (pip install "sipo[video]")
    except ImportError:
        raise MalformedRow(VIDEO_NEEDS_AV, os.fspath(path)) from None
    if not Path(path).is_file():
        raise MalformedRow(MISSING_FILE, os.fspath(path))

    def pictures(container, stream):
        for frame in container.decode(stream):
            image = frame.to_image()
            _check_size(image.size)
            yield image

    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                raise MalformedRow(UNREADABLE_VIDEO, "no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            native_fps = float(rate) if rate else 0.0
            chosen = select_frames(pictures(container, stream), native_fps, spec, os.fspath(path))
            frames = [_frame_tensor(image, resolution, spec) for image in chosen]
    except (MalformedRow, MemoryError):
        raise
    except Exception as error:  # noqa: BLE001 - PyAV/FFmpeg errors on untrusted files
        raise MalformedRow(UNREADABLE_VIDEO, f"{type(error).__name__}: {error}") from None
    if not frames:
        raise MalformedRow(UNREADABLE_VIDEO, "no frames")
    return torch.stack(frames)
