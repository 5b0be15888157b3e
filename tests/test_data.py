"""Preference datasets: decoding, Pick-a-Pic parquet, JSONL manifests, collate, report, flips.

Every fixture is written by the test into tmp_path (parquet through pyarrow, images through PIL).
Expected pixel values are hand-computed from the mapping x -> x / 127.5 - 1 of 8-bit levels
(so 255 -> +1, 0 -> -1, 51 -> -0.6) and the 16-bit -> 8-bit scaling v -> v / 257.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from sipo.config import DataConfig
from sipo.data import (
    DataReport,
    MalformedRow,
    SkippedRow,
    collate_pairs,
    decode_image,
    flip_decision,
    open_preference_dataset,
)
from sipo.data import report as reasons
from sipo.errors import SipoError

RED, GREEN, BLUE, BLACK, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0), (255, 255, 255)


# --- fixture builders ----------------------------------------------------------------------
def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def solid(color, size=(12, 12), fmt="PNG") -> bytes:
    return encode(Image.new("RGB", size, color), fmt)


def halves(left, right, size=(12, 12)) -> bytes:
    """Left half one colour, right half another: shows whether an image was mirrored."""
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return encode(image)


def rgb_of(color) -> torch.Tensor:
    """The [3] tensor a solid 8-bit colour decodes to."""
    return torch.tensor(color, dtype=torch.float32) / 127.5 - 1.0


def is_solid(picture: torch.Tensor, color) -> bool:
    return torch.allclose(picture, rgb_of(color)[:, None, None].expand_as(picture), atol=1e-6)


def png_declaring(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose IHDR is rewritten to claim width x height (CRC fixed up)."""
    data = bytearray(solid(RED, (8, 8)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


# A PNG signature followed by a 5-byte IHDR chunk (13 bytes are required), CRC correct.
SHORT_IHDR_PNG = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 5) + b"IHDR" + bytes(5) + struct.pack(">I", zlib.crc32(b"IHDR" + bytes(5)))


def write_shard(path: Path, rows, row_group_size: int | None = None) -> Path:
    """rows: (caption, jpg_0, jpg_1, label_0) tuples."""
    captions, first, second, labels = (list(column) for column in zip(*rows))
    table = pa.table(
        {
            "caption": pa.array(captions, pa.string()),
            "jpg_0": pa.array(first, pa.binary()),
            "jpg_1": pa.array(second, pa.binary()),
            "label_0": pa.array(labels, pa.float64()),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_manifest(directory: Path, rows, name="pairs.jsonl") -> Path:
    """rows: dicts (written as JSON) or raw strings (written as they are)."""
    manifest = directory / name
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def pickapic(path, resolution=8, **options):
    return open_preference_dataset(DataConfig(format="pickapic", path=str(path), **options), resolution)


def jsonl(path, resolution=8, **options):
    return open_preference_dataset(DataConfig(format="jsonl", path=str(path), **options), resolution)


def reason_of(problem: pytest.ExceptionInfo) -> str:
    return problem.value.reason


# --- decoding ------------------------------------------------------------------------------
def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    image.putpixel((0, 0), (255, 0, 0, 255))  # one opaque red pixel
    picture = decode_image(encode(image), 8)
    assert torch.allclose(picture[:, 7, 7], rgb_of(WHITE))  # transparent -> white, not black
    assert torch.allclose(picture[:, 0, 0], rgb_of(RED))


def test_la_and_palette_transparency_become_white():
    la = Image.new("LA", (8, 8), (0, 0))
    assert is_solid(decode_image(encode(la), 8), WHITE)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    palette.info["transparency"] = 0  # colour 0 (black) is transparent
    palette.putpixel((1, 1), 1)
    picture = decode_image(encode(palette), 8)
    assert torch.allclose(picture[:, 0, 0], rgb_of(WHITE))
    assert torch.allclose(picture[:, 1, 1], rgb_of(RED))


def test_greyscale_levels():
    image = Image.fromarray(np.array([[0, 51, 255, 255]] * 8, dtype=np.uint8).repeat(2, axis=1), "L")
    picture = decode_image(encode(image), 8)
    assert picture.shape == (3, 8, 8)
    assert torch.allclose(picture[:, 0, 0], torch.tensor([-1.0] * 3))
    assert torch.allclose(picture[:, 0, 2], torch.tensor([-0.6] * 3), atol=1e-6)  # 51/127.5 - 1
    assert torch.allclose(picture[:, 0, 7], torch.tensor([1.0] * 3))


def test_sixteen_bit_png_is_rescaled_not_saturated():
    levels = np.zeros((8, 8), dtype=np.uint16)
    levels[:, 2:4] = 51 * 257  # 13107 -> 8-bit 51 -> -0.6
    levels[:, 4:] = 65535  # full scale -> +1.0
    image = Image.fromarray(levels)
    assert image.mode.startswith("I;16")
    data = encode(image)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # still 16-bit after the PNG round trip
    picture = decode_image(data, 8)
    assert torch.allclose(picture[:, 0, 0], torch.tensor([-1.0] * 3))
    assert torch.allclose(picture[:, 0, 2], torch.tensor([-0.6] * 3), atol=1e-6)
    assert torch.allclose(picture[:, 0, 7], torch.tensor([1.0] * 3))
    assert picture.min() < 0  # PIL's own convert("L") would clip 13107 to 255: all white


def test_int32_and_float_modes():
    int_image = Image.fromarray(np.array([[0] * 4 + [13107] * 2 + [65535] * 2] * 8, dtype=np.int32), "I")
    picture = decode_image(encode(int_image, "TIFF"), 8)
    assert torch.allclose(picture[:, 0, 0], torch.tensor([-1.0] * 3))
    assert torch.allclose(picture[:, 0, 4], torch.tensor([-0.6] * 3), atol=1e-6)  # 13107/257 = 51
    assert torch.allclose(picture[:, 0, 7], torch.tensor([1.0] * 3))
    float_image = Image.fromarray(np.array([[0.0] * 4 + [0.2] * 2 + [1.0] * 2] * 8, dtype=np.float32), "F")
    picture = decode_image(encode(float_image, "TIFF"), 8)
    assert torch.allclose(picture[:, 0, 0], torch.tensor([-1.0] * 3))
    assert torch.allclose(picture[:, 0, 4], torch.tensor([-0.6] * 3), atol=1e-6)  # 0.2*255 = 51
    assert torch.allclose(picture[:, 0, 7], torch.tensor([1.0] * 3))


def test_cmyk_converts_to_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink -> white
    cmyk.paste((0, 0, 0, 255), (0, 0, 4, 8))  # full black ink on the left half
    picture = decode_image(encode(cmyk, "TIFF"), 8)
    assert torch.allclose(picture[:, 0, 0], rgb_of(BLACK))
    assert torch.allclose(picture[:, 0, 7], rgb_of(WHITE))


def test_shorter_side_resized_and_centre_cropped():
    # 30x10: black | white | black thirds; at resolution 10 no resize, the centre crop is white.
    image = Image.new("RGB", (30, 10), BLACK)
    image.paste(WHITE, (10, 0, 20, 10))
    assert is_solid(decode_image(encode(image), 10), WHITE)
    assert is_solid(decode_image(encode(image.transpose(Image.Transpose.ROTATE_90)), 10), WHITE)
    # 60x20 -> 30x10 (bicubic) -> centre 10 columns; away from the edges they stay white.
    wide = image.resize((60, 20), Image.Resampling.NEAREST)
    picture = decode_image(encode(wide), 10)
    assert picture.shape == (3, 10, 10)
    assert torch.allclose(picture[:, :, 3:7], torch.ones(3, 10, 4), atol=1e-6)
    # Non-square, non-multiple: 25x10 at 8 -> 20x8, crop columns 6..13.
    assert decode_image(solid(RED, (25, 10)), 8).shape == (3, 8, 8)
    assert decode_image(solid(RED, (9, 31)), 16).shape == (3, 16, 16)  # upscaled when smaller


def test_jpeg_decodes_close_to_its_colour():
    picture = decode_image(solid((200, 100, 50), (16, 16), "JPEG"), 8)
    assert torch.allclose(picture, rgb_of((200, 100, 50))[:, None, None].expand(3, 8, 8), atol=0.05)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, reasons.CORRUPT_IMAGE),
        (b"", reasons.CORRUPT_IMAGE),
        (solid(RED, (32, 32))[:60], reasons.CORRUPT_IMAGE),  # truncated PNG
        (solid(RED, (32, 32), "JPEG")[:200], reasons.CORRUPT_IMAGE),  # truncated JPEG
        (solid(RED, (7, 40)), reasons.IMAGE_TOO_SMALL),
        (png_declaring(100_000, 100_000), reasons.IMAGE_TOO_LARGE),  # past PIL's bomb limit
        (png_declaring(10_000, 10_000), reasons.IMAGE_TOO_LARGE),  # 1x-2x the limit: PIL only warns
        (SHORT_IHDR_PNG, reasons.CORRUPT_IMAGE),  # PIL raises ValueError, not OSError
    ],
    ids=["garbage", "empty", "truncated-png", "truncated-jpeg", "too-small", "bomb", "bomb-warning", "short-ihdr"],
)
def test_bad_images_raise_malformed_row(data, reason):
    with pytest.raises(MalformedRow) as problem:
        decode_image(data, 8)
    assert reason_of(problem) == reason


