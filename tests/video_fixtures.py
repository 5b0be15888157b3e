"""Tiny video clips and video preference manifests written by the tests with PyAV (never downloaded)."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np


def video_codec() -> str:
    """h264 when this PyAV/FFmpeg build can encode it, else mpeg4 (both decode everywhere)."""
    import av

    for name in ("libx264", "h264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - codec missing from this FFmpeg build
            continue
    raise RuntimeError("PyAV has neither an h264 nor an mpeg4 encoder")


def write_clip(path: Path, frames: np.ndarray, fps: int = 8) -> Path:
    """Encode ``frames`` ``[F, H, W, 3]`` uint8 as an .mp4 at ``fps`` (near-lossless quality)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    codec = video_codec()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "0"} if "264" in codec else {"qscale": "1"}
        for picture in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def numbered_frames(count: int, height: int = 32, width: int = 32) -> np.ndarray:
    """Frame ``i`` is a flat grey of level ``8 * i`` (readable back after lossy coding)."""
    levels = (np.arange(count) * 8 % 256).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (count, height, width, 3)).copy()


def write_video_pairs(directory: Path, num_pairs: int = 4, frames: int = 9, size: int = 32, fps: int = 8, seed: int = 0) -> Path:
    """``pairs.jsonl`` of mp4 clips: winners are smooth moving ramps, losers are noise."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)
    lines = []
    for i in range(num_pairs):
        shift = np.arange(frames)[:, None] * 4
        smooth = ((ramp[None, :] + shift) % 256).astype(np.uint8)  # [F, W]
        smooth = np.broadcast_to(smooth[:, None, :, None], (frames, size, size, 3)).copy()
        noisy = rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
        write_clip(directory / f"{i:03d}_chosen.mp4", smooth, fps)
        write_clip(directory / f"{i:03d}_rejected.mp4", noisy, fps)
        lines.append(json.dumps({"prompt": f"a moving gradient {i}", "chosen": f"{i:03d}_chosen.mp4",
                                 "rejected": f"{i:03d}_rejected.mp4"}))
    manifest = directory / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest
