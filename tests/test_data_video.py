"""Video preference data: mp4 clips written with PyAV, sampled in time and space, bad clips skipped.

Frames are flat greys of level ``8 * i`` (`numbered_frames`), so a decoded frame tells which
source frame it was: ``round(level / 8)``, robust to the +-1 of YUV 4:2:0 coding at crf 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from video_fixtures import numbered_frames, write_clip

from sipo.config import DataConfig, load_config
from sipo.data import collate_pairs, open_preference_dataset
from sipo.data.decode import MalformedRow, decode_video
from sipo.data.report import PAIR_KIND_MISMATCH, UNREADABLE_VIDEO, VIDEO_TOO_SHORT
from sipo.data.video import VideoSpec, frame_indices
from sipo.errors import SipoError


def source_indices(video: torch.Tensor) -> list[int]:
    levels = (video[:, 0, 0, 0] + 1) * 127.5
    return [int(round(float(level) / 8)) for level in levels]


@pytest.fixture(scope="module")
def clip_16fps(tmp_path_factory) -> Path:
    """20 frames at 16 fps (1.25 s), 32x48."""
    return write_clip(tmp_path_factory.mktemp("clips") / "a.mp4", numbered_frames(20, 32, 48), fps=16)


def test_every_frame_at_the_square_resolution_by_default(clip_16fps):
    video = decode_video(clip_16fps, 16)
    assert video.shape == (20, 3, 16, 16)
    assert source_indices(video) == list(range(20))
    assert video.min() >= -1 and video.max() <= 1


def test_fps_resampling_then_frame_count_from_the_start(clip_16fps):
    """8 fps from a 16 fps clip keeps every second frame: 0, 2, 4, 6, 8."""
    video = decode_video(clip_16fps, 32, VideoSpec(num_frames=5, fps=8))
    assert source_indices(video) == [0, 2, 4, 6, 8]
    # 12 fps from 16: frames nearest to k/12 s = k * 4/3 frames -> 0, 1, 3, 4, 5 (round half up)
    assert frame_indices(5, 16.0, 12.0) == [0, 1, 3, 4, 5]
    assert source_indices(decode_video(clip_16fps, 32, VideoSpec(num_frames=5, fps=12))) == [0, 1, 3, 4, 5]
    # without num_frames, the whole clip at the new rate: 20 frames of 1/16 s -> 10 at 8 fps
    assert source_indices(decode_video(clip_16fps, 32, VideoSpec(fps=8))) == list(range(0, 20, 2))


def test_too_short_clip_names_both_lengths(clip_16fps):
    with pytest.raises(MalformedRow) as error:
        decode_video(clip_16fps, 32, VideoSpec(num_frames=11, fps=8))  # needs frame 20 of 0..19
    assert error.value.reason == VIDEO_TOO_SHORT
    assert "20 frames at 16 fps (1.25 s)" in error.value.detail and "11 frames at 8 fps" in error.value.detail


def test_non_square_cover_resize_and_centre_crop(tmp_path):
    """A 64x32 (w x h) clip, left half black, right half white, into 16 x 24 (h x w): covering the
    box needs scale max(24/64, 16/32) = 0.5 -> 32x16, then the centred 24 columns are 4..27 of 32:
    12 dark columns, then 12 light (bicubic blurs the edge by a column or two)."""
    frames = np.zeros((3, 32, 64, 3), dtype=np.uint8)
    frames[:, :, 32:] = 255
    path = write_clip(tmp_path / "halves.mp4", frames, fps=8)
    video = decode_video(path, 32, VideoSpec(height=16, width=24))
    assert video.shape == (3, 3, 16, 24)
    row = video[0, 0, 8]
    assert (row[:10] < -0.9).all() and (row[14:] > 0.9).all()


def test_gif_follows_the_same_sampling(tmp_path):
    frames = [Image.fromarray(f) for f in numbered_frames(10, 16, 16)]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)  # 20 fps
    video = decode_video(path, 16, VideoSpec(num_frames=3, fps=10))
    assert video.shape == (3, 3, 16, 16)
    assert source_indices(video) == [0, 2, 4]


def _manifest(directory: Path, rows: list[tuple[str, str]]) -> Path:
    lines = [json.dumps({"prompt": f"clip {i}", "chosen": c, "rejected": r}) for i, (c, r) in enumerate(rows)]
    path = directory / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("video_pairs")
    write_clip(directory / "long_a.mp4", numbered_frames(9, 24, 40), fps=8)
    write_clip(directory / "long_b.mp4", numbered_frames(9, 24, 40)[::-1].copy(), fps=8)
    write_clip(directory / "short.mp4", numbered_frames(5, 24, 40), fps=8)
    (directory / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    return directory


def _config(manifest: Path, **values) -> DataConfig:
    return DataConfig(format="jsonl", path=str(manifest), **values)


def test_dataset_returns_frames_first_clips_and_batches_them(video_dir):
    manifest = _manifest(video_dir, [("long_a.mp4", "long_b.mp4")] * 2)
    dataset = open_preference_dataset(_config(manifest, num_frames=9, fps=8, height=16, width=32), resolution=64)
    item = dataset[0]
    assert item["chosen"].shape == item["rejected"].shape == (9, 3, 16, 32)
    assert source_indices(item["rejected"]) == list(range(8, -1, -1))
    batch = collate_pairs([dataset[0], dataset[1]])
    assert batch["chosen"].shape == (2, 9, 3, 16, 32)


def test_bad_clips_are_skipped_and_counted(video_dir):
    manifest = _manifest(video_dir, [
        ("long_a.mp4", "long_b.mp4"),   # fine
        ("long_a.mp4", "short.mp4"),    # rejected clip too short for 9 frames
        ("broken.mp4", "long_b.mp4"),   # unreadable
    ])
    dataset = open_preference_dataset(_config(manifest, num_frames=9, height=16, width=16), resolution=16)
    batch = collate_pairs([dataset[i] for i in range(3)])
    assert batch["chosen"].shape == (1, 9, 3, 16, 16)
    reasons = sorted(row.reason for row in batch["skipped"])
    assert reasons == sorted([VIDEO_TOO_SHORT, UNREADABLE_VIDEO])
    assert dataset.report.to_dict()["skipped"] == {UNREADABLE_VIDEO: 1, VIDEO_TOO_SHORT: 1}
    short = next(row for row in batch["skipped"] if row.reason == VIDEO_TOO_SHORT)
    assert "rejected 'short.mp4'" in short.where and "5 frames at 8 fps" in short.where


def test_partner_of_another_length_is_skipped_without_num_frames(video_dir):
    manifest = _manifest(video_dir, [("long_a.mp4", "short.mp4")])
    dataset = open_preference_dataset(_config(manifest, height=16, width=16), resolution=16)
    skipped = dataset[0]
    assert skipped.reason == PAIR_KIND_MISMATCH and "(9, 3, 16, 16) vs (5, 3, 16, 16)" in skipped.where


def test_strict_mode_stops_with_one_sentence(video_dir):
    manifest = _manifest(video_dir, [("long_a.mp4", "short.mp4")])
    dataset = open_preference_dataset(_config(manifest, num_frames=9, strict=True), resolution=16)
    with pytest.raises(SipoError, match=r"video too short.*data.strict=false"):
        dataset[0]


@pytest.mark.parametrize("override", ["data.fps=0", "data.num_frames=0", "data.height=-8"])
def test_invalid_video_settings_are_one_sentence(override):
    with pytest.raises(SipoError, match=override.split("=")[0]):
        load_config(None, [override])