def test_decompression_bomb_limit_is_read_at_call_time(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 12x12 = 144 pixels is now "too large"
    with pytest.raises(MalformedRow) as problem:
        decode_image(solid(RED), 8)
    assert reason_of(problem) == reasons.IMAGE_TOO_LARGE


# --- Pick-a-Pic parquet --------------------------------------------------------------------
def test_label_0_picks_the_winner_and_ties_are_dropped(tmp_path):
    shard = write_shard(
        tmp_path / "train-0.parquet",
        [
            ("jpg_0 wins", solid(RED), solid(BLUE), 1.0),
            ("tie", solid(GREEN), solid(GREEN), 0.5),
            ("jpg_1 wins", solid(RED), solid(BLUE), 0.0),
        ],
    )
    ds = pickapic(shard)
    assert len(ds) == 2
    first, second = ds[0], ds[1]
    assert first["prompt"] == "jpg_0 wins" and is_solid(first["chosen"], RED) and is_solid(first["rejected"], BLUE)
    assert second["prompt"] == "jpg_1 wins" and is_solid(second["chosen"], BLUE) and is_solid(second["rejected"], RED)
    assert first["chosen"].shape == (3, 8, 8) and first["chosen"].dtype == torch.float32
    assert ds.report.ties_dropped == 1 and ds.report.rows_seen == 3 and ds.report.pairs == 2


def test_shards_from_directory_and_glob_in_order_across_row_groups(tmp_path):
    colors = [RED, GREEN, BLUE, BLACK, WHITE]
    # losers half black: a solid black loser would make pair b3 one picture twice, which is skipped
    write_shard(tmp_path / "b.parquet", [(f"b{i}", solid(c), halves(BLACK, WHITE), 1.0) for i, c in enumerate(colors)],
                row_group_size=2)
    write_shard(tmp_path / "a.parquet", [("a0", solid(WHITE), solid(RED), 0.0)])
    for path in (tmp_path, tmp_path / "*.parquet"):
        ds = pickapic(path)
        assert [ds[i]["prompt"] for i in range(len(ds))] == ["a0", "b0", "b1", "b2", "b3", "b4"]
        assert is_solid(ds[0]["chosen"], RED)
        for i, color in enumerate(colors):  # rows from three row groups, read in any order
            assert is_solid(ds[5 - i]["chosen"], colors[4 - i])
        assert ds.report.shards == 2


def test_row_group_ids_name_the_block_of_each_pair(tmp_path):
    write_shard(tmp_path / "a.parquet", [(f"a{i}", solid(RED), solid(BLUE), 1.0) for i in range(5)], row_group_size=2)
    write_shard(tmp_path / "b.parquet", [("tie", solid(RED), solid(BLUE), 0.5), ("b1", solid(RED), solid(BLUE), 0.0)])
    ds = pickapic(tmp_path)
    # a.parquet: row groups {0,1}, {2,3}, {4}; b.parquet: one row group (its row 1 survives).
    assert ds.row_group_ids().tolist() == [0, 0, 1, 1, 2, 3]


def test_max_pairs_counts_decided_pairs_across_shards(tmp_path):
    write_shard(tmp_path / "0.parquet", [("p0", solid(RED), solid(BLUE), 1.0), ("tie", solid(RED), solid(RED), 0.5)])
    write_shard(tmp_path / "1.parquet", [(f"p{i}", solid(RED), solid(BLUE), 0.0) for i in (1, 2, 3)])
    write_shard(tmp_path / "2.parquet", [("never read", solid(RED), solid(BLUE), 1.0)])
    ds = pickapic(tmp_path, max_pairs=3)
    assert len(ds) == 3
    assert [ds[i]["prompt"] for i in range(3)] == ["p0", "p1", "p2"]
    assert ds.report.rows_seen == 5  # the third shard is never opened


def test_missing_label_column_names_shard_and_required_columns(tmp_path):
    table = pa.table({"caption": ["x"], "jpg_0": [solid(RED)], "jpg_1": [solid(BLUE)]})
    pq.write_table(table, tmp_path / "nolabel.parquet")
    with pytest.raises(SipoError) as problem:
        pickapic(tmp_path / "nolabel.parquet")
    message = str(problem.value)
    assert "nolabel.parquet" in message and "lacks column label_0" in message
    assert "caption, jpg_0, jpg_1, label_0" in message


def test_wrong_column_type_is_a_clear_error(tmp_path):
    table = pa.table({"caption": ["x"], "jpg_0": ["not bytes"], "jpg_1": [solid(BLUE)], "label_0": [1.0]})
    pq.write_table(table, tmp_path / "s.parquet")
    with pytest.raises(SipoError, match="column jpg_0 holds string, expected image bytes"):
        pickapic(tmp_path)


def test_tie_only_dataset_says_so(tmp_path):
    write_shard(tmp_path / "s.parquet", [("t", solid(RED), solid(BLUE), 0.5)] * 3)
    with pytest.raises(SipoError, match=r"all 3 pairs .* are ties \(label_0 == 0.5\)"):
        pickapic(tmp_path)


@pytest.mark.parametrize(
    "relative, match",
    [
        ("missing.parquet", "does not exist; set data.path"),
        ("*.nothing", "matches no files"),
        ("empty_dir", "contains no .parquet files"),
        ("nested", "no .parquet files directly inside"),
    ],
)
def test_bad_paths_are_clear_errors(tmp_path, relative, match):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "nested" / "data").mkdir(parents=True)
    write_shard(tmp_path / "nested" / "data" / "train-0.parquet", [("x", solid(RED), solid(BLUE), 1.0)])
    with pytest.raises(SipoError, match=match):
        pickapic(tmp_path / relative)


