"""Pairs that share an input image (the ``input_image`` column; docs/data.md), in every format.

Expected pixels are solid colours written here, so the decoded input image is checked against the colour by
hand; skips are checked in the data report, and a mismatch between the data and the family (pairs without
input images for an edit / image-to-video family, pairs with them for a text-only family) stops in one sentence.
"""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from sipo.data import HfDataset, JsonlDataset, WebDataset, collate_pairs
from sipo.data.decode import decode_input_image
from sipo.data.pairs import encode_extras, flip_decision
from sipo.data.report import CORRUPT_IMAGE, MISSING_FIELD, MISSING_FILE
from sipo.data.video import VideoSpec
from sipo.errors import SipoError

SIDE = 16


def png(color, size=(SIDE, SIDE)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def solid(color, height=SIDE, width=SIDE) -> torch.Tensor:
    """A solid picture in [-1, 1] as the decoder gives it, by hand."""
    return (torch.tensor(color, dtype=torch.float32) / 127.5 - 1).view(3, 1, 1).expand(3, height, width)


def half_and_half(path) -> None:
    """Left half red, right half blue: a horizontal mirror is visible."""
    image = Image.new("RGB", (SIDE, SIDE), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, SIDE // 2, SIDE))
    image.save(path)


def write_manifest(folder, rows) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for name, color in (("c.png", (200, 10, 10)), ("r.png", (10, 200, 10)), ("in.png", (10, 10, 200))):
        (folder / name).write_bytes(png(color))
    (folder / "bad.png").write_bytes(b"not a png")
    half_and_half(folder / "halves.png")
    manifest = folder / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(manifest)


ROW = {"prompt": "make it blue", "chosen": "c.png", "rejected": "r.png"}


def test_jsonl_input_image_reaches_the_batch_and_bad_ones_are_counted(tmp_path):
    manifest = write_manifest(tmp_path, [
        {**ROW, "input_image": "in.png"},
        {**ROW, "input_image": "gone.png"},
        {**ROW, "input_image": "bad.png"},
        ROW,  # no input_image: the conditioned family needs one
    ])
    data = JsonlDataset(manifest, SIDE, family="qwenimage_edit")
    items = [data[i] for i in range(4)]
    torch.testing.assert_close(items[0]["input_image"], solid((10, 10, 200)), rtol=0, atol=1e-6)
    reasons = [getattr(item, "reason", None) for item in items]
    assert reasons == [None, MISSING_FILE, CORRUPT_IMAGE, MISSING_FIELD]
    assert "input_image 'gone.png'" in items[1].where
    assert data.report.skipped == {MISSING_FILE: 1, CORRUPT_IMAGE: 1, MISSING_FIELD: 1} and data.report.used == 1
    batch = collate_pairs(items)
    assert batch["input_image"].shape == (1, 3, SIDE, SIDE)
    assert encode_extras(batch)["input_images"] is batch["input_image"]


def test_a_random_flip_mirrors_the_input_image_with_its_pair(tmp_path):
    manifest = write_manifest(tmp_path, [{**ROW, "input_image": "halves.png"}] * 8)
    data = JsonlDataset(manifest, SIDE, random_flip=True, seed=3, family="qwenimage_edit")
    flips = [flip_decision(3, 0, i) for i in range(8)]
    assert any(flips) and not all(flips)
    for index, flipped in enumerate(flips):
        left_red = data[index]["input_image"][0, 0, 0] > 0
        assert bool(left_red) == (not flipped)


def test_the_family_and_the_data_must_agree_on_input_images(tmp_path):
    with_inputs = write_manifest(tmp_path / "with", [{**ROW, "input_image": "in.png"}])
    without = write_manifest(tmp_path / "without", [ROW])
    with pytest.raises(SipoError, match="model.family=sd15 generates from text alone"):
        JsonlDataset(with_inputs, SIDE, family="sd15")
    with pytest.raises(SipoError, match="model.family=qwenimage_edit edits or animates an input image, and the pairs"):
        JsonlDataset(without, SIDE, family="qwenimage_edit")
    assert "input_image" not in JsonlDataset(without, SIDE, family="sd15")[0]  # plain pairs stay plain
    assert "input_image" in JsonlDataset(with_inputs, SIDE)[0]  # no family given: the data decides


def test_a_video_familys_input_image_is_one_frame_of_its_clips():
    """For a video family the input image takes a clip frame's size (data.height x data.width), by the frames' geometry."""
    picture = decode_input_image(png((10, 20, 30), size=(48, 20)), 32, VideoSpec(num_frames=9, height=16, width=24), "video")
    torch.testing.assert_close(picture, solid((10, 20, 30), 16, 24), rtol=0, atol=1e-6)
    from sipo.data.decode import MalformedRow

    with pytest.raises(MalformedRow, match="a video clip where the model needs a picture"):
        decode_input_image("first.mp4", 32, None, "video")


def test_hf_input_image_column_by_default_and_by_mapping(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"prompt": ["a", "b"], "chosen": [png((200, 0, 0))] * 2, "rejected": [png((0, 200, 0))] * 2,
            "source": [png((0, 0, 200)), None]}
    datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / "mapped")
    data = HfDataset(str(tmp_path / "mapped"), SIDE, columns={"input_image": "source"}, family="qwenimage_edit")
    torch.testing.assert_close(data[0]["input_image"], solid((0, 0, 200)), rtol=0, atol=1e-6)
    assert data[1].reason == MISSING_FIELD  # a null cell is a skipped, counted row
    renamed = dict(rows, input_image=rows.pop("source"))
    datasets.Dataset.from_dict(renamed).save_to_disk(tmp_path / "default")
    assert "input_image" in HfDataset(str(tmp_path / "default"), SIDE)[0]
    with pytest.raises(SipoError, match="model.family=sd15 generates from text alone"):
        HfDataset(str(tmp_path / "default"), SIDE, family="sd15")
    with pytest.raises(SipoError, match="edits or animates an input image, and the pairs"):
        HfDataset(str(tmp_path / "mapped"), SIDE, family="qwenimage_edit", columns={})


def test_webdataset_key_input_member(tmp_path):
    shard = tmp_path / "pairs.tar"
    members = {"000.txt": b"make it blue", "000.chosen.png": png((200, 0, 0)), "000.rejected.png": png((0, 200, 0)),
               "000.input.png": png((0, 0, 200)),
               "001.txt": b"no input", "001.chosen.png": png((200, 0, 0)), "001.rejected.png": png((0, 200, 0))}
    with tarfile.open(shard, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    data = WebDataset(str(shard), SIDE, family="qwenimage_edit")
    torch.testing.assert_close(data[0]["input_image"], solid((0, 0, 200)), rtol=0, atol=1e-6)
    assert data[1].reason == MISSING_FIELD
    with pytest.raises(SipoError, match="generates from text alone"):
        WebDataset(str(shard), SIDE, family="sd15")


def test_validation_prompts_alone_stop_for_a_family_that_needs_an_input_image(tmp_path):
    from sipo.config import load_config
    from sipo.validation import SampleValidation

    config = load_config(None, ["model.family=qwenimage_edit", "train.validation_prompts=[a cat]"])
    with pytest.raises(SipoError, match="train.validation_prompts samples from prompts alone"):
        SampleValidation(config, tmp_path, best=None, device="cpu")


def test_pickapic_shards_stop_for_a_family_that_needs_an_input_image():
    from sipo.config import DataConfig
    from sipo.data import open_preference_dataset

    with pytest.raises(SipoError, match="data.format=pickapic holds text-to-image pairs"):
        open_preference_dataset(DataConfig(format="pickapic", path="unused"), SIDE, family="qwenimage_edit")
