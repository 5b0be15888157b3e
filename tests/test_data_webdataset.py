"""data.format=webdataset: tar shards of KEY.txt/.json + KEY.chosen.* + KEY.rejected.*, brace lists, skips.

The shards are written by the test with the standard library's tarfile; expected pixels are the
hand-computed x / 127.5 - 1 of the solid 8-bit colours written here.
"""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from sipo.config import DataConfig, load_config
from sipo.data import open_preference_dataset
from sipo.data import report as reasons
from sipo.data.webdataset import expand_braces
from sipo.errors import SipoError

RED, GREEN, BLUE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)


def png(color, size=(10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def is_solid(picture: torch.Tensor, color) -> bool:
    expected = torch.tensor(color, dtype=torch.float32) / 127.5 - 1.0
    return torch.allclose(picture, expected[:, None, None].expand_as(picture), atol=1e-6)


def write_shard(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def wds(path, **extra) -> DataConfig:
    return DataConfig(format="webdataset", path=str(path), **extra)


@pytest.fixture
def shards(tmp_path):
    """Three shards of two samples each; the second shard's prompts are JSON."""
    colors = [RED, GREEN, BLUE, RED, GREEN, BLUE]
    for shard in range(3):
        members = {}
        for j in range(2):
            key = f"{shard * 2 + j:06d}"
            if shard == 1:
                members[f"{key}.json"] = json.dumps({"prompt": f"pair {key}"}).encode()
            else:
                members[f"{key}.txt"] = f"pair {key}\n".encode()
            members[f"{key}.chosen.png"] = png(colors[shard * 2 + j])
            members[f"{key}.rejected.png"] = png(BLACK)
        write_shard(tmp_path / f"pairs-{shard:04d}.tar", members)
    return tmp_path


def test_brace_expansion():
    assert expand_braces("a-{00..02}.tar") == ["a-00.tar", "a-01.tar", "a-02.tar"]
    assert expand_braces("{x,y}/s{1..2}") == ["x/s1", "x/s2", "y/s1", "y/s2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(SipoError, match="never closes"):
        expand_braces("a-{00..02.tar")


def test_reads_pairs_from_a_brace_list_in_order(shards):
    ds = open_preference_dataset(wds(shards / "pairs-{0000..0002}.tar"), resolution=4)
    assert len(ds) == 6 and ds.report.shards == 3
    for i, color in enumerate([RED, GREEN, BLUE, RED, GREEN, BLUE]):
        item = ds[i]
        assert item["prompt"] == f"pair {i:06d}"
        assert is_solid(item["chosen"], color) and is_solid(item["rejected"], BLACK)
        assert item["size_info"].tolist()[:2] == [10, 10]
    # a folder and a glob name the same shards; a sub-list only some
    assert len(open_preference_dataset(wds(shards), resolution=4)) == 6
    assert len(open_preference_dataset(wds(shards / "pairs-*.tar"), resolution=4)) == 6
    assert len(open_preference_dataset(wds(shards / "pairs-{0000,0002}.tar"), resolution=4)) == 4


def test_incomplete_corrupt_and_unreadable_samples_are_skipped_and_counted(tmp_path):
    write_shard(tmp_path / "a.tar", {
        "good.txt": b"good", "good.chosen.png": png(RED), "good.rejected.png": png(BLACK),
        "nochosen.txt": b"x", "nochosen.rejected.png": png(BLACK),
        "corrupt.txt": b"x", "corrupt.chosen.png": b"not a png", "corrupt.rejected.png": png(BLACK),
        "badjson.json": b"{", "badjson.chosen.png": png(RED), "badjson.rejected.png": png(BLACK),
    })
    (tmp_path / "b.tar").write_bytes(b"this is not a tar file" * 40)
    ds = open_preference_dataset(wds(tmp_path), resolution=4)
    assert len(ds) == 3 and ds.report.rows_seen == 4
    assert ds.report.index_skips[reasons.MISSING_FIELD] == 1
    assert ds.report.index_skips[reasons.UNREADABLE_TAR] == 1
    assert ds[0]["prompt"] == "good"
    assert ds[1].reason == reasons.CORRUPT_IMAGE and ds[2].reason == reasons.MALFORMED_JSON
    with pytest.raises(SipoError, match="malformed"):
        open_preference_dataset(wds(tmp_path, strict=True), resolution=4)


def test_bad_paths_stop_with_one_sentence(tmp_path):
    with pytest.raises(SipoError, match=r"names .*pairs-0003.tar, which does not exist"):
        open_preference_dataset(wds(tmp_path / "pairs-{0003..0004}.tar"), resolution=4)
    (tmp_path / "c.tar.gz").write_bytes(b"x")
    with pytest.raises(SipoError, match="compressed tar.*uncompress"):
        open_preference_dataset(wds(tmp_path / "c.tar.gz"), resolution=4)
    write_shard(tmp_path / "empty.tar", {"x.txt": b"only a prompt"})
    with pytest.raises(SipoError, match="no valid pairs .* KEY.chosen.jpg"):
        open_preference_dataset(wds(tmp_path / "empty.tar"), resolution=4)


def test_videos_for_an_image_model_are_dropped_at_open(tmp_path):
    write_shard(tmp_path / "v.tar", {
        "p.txt": b"picture", "p.chosen.png": png(RED), "p.rejected.png": png(BLACK),
        "v.txt": b"clip", "v.chosen.mp4": b"...", "v.rejected.mp4": b"...",
    })
    ds = open_preference_dataset(wds(tmp_path / "v.tar"), resolution=4, family="sd15")
    assert len(ds) == 1 and ds.report.index_skips[reasons.NOT_A_PICTURE] == 1


def test_cache_key_and_resume_fingerprint_see_the_shards(shards):
    from sipo.checkpoints import data_signature
    from sipo.data.cache import cache_identity

    pattern = str(shards / "pairs-{0000..0002}.tar")
    config = load_config(None, ["data.format=webdataset", f"data.path={pattern}"])
    assert len(cache_identity(config)["data"]["files"]) == 3
    assert data_signature(pattern).startswith("3 files")
    before = data_signature(pattern)
    write_shard(shards / "pairs-0001.tar", {"k.txt": b"changed", "k.chosen.png": png(RED), "k.rejected.png": png(GREEN)})
    assert data_signature(pattern) != before


def test_trains_two_steps_from_shards_with_a_worker(tiny_sd15_dir, tmp_path):
    import numpy as np

    from sipo.train import train
    from train_fixtures import tiny_overrides

    rng = np.random.default_rng(0)
    for shard in range(2):
        members = {}
        for j in range(3):
            key = f"{shard}{j:05d}"
            members[f"{key}.txt"] = f"a gradient {key}".encode()
            ramp = np.linspace(0, 255, 32)[None, :, None].repeat(32, 0).repeat(3, 2).astype(np.uint8)
            for side, pixels in (("chosen", ramp), ("rejected", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))):
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, "PNG")
                members[f"{key}.{side}.png"] = buffer.getvalue()
        write_shard(tmp_path / f"train-{shard}.tar", members)
    overrides = tiny_overrides(tiny_sd15_dir, tmp_path / "train-{0..1}.tar", tmp_path / "run",
                               **{"data.format": "webdataset", "data.num_workers": 1})
    result = train(load_config(None, overrides), progress=False)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert result.steps == 2 and report["pairs"] == 6 and report["shards"] == 2 and report["used"] == 4