def test_empty_path_is_a_clear_error():
    with pytest.raises(SipoError, match="data.path is empty"):
        pickapic("")
    with pytest.raises(SipoError, match="data.path is empty"):
        jsonl("")


def test_corrupt_shard_is_skipped_and_counted_or_stops_when_strict(tmp_path):
    write_shard(tmp_path / "good.parquet", [("ok", solid(RED), solid(BLUE), 1.0)])
    good_bytes = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(good_bytes[: len(good_bytes) // 2])
    ds = pickapic(tmp_path)
    assert len(ds) == 1 and ds[0]["prompt"] == "ok"
    assert ds.report.skipped == {reasons.UNREADABLE_SHARD: 1}
    assert "truncated.parquet" in ds.report.examples[reasons.UNREADABLE_SHARD][0]
    with pytest.raises(SipoError, match=r"truncated\.parquet.*unreadable parquet shard.*data\.strict=false"):
        pickapic(tmp_path, strict=True)
    (tmp_path / "good.parquet").unlink()
    with pytest.raises(SipoError, match="no valid pairs in"):
        pickapic(tmp_path)


def test_bad_rows_are_skipped_with_their_reason(tmp_path):
    write_shard(
        tmp_path / "s.parquet",
        [
            ("ok", solid(RED), solid(BLUE), 1.0),
            ("bad bytes", b"not an image", solid(BLUE), 1.0),
            (None, solid(RED), solid(BLUE), 1.0),
            ("null loser", solid(RED), None, 1.0),
            ("nan label", solid(RED), solid(BLUE), float("nan")),
            ("null label", solid(RED), solid(BLUE), None),
            ("label 2", solid(RED), solid(BLUE), 2.0),
            ("tiny", solid(RED, (4, 4)), solid(BLUE), 0.0),
        ],
    )
    ds = pickapic(tmp_path)
    assert len(ds) == 5  # the three bad labels never get an index
    items = [ds[i] for i in range(len(ds))]
    assert items[0]["prompt"] == "ok"
    assert [item.reason for item in items[1:]] == [
        reasons.CORRUPT_IMAGE,
        reasons.MISSING_FIELD,
        reasons.MISSING_FIELD,
        reasons.IMAGE_TOO_SMALL,
    ]
    assert [item.index for item in items[1:]] == [1, 2, 3, 4]
    assert ds.report.skipped == {
        reasons.INVALID_LABEL: 3,
        reasons.CORRUPT_IMAGE: 1,
        reasons.MISSING_FIELD: 2,
        reasons.IMAGE_TOO_SMALL: 1,
    }
    assert ds.report.used == 1


def test_strict_mode_raises_naming_row_and_reason(tmp_path):
    write_shard(tmp_path / "s.parquet", [("ok", solid(RED), solid(BLUE), 1.0), ("bad", b"junk", solid(BLUE), 0.0)])
    ds = pickapic(tmp_path, strict=True)
    assert ds[0]["prompt"] == "ok"
    with pytest.raises(SipoError, match=r"row 1 of shard .*s\.parquet.*\(corrupt image\); fix or remove it"):
        ds[1]
    write_shard(tmp_path / "s.parquet", [("ok", solid(RED), solid(BLUE), 1.0), ("bad", solid(RED), solid(BLUE), 7.0)])
    with pytest.raises(SipoError, match=r"row 1 of shard .*\(invalid label_0\)"):
        pickapic(tmp_path, strict=True)


def test_hugging_face_image_struct_column(tmp_path):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "caption": ["hf"],
            "jpg_0": pa.array([{"bytes": solid(RED), "path": None}], image_type),
            "jpg_1": pa.array([{"bytes": solid(BLUE), "path": None}], image_type),
            "label_0": [0.0],
        }
    )
    pq.write_table(table, tmp_path / "hf.parquet")
    item = pickapic(tmp_path)[0]
    assert is_solid(item["chosen"], BLUE) and is_solid(item["rejected"], RED)


