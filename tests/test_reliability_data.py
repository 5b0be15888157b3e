"""Issue 17, the data side: faults a new user met in the data, the latent cache and the resume
fingerprint, each reproduced first (every test here fails on the code before the fix).

Items: 4 (a JSONL cache keyed on the manifest only), 5 (the fingerprint holds the model's path,
not its files), 6 (train-/validation-/test- shards side by side), 8 and 15 (a bit-flipped or
truncated cache shard), 11 (identical pair files), 19 (a video family given an image manifest),
24 (an absurd resolution; a still GIF), and issue 16's import circle data/decode.py <-> video.py.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import sipo
from sipo import rundir
from sipo.checkpoints import TrainState, run_fingerprint, save_checkpoint
from sipo.config import DataConfig, load_config
from sipo.data import SkippedRow, open_preference_dataset
from sipo.data import report as reasons
from sipo.data.cache import MANIFEST, build_cache, cache_location, open_cache, open_cache_for_training
from sipo.errors import SipoError
from sipo.evaluate import read_prompts
from train_fixtures import tiny_overrides, write_jsonl_pairs

RESOLUTION = 16


def _config(model_dir: Path, manifest: Path, output_dir: Path, **extra):
    return load_config(None, tiny_overrides(model_dir, manifest, output_dir, **extra))


def _one_sentence(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message and message.count("; ") >= 1, message


def _png(path: Path, color: tuple[int, int, int], size: int = RESOLUTION) -> Path:
    Image.new("RGB", (size, size), color).save(path)
    return path


def _manifest(directory: Path, rows: list[tuple[str, str]]) -> Path:
    path = directory / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": c, "rejected": r}) + "\n"
                            for i, (c, r) in enumerate(rows)))
    return path


# ----------------------------------------------------------------------------- the latent cache
@pytest.fixture
def cached_pairs(tiny_sd15_dir, tiny_sd15_adapter, tmp_path):
    """A 4-pair JSONL dataset with its latent cache built in 2 shards; returns (config, manifest, location)."""
    manifest = write_jsonl_pairs(tmp_path / "pairs", num_pairs=4)
    config = _config(tiny_sd15_dir, manifest, tmp_path / "run", **{"data.use_cache": "always"})
    location = build_cache(config, adapter=tiny_sd15_adapter, progress=False, shard_pairs=2)
    assert open_cache(config) is not None
    return config, manifest, location


def _auto(config):
    return load_config(None, [f"{k}={v}" for k, v in _flat(config).items()] + ["data.use_cache=auto"])


def _flat(config) -> dict:
    return {f"{section}.{key}": value for section, values in config.to_dict().items()
            for key, value in values.items() if value is not None}


def _open_for_training(config) -> tuple[object, list[str]]:
    lines: list[str] = []
    dataset = open_preference_dataset(config.data, config.model.resolution, seed=config.train.seed)
    return open_cache_for_training(config, dataset, log=lines.append), lines


def test_regenerated_pictures_under_the_same_names_invalidate_the_jsonl_cache(cached_pairs, tiny_sd15_dir):
    # item 4: an on-policy refresh rewrites 001_chosen.png; the manifest's text stays byte for byte the same
    config, manifest, location = cached_pairs
    picture = manifest.parent / "001_chosen.png"
    before = picture.stat()
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(picture)
    os.utime(picture, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # a later mtime, as a rewrite has
    assert cache_location(config) != location
    with pytest.raises(SipoError) as info:
        _open_for_training(config)
    message = str(info.value)
    _one_sentence(message)
    assert "`sipo cache --config FILE`" in message and "pictures" in message
    cached, lines = _open_for_training(_auto(config))
    assert cached is None  # auto: the pictures, never the old latents
    assert any("encoding pictures every step" in line and "pictures" in line for line in lines), lines


def _flip_one_byte(path: Path, offset_from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01  # inside the tensor data (the header is at the start): safetensors reads it fine
    path.write_bytes(bytes(data))


def test_a_bit_flipped_cache_shard_stops_or_falls_back_and_sipo_cache_repairs_it(cached_pairs, tiny_sd15_adapter):
    # item 8: one bit flipped in shard 1's latents; the old code trained on the flipped value silently
    config, _, location = cached_pairs
    shard = location / "shard-00001.safetensors"
    good = {name: value.clone() for name, value in load_file(shard).items()}  # load_file maps the file
    _flip_one_byte(shard)
    flipped = load_file(shard)  # still a valid safetensors file: only a checksum can tell
    assert any(not torch.equal(good[k], flipped[k]) for k in good)
    with pytest.raises(SipoError) as info:
        _open_for_training(config)
    message = str(info.value)
    _one_sentence(message)
    assert "shard-00001.safetensors" in message and "sha256" in message and "`sipo cache --config FILE`" in message
    cached, lines = _open_for_training(_auto(config))
    assert cached is None and any("damaged" in line for line in lines), lines
    # the rebuild command re-encodes the damaged shard only, and the cache is whole again
    kept = (location / "shard-00000.safetensors").stat().st_mtime_ns
    build_cache(config, adapter=tiny_sd15_adapter, progress=False, shard_pairs=2)
    assert (location / "shard-00000.safetensors").stat().st_mtime_ns == kept
    repaired = load_file(shard)
    for key in good:
        torch.testing.assert_close(repaired[key], good[key], rtol=0, atol=1e-6)
    cached, _ = _open_for_training(config)
    assert cached is not None and len(cached) == 4


def test_a_truncated_cache_shard_is_one_sentence_and_auto_falls_back(cached_pairs):
    # item 15: the old code raised safetensors' SafetensorError from inside CachedPairs
    config, _, location = cached_pairs
    shard = location / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(SipoError) as info:
        _open_for_training(config)
    _one_sentence(str(info.value))
    assert "shard-00000.safetensors" in str(info.value) and "bytes" in str(info.value)
    cached, lines = _open_for_training(_auto(config))
    assert cached is None and any("damaged" in line for line in lines), lines


def test_an_unreadable_cache_manifest_is_a_damaged_cache(cached_pairs):
    config, _, location = cached_pairs
    (location / MANIFEST).write_text('{"key": ')  # a write cut short
    with pytest.raises(SipoError, match="is damaged .*`sipo cache --config FILE`"):
        _open_for_training(config)


def test_no_cache_folder_at_all_is_still_one_sentence_under_always(tiny_sd15_dir, tmp_path):
    # the key is not computed when no cache folder exists: the message must not change for that
    manifest = write_jsonl_pairs(tmp_path / "pairs", num_pairs=2)
    config = _config(tiny_sd15_dir, manifest, tmp_path / "run", **{"data.use_cache": "always"})
    with pytest.raises(SipoError, match=r"no latent cache under .*\.sipo-cache; run `sipo cache --config FILE`"):
        _open_for_training(config)
    assert _open_for_training(_auto(config)) == (None, [])  # auto, nothing to say


# ----------------------------------------------------------------------------- the resume fingerprint
def test_resume_after_replacing_the_base_weights_in_place_stops(tiny_sd15_dir, tmp_path):
    # item 5: the same path, other weights; the old fingerprint held only the path
    model = tmp_path / "model"
    shutil.copytree(tiny_sd15_dir, model)
    manifest = write_jsonl_pairs(tmp_path / "pairs", num_pairs=2)
    run = tmp_path / "run"
    config = _config(model, manifest, run)
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(run, {"w": param}, optimizer, scheduler, TrainState(step=1, micro_batches=1),
                    torch.Generator().manual_seed(0), keep_last=1, fingerprint=run_fingerprint(config))
    rundir.choose_resume_checkpoint(run, run_fingerprint(config))  # unchanged: resumes

    weights = next(model.glob("unet/*.safetensors"))
    tensors = load_file(weights)
    save_file({name: value + 1 for name, value in tensors.items()}, str(weights))  # new base weights, same name
    with pytest.raises(SipoError) as info:
        rundir.choose_resume_checkpoint(run, run_fingerprint(config))
    message = str(info.value)
    _one_sentence(message)
    assert "model.files" in message and "resume=True refused" in message  # str(): the Python form


def test_building_a_cache_beside_the_data_does_not_change_the_data_fingerprint(tmp_path):
    # found on the way: data.files hashed .sipo-cache/ too, so `sipo cache` between a run and its --resume refused it
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    _pickapic_shard(shard_dir / "a.parquet", ["x", "y"])
    config = load_config(None, [f"data.path={shard_dir}", "data.format=pickapic"])
    before = run_fingerprint(config)["data.files"]
    (shard_dir / ".sipo-cache" / "0123").mkdir(parents=True)
    (shard_dir / ".sipo-cache" / "0123" / "shard-00000.safetensors").write_bytes(b"latents")
    assert run_fingerprint(config)["data.files"] == before


# ----------------------------------------------------------------------------- Pick-a-Pic splits
def _encoded(color: tuple[int, int, int]) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (RESOLUTION, RESOLUTION), color).save(buffer, "PNG")
    return buffer.getvalue()


def _pickapic_shard(path: Path, captions: list[str], same_pictures: bool = False) -> None:
    first, second = _encoded((255, 0, 0)), _encoded((255, 0, 0) if same_pictures else (0, 0, 255))
    pq.write_table(pa.table({"caption": captions, "jpg_0": [first] * len(captions),
                             "jpg_1": [second] * len(captions), "label_0": [1.0] * len(captions)}), path)


def _captions(dataset) -> list[str]:
    return [dataset[i]["prompt"] for i in range(len(dataset))]


def test_split_named_shards_train_on_train_only_and_eval_reads_only_test(tmp_path):
    # item 6: the hub layout of pickapic_v2/data; the old code read all three splits for both
    hub = tmp_path / "data"
    hub.mkdir()
    _pickapic_shard(hub / "train-00000-of-00002-aa.parquet", ["train a"])
    _pickapic_shard(hub / "train-00001-of-00002-bb.parquet", ["train b"])
    _pickapic_shard(hub / "validation-00000-of-00001-cc.parquet", ["validation a"])
    _pickapic_shard(hub / "test-00000-of-00001-dd.parquet", ["test a", "test b"])
    assert _captions(open_preference_dataset(DataConfig(format="pickapic", path=str(hub)), RESOLUTION)) == [
        "train a", "train b"]
    assert _captions(open_preference_dataset(DataConfig(format="pickapic", path=str(hub), split="validation"),
                                             RESOLUTION)) == ["validation a"]
    glob = str(hub / "*.parquet")
    assert _captions(open_preference_dataset(DataConfig(format="pickapic", path=glob), RESOLUTION)) == ["train a", "train b"]
    assert read_prompts("pickapic-test", pickapic_path=str(hub)) == ["test a", "test b"]
    with pytest.raises(SipoError) as info:
        open_preference_dataset(DataConfig(format="pickapic", path=str(hub), split="dev"), RESOLUTION)
    _one_sentence(str(info.value))
    assert "data.split" in str(info.value) and "test, train, validation" in str(info.value)
    # files without a split name keep working as before
    plain = tmp_path / "plain"
    plain.mkdir()
    _pickapic_shard(plain / "shard-000.parquet", ["plain a"])
    assert _captions(open_preference_dataset(DataConfig(format="pickapic", path=str(plain)), RESOLUTION)) == ["plain a"]
    assert read_prompts("pickapic-test", pickapic_path=str(plain)) == ["plain a"]


# ----------------------------------------------------------------------------- identical pairs
def test_a_pair_of_one_picture_is_skipped_and_counted(tmp_path):
    # item 11: the same file twice, and two files with the same bytes: no preference, skipped
    _png(tmp_path / "red.png", (255, 0, 0))
    shutil.copyfile(tmp_path / "red.png", tmp_path / "red_copy.png")
    _png(tmp_path / "blue.png", (0, 0, 255))
    manifest = _manifest(tmp_path, [("red.png", "red.png"), ("red.png", "red_copy.png"), ("red.png", "blue.png")])
    dataset = open_preference_dataset(DataConfig(format="jsonl", path=str(manifest)), RESOLUTION)
    items = [dataset[i] for i in range(3)]
    assert [item.reason for item in items[:2]] == [reasons.IDENTICAL_PAIR] * 2
    assert not isinstance(items[2], SkippedRow)
    assert dataset.report.skipped == {reasons.IDENTICAL_PAIR: 2} and dataset.report.used == 1
    shards = tmp_path / "shards"
    shards.mkdir()
    _pickapic_shard(shards / "s.parquet", ["same", "same again"], same_pictures=True)
    _pickapic_shard(shards / "t.parquet", ["different"])
    pick = open_preference_dataset(DataConfig(format="pickapic", path=str(shards)), RESOLUTION)
    assert [getattr(pick[i], "reason", None) for i in range(3)] == [reasons.IDENTICAL_PAIR] * 2 + [None]
    with pytest.raises(SipoError, match="chosen and rejected are the same picture"):
        open_preference_dataset(DataConfig(format="jsonl", path=str(manifest), strict=True), RESOLUTION)[0]


# ----------------------------------------------------------------------------- images and videos
def _gif(path: Path, colors: list[tuple[int, int, int]], size: int = RESOLUTION) -> Path:
    frames = [Image.new("RGB", (size, size), color) for color in colors]
    frames[0].save(path, save_all=len(frames) > 1, append_images=frames[1:], duration=125, loop=0)
    return path


def test_a_video_family_given_an_image_manifest_stops_at_opening(tmp_path, tiny_sd15_dir):
    # item 19: the old code opened the dataset and failed later on a tensor shape
    _png(tmp_path / "a.png", (255, 0, 0))
    _png(tmp_path / "b.png", (0, 0, 255))
    manifest = _manifest(tmp_path, [("a.png", "b.png")])
    cfg = DataConfig(format="jsonl", path=str(manifest))
    with pytest.raises(SipoError) as info:
        open_preference_dataset(cfg, RESOLUTION, family="cogvideox")
    message = str(info.value)
    _one_sentence(message)
    assert "model.family=cogvideox" in message and "video clips" in message and "data.path" in message
    # `sipo cache` opens the data the same way, before any model is loaded
    config = _config(tiny_sd15_dir, manifest, tmp_path / "run", **{"model.family": "wan"})
    with pytest.raises(SipoError, match="model.family=wan"):
        build_cache(config, progress=False)
    # and the other way round: clips for an image family (opening reads names only: the files need not exist)
    clips = _manifest(tmp_path, [("w.mp4", "l.mp4"), ("w.webm", "l.webm")])
    with pytest.raises(SipoError, match="model.family=sd15 trains on pictures"):
        open_preference_dataset(DataConfig(format="jsonl", path=str(clips)), RESOLUTION, family="sd15")
    # a GIF may be either: an animated one in an image family's data is skipped when it is read
    _gif(tmp_path / "w.gif", [(255, 0, 0), (0, 255, 0)])
    _gif(tmp_path / "l.gif", [(0, 0, 255), (0, 0, 0)])
    animated = _manifest(tmp_path, [("w.gif", "l.gif")])
    assert open_preference_dataset(DataConfig(format="jsonl", path=str(animated)), RESOLUTION,
                                   family="sd15")[0].reason == reasons.NOT_A_PICTURE
    # a video family reads the clips; a picture among them is skipped and counted, not a shape error
    mixed = _manifest(tmp_path, [("w.gif", "l.gif"), ("a.png", "b.png")])
    videos = open_preference_dataset(DataConfig(format="jsonl", path=str(mixed)), RESOLUTION, family="cogvideox")
    assert len(videos) == 1 and videos[0]["chosen"].shape == (2, 3, RESOLUTION, RESOLUTION)
    assert videos.report.skipped == {reasons.NOT_A_VIDEO: 1}
    with pytest.raises(SipoError, match="pickapic"):
        open_preference_dataset(DataConfig(format="pickapic", path=str(tmp_path / "nothing.parquet")), RESOLUTION,
                                family="wan")


def test_a_still_gif_in_an_image_dataset_is_a_picture(tmp_path):
    # item 24: a 1-frame GIF was read as a 1-frame video ([1, 3, r, r]) and its pair skipped
    _gif(tmp_path / "still.gif", [(255, 0, 0)])
    _png(tmp_path / "b.png", (0, 0, 255))
    manifest = _manifest(tmp_path, [("still.gif", "b.png")])
    for family in (None, "sd15"):
        item = open_preference_dataset(DataConfig(format="jsonl", path=str(manifest)), RESOLUTION, family=family)[0]
        assert not isinstance(item, SkippedRow), item
        red = torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, RESOLUTION, RESOLUTION)  # 255 -> 1, 0 -> -1
        torch.testing.assert_close(item["chosen"], red, rtol=0, atol=1e-6)
    # an animated GIF stays a clip; in a video dataset a still GIF is a 1-frame clip
    _gif(tmp_path / "moving.gif", [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    _gif(tmp_path / "other.gif", [(0, 0, 0), (255, 255, 255), (0, 0, 0)])
    clips = _manifest(tmp_path, [("moving.gif", "other.gif")])
    assert open_preference_dataset(DataConfig(format="jsonl", path=str(clips)), RESOLUTION)[0]["chosen"].shape == (
        3, 3, RESOLUTION, RESOLUTION)
    stills = _manifest(tmp_path, [("still.gif", "moving.gif")])
    video = open_preference_dataset(DataConfig(format="jsonl", path=str(stills), num_frames=2), RESOLUTION,
                                    family="cogvideox")[0]
    assert video.reason == reasons.VIDEO_TOO_SHORT


def test_an_absurd_resolution_stops_at_validation():
    # item 24: model.resolution=100000 was a warning, then an out-of-memory blamed on every picture
    with pytest.raises(SipoError) as info:
        load_config(None, ["model.resolution=100000"])
    _one_sentence(str(info.value))
    assert "8 to 4096" in str(info.value)
    assert load_config(None, ["model.resolution=4096"]).model.resolution == 4096


def test_running_out_of_memory_while_decoding_is_not_a_corrupt_image(tmp_path, monkeypatch):
    from sipo.data import decode_image

    picture = _png(tmp_path / "a.png", (1, 2, 3), size=20)

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(Image.Image, "resize", out_of_memory)
    with pytest.raises(MemoryError):
        decode_image(picture, RESOLUTION)


# ----------------------------------------------------------------------------- issue 16: no import circle
def _imports(path: Path) -> set[str]:
    """Every ``sipo.data.*`` module a source file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sipo.data"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("sipo.data"))
    return found


def test_the_data_modules_import_each_other_without_a_circle():
    package = Path(sipo.__file__).parent / "data"
    graph = {f"sipo.data.{p.stem}": _imports(p) for p in package.glob("*.py") if p.stem != "__init__"}
    graph["sipo.data"] = _imports(package / "__init__.py")

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for name in graph.get(start, ()):
            if name == target or (name not in seen and reaches(name, target, seen | {name})):
                return True
        return False

    circles = sorted(name for name in graph if reaches(name, name, {name}))
    assert circles == [], circles
    assert sipo.data.decode.MalformedRow is sipo.data.report.MalformedRow  # the public name still works