def test_index_out_of_range_and_negative(tmp_path):
    write_shard(tmp_path / "s.parquet", [("a", solid(RED), solid(BLUE), 1.0), ("b", solid(RED), solid(BLUE), 1.0)])
    ds = pickapic(tmp_path)
    assert ds[-1]["prompt"] == "b" and ds[-1]["index"] == 1
    with pytest.raises(IndexError):
        ds[2]


def test_dataloader_workers_and_report_record(tmp_path):
    rows = [(f"p{i}", solid(RED), solid(BLUE), 1.0) for i in range(6)] + [("bad", b"junk", solid(BLUE), 1.0)]
    write_shard(tmp_path / "s.parquet", rows, row_group_size=3)
    ds = pickapic(tmp_path)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_pairs, num_workers=2)
    batches = list(loader)
    for batch in batches:
        ds.report.record(batch)
    assert [p for b in batches for p in b["prompts"]] == [f"p{i}" for i in range(6)]
    assert batches[0]["chosen"].shape == (4, 3, 8, 8) and batches[1]["chosen"].shape == (2, 3, 8, 8)
    assert ds.report.used == 6 and ds.report.skipped == {reasons.CORRUPT_IMAGE: 1}
    for batch in batches:  # a second epoch / double recording counts each row once
        ds.report.record(batch)
    assert ds.report.used == 6 and ds.report.skipped_total == 1


# --- JSONL manifests -----------------------------------------------------------------------
@pytest.fixture
def image_dir(tmp_path):
    (tmp_path / "root" / "img").mkdir(parents=True)
    (tmp_path / "root" / "img" / "red.png").write_bytes(solid(RED))
    (tmp_path / "root" / "img" / "blue.png").write_bytes(solid(BLUE))
    (tmp_path / "outside.png").write_bytes(solid(GREEN))
    return tmp_path / "root"


def test_jsonl_reads_relative_paths(image_dir):
    manifest = write_manifest(
        image_dir,
        [
            {"prompt": "a red thing", "chosen": "img/red.png", "rejected": "img/blue.png"},
            {"prompt": "blue", "chosen": "./img/../img/blue.png", "rejected": str(image_dir / "img" / "red.png")},
        ],
    )
    ds = jsonl(manifest)
    assert len(ds) == 2
    assert ds[0]["prompt"] == "a red thing" and is_solid(ds[0]["chosen"], RED) and is_solid(ds[0]["rejected"], BLUE)
    assert is_solid(ds[1]["chosen"], BLUE) and is_solid(ds[1]["rejected"], RED)  # absolute inside root is fine


def test_jsonl_paths_never_escape_the_root(image_dir):
    (image_dir / "img" / "link.png").symlink_to(image_dir.parent / "outside.png")
    manifest = write_manifest(
        image_dir,
        [
            {"prompt": "ok", "chosen": "img/red.png", "rejected": "img/blue.png"},
            {"prompt": "dotdot", "chosen": "../outside.png", "rejected": "img/blue.png"},
            {"prompt": "absolute", "chosen": "img/red.png", "rejected": str(image_dir.parent / "outside.png")},
            {"prompt": "etc", "chosen": "/etc/passwd", "rejected": "img/blue.png"},
            {"prompt": "symlink", "chosen": "img/link.png", "rejected": "img/blue.png"},
        ],
    )
    ds = jsonl(manifest)
    assert len(ds) == 2  # lexical escapes are dropped at open, the symlink when it is read
    assert ds[0]["prompt"] == "ok"
    assert ds[1] == SkippedRow(1, reasons.PATH_ESCAPES_ROOT, ds[1].where)
    assert ds.report.skipped == {reasons.PATH_ESCAPES_ROOT: 4}
    with pytest.raises(SipoError, match=r"line 2 of .*\(path escapes dataset root\)"):
        jsonl(manifest, strict=True)


def test_jsonl_malformed_lines_are_counted(image_dir):
    good = {"prompt": "ok", "chosen": "img/red.png", "rejected": "img/blue.png"}
    manifest = write_manifest(
        image_dir,
        [
            good,
            "{not json",
            "[1, 2]",
            "",  # blank lines are not rows
            {"prompt": "no rejected", "chosen": "img/red.png"},
            {"prompt": 3, "chosen": "img/red.png", "rejected": "img/blue.png"},
            {"prompt": "none", "chosen": None, "rejected": "img/blue.png"},
            {"prompt": "nul", "chosen": "img/red\u0000.png", "rejected": "img/blue.png"},
            {"prompt": "gone", "chosen": "img/missing.png", "rejected": "img/blue.png"},
            good,
        ],
    )
    ds = jsonl(manifest)
    assert len(ds) == 3
    assert ds[1].reason == reasons.MISSING_FILE and "missing.png" in ds[1].where
    assert ds.report.rows_seen == 9
    assert ds.report.skipped == {
        reasons.MALFORMED_JSON: 2,
        reasons.MISSING_FIELD: 1,
        reasons.WRONG_FIELD_TYPE: 2,
        reasons.INVALID_PATH: 1,
        reasons.MISSING_FILE: 1,
    }
    with pytest.raises(SipoError, match=r"line 2 of .*pairs\.jsonl is malformed \(malformed JSON line\)"):
        jsonl(manifest, strict=True)


def test_jsonl_strict_missing_file_raises_when_read(image_dir):
    manifest = write_manifest(image_dir, [{"prompt": "gone", "chosen": "img/missing.png", "rejected": "img/blue.png"}])
    ds = jsonl(manifest, strict=True)
    with pytest.raises(SipoError, match=r"line 1 of .*missing\.png.*\(missing file\)"):
        ds[0]


def test_jsonl_manifest_problems(image_dir):
    with pytest.raises(SipoError, match="does not exist; set data.path to a JSONL manifest"):
        jsonl(image_dir / "nope.jsonl")
    with pytest.raises(SipoError, match="is a directory"):
        jsonl(image_dir)
    manifest = write_manifest(image_dir, ["{}", "nonsense"])
    with pytest.raises(SipoError, match=r"no valid pairs in .*missing field: 1"):
        jsonl(manifest)


def test_jsonl_with_bom_and_crlf_line_endings(image_dir):
    row = json.dumps({"prompt": "é", "chosen": "img/red.png", "rejected": "img/blue.png"})
    manifest = image_dir / "windows.jsonl"
    manifest.write_bytes(b"\xef\xbb\xbf" + (row + "\r\n" + row + "\r\n").encode("utf-8"))
    ds = jsonl(manifest)
    assert len(ds) == 2 and ds[0]["prompt"] == "é" and ds.report.skipped_total == 0


def test_jsonl_max_pairs(image_dir):
    rows = [{"prompt": f"p{i}", "chosen": "img/red.png", "rejected": "img/blue.png"} for i in range(5)]
    ds = jsonl(write_manifest(image_dir, ["bad"] + rows), max_pairs=2)
    assert len(ds) == 2 and [ds[i]["prompt"] for i in range(2)] == ["p0", "p1"]


def make_gif(path: Path, colors) -> None:
    frames = [Image.new("RGB", (12, 12), color) for color in colors]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)


def test_gif_rows_are_videos(image_dir):
    make_gif(image_dir / "win.gif", [RED, GREEN, BLUE])
    make_gif(image_dir / "lose.gif", [BLACK, WHITE, BLACK])
    make_gif(image_dir / "short.gif", [BLACK, WHITE])
    manifest = write_manifest(
        image_dir,
        [
            {"prompt": "video", "chosen": "win.gif", "rejected": "lose.gif"},
            {"prompt": "mixed", "chosen": "win.gif", "rejected": "img/red.png"},
            {"prompt": "lengths", "chosen": "win.gif", "rejected": "short.gif"},
        ],
    )
    ds = jsonl(manifest)
    video = ds[0]
    assert video["chosen"].shape == (3, 3, 8, 8)
    for frame, color in zip(video["chosen"], (RED, GREEN, BLUE)):
        assert is_solid(frame, color)
    assert ds[1].reason == reasons.PAIR_KIND_MISMATCH and ds[2].reason == reasons.PAIR_KIND_MISMATCH
    batch = collate_pairs([video, video])
    assert batch["chosen"].shape == (2, 3, 3, 8, 8)


def test_mp4_without_pyav_is_skipped_with_the_install_hint(image_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    (image_dir / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    manifest = write_manifest(image_dir, [{"prompt": "v", "chosen": "clip.mp4", "rejected": "clip.mp4"}])
    assert jsonl(manifest)[0].reason == "video support needs `pip install av`"


def write_mp4(path: Path, colors, size=16) -> None:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for color in colors:
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), color, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_mp4_rows_decode_with_pyav(image_dir):
    # Runs where PyAV is installed (`pip install av`); skipped otherwise.
    write_mp4(image_dir / "win.mp4", [RED, GREEN, BLUE])
    write_mp4(image_dir / "lose.mp4", [WHITE, WHITE, BLACK])
    (image_dir / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    manifest = write_manifest(
        image_dir,
        [
            {"prompt": "video", "chosen": "win.mp4", "rejected": "lose.mp4"},
            {"prompt": "broken", "chosen": "broken.mp4", "rejected": "lose.mp4"},
        ],
    )
    ds = jsonl(manifest)
    video = ds[0]
    assert video["chosen"].shape == (3, 3, 8, 8) and video["rejected"].shape == (3, 3, 8, 8)
    for frame, color in zip(video["chosen"], (RED, GREEN, BLUE)):  # lossy codec: close, not equal
        assert torch.allclose(frame, rgb_of(color)[:, None, None].expand(3, 8, 8), atol=0.15)
    assert ds[1].reason == reasons.UNREADABLE_VIDEO


def test_corrupt_gif_is_an_unreadable_video(image_dir):
    (image_dir / "bad.gif").write_bytes(b"GIF89a" + bytes(range(7, 47)))
    manifest = write_manifest(image_dir, [{"prompt": "v", "chosen": "bad.gif", "rejected": "bad.gif"}])
    assert jsonl(manifest)[0].reason == reasons.UNREADABLE_VIDEO


# --- flips, collate, report ----------------------------------------------------------------
def test_random_flip_mirrors_both_pictures_reproducibly(tmp_path):
    rows = [(f"p{i}", halves(RED, BLUE), halves(GREEN, BLACK), 1.0) for i in range(24)]
    write_shard(tmp_path / "s.parquet", rows)

    def flipped(ds) -> list[bool]:
        pattern = []
        for i in range(len(ds)):
            item = ds[i]
            chosen_flipped = torch.allclose(item["chosen"][:, 0, 0], rgb_of(BLUE))
            rejected_flipped = torch.allclose(item["rejected"][:, 0, 0], rgb_of(BLACK))
            assert chosen_flipped == rejected_flipped  # the pair moves together
            pattern.append(chosen_flipped)
        return pattern

    ds = pickapic(tmp_path, random_flip=True)
    first = flipped(ds)
    assert 0 < sum(first) < len(first)
    assert flipped(pickapic(tmp_path, random_flip=True)) == first  # reproducible on reopen
    assert first == [flip_decision(0, 0, i) for i in range(24)]
    ds.set_epoch(1)
    assert flipped(ds) != first
    assert not any(flipped(pickapic(tmp_path)))  # off by default


def test_flip_decision_is_balanced_and_seeded():
    decisions = [flip_decision(7, 0, i) for i in range(4000)]
    assert 0.45 < sum(decisions) / len(decisions) < 0.55
    assert decisions != [flip_decision(8, 0, i) for i in range(4000)]


def test_collate_sets_skipped_rows_aside(tmp_path):
    write_shard(tmp_path / "s.parquet", [("a", solid(RED), solid(BLUE), 1.0), ("bad", b"x", solid(BLUE), 1.0), ("c", solid(GREEN), solid(BLUE), 1.0)])
    ds = pickapic(tmp_path)
    batch = collate_pairs([ds[0], ds[1], ds[2]])
    assert batch["prompts"] == ["a", "c"] and batch["indices"] == [0, 2]
    assert batch["chosen"].shape == (2, 3, 8, 8) and batch["rejected"].shape == (2, 3, 8, 8)
    assert is_solid(batch["chosen"][1], GREEN)
    assert [row.index for row in batch["skipped"]] == [1]
    empty = collate_pairs([ds[1]])
    assert empty["chosen"] is None and empty["rejected"] is None
    assert empty["prompts"] == [] and len(empty["skipped"]) == 1


def test_collate_refuses_videos_of_different_lengths():
    short = {"prompt": "a", "chosen": torch.zeros(2, 3, 8, 8), "rejected": torch.zeros(2, 3, 8, 8), "index": 0}
    long = {"prompt": "b", "chosen": torch.zeros(3, 3, 8, 8), "rejected": torch.zeros(3, 3, 8, 8), "index": 1}
    with pytest.raises(SipoError, match="train.batch_size=1"):
        collate_pairs([short, long])


def test_report_summary_and_dict(tmp_path):
    write_shard(
        tmp_path / "s.parquet",
        [("a", solid(RED), solid(BLUE), 1.0), ("t", solid(RED), solid(BLUE), 0.5), ("bad", b"x", solid(BLUE), 0.0)],
    )
    ds = pickapic(tmp_path)
    assert isinstance(ds.report, DataReport)
    for i in range(len(ds)):
        ds[i]
    summary = ds.report.to_dict()
    assert summary == {
        "source": str(tmp_path),
        "format": "pickapic",
        "shards": 1,
        "rows_seen": 3,
        "ties_dropped": 1,
        "pairs": 2,
        "used": 1,
        "skipped_total": 1,
        "skipped": {reasons.CORRUPT_IMAGE: 1},
        "examples": {reasons.CORRUPT_IMAGE: [summary["examples"][reasons.CORRUPT_IMAGE][0]]},
    }
    assert "row 2 of shard" in summary["examples"][reasons.CORRUPT_IMAGE][0]
    text = str(ds.report)
    assert "3 rows in 1 shard" in text and "1 ties dropped" in text and "2 pairs" in text
    assert "1 loaded" in text and "1 skipped (corrupt image: 1)" in text
    json.dumps(summary)  # plain values only
