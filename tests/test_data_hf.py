"""data.format=hf: `datasets` folders (hub layout, save_to_disk), column mapping, streaming, bad input.

Every dataset is written by the test (parquet through pyarrow, saved datasets through `datasets`,
pictures through PIL); nothing is downloaded. Expected pixels are hand-computed from the mapping
x -> x / 127.5 - 1 of 8-bit levels (255 -> +1, 0 -> -1), and the expected pairs are read off the
labels written here, never from sipo's own output.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from sipo.config import DataConfig, load_config
from sipo.data import open_preference_dataset
from sipo.data import report as reasons
from sipo.errors import SipoError

datasets = pytest.importorskip("datasets")

RED, GREEN, BLUE, BLACK, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0), (255, 255, 255)


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path, monkeypatch):
    """load_dataset writes an Arrow copy of a folder into its cache: keep it in the test's folder, and no hub."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    datasets.disable_progress_bars()


def png(color, size=(12, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def rgb_of(color) -> torch.Tensor:
    return torch.tensor(color, dtype=torch.float32) / 127.5 - 1.0


def is_solid(picture: torch.Tensor, color) -> bool:
    return torch.allclose(picture, rgb_of(color)[:, None, None].expand_as(picture), atol=1e-6)


def pickapic_rows():
    """Four rows: jpg_0 wins, jpg_1 wins, a tie, jpg_0 wins; winners RED/GREEN/-/BLUE, losers BLACK/WHITE."""
    return {
        "caption": ["red wins", "green wins", "a tie", "blue wins"],
        "jpg_0": [png(RED), png(WHITE), png(RED), png(BLUE)],
        "jpg_1": [png(BLACK), png(GREEN), png(BLACK), png(BLACK)],
        "label_0": [1.0, 0.0, 0.5, 1.0],
    }


def hub_folder(root, rows, split="train", shards=1):
    """A folder as the hub lays a dataset out: data/<split>-0000i-of-0000n.parquet."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    table = pa.table(rows)
    per = math.ceil(len(table) / shards)
    for i in range(shards):
        pq.write_table(table.slice(i * per, per), root / "data" / f"{split}-{i:05d}-of-{shards:05d}.parquet")
    return root


def hf(path, **extra) -> DataConfig:
    return DataConfig(format="hf", path=str(path), **extra)


# --- hub-layout folders ------------------------------------------------------------------------
def test_hub_layout_folder_reads_pickapic_columns_with_ties_dropped(tmp_path):
    folder = hub_folder(tmp_path / "pickapic", pickapic_rows(), shards=2)
    hub_folder(folder, {**pickapic_rows(), "caption": ["test"] * 4}, split="test")  # must not be read
    ds = open_preference_dataset(hf(folder), resolution=8)
    assert len(ds) == 3 and ds.report.ties_dropped == 1 and ds.report.rows_seen == 4
    expected = [("red wins", RED, BLACK), ("green wins", GREEN, WHITE), ("blue wins", BLUE, BLACK)]
    for i, (prompt, winner, loser) in enumerate(expected):
        item = ds[i]
        assert item["prompt"] == prompt and item["chosen"].shape == (3, 8, 8)
        assert is_solid(item["chosen"], winner) and is_solid(item["rejected"], loser)
        assert item["size_info"].tolist()[:2] == [12, 12]  # the original size, for SDXL
    test = open_preference_dataset(hf(folder, split="test"), resolution=8)
    assert test[0]["prompt"] == "test"


def test_chosen_rejected_layout_without_label_and_max_pairs(tmp_path):
    rows = {"prompt": ["a", "b", "c"], "chosen": [png(RED)] * 3, "rejected": [png(GREEN)] * 3}
    ds = open_preference_dataset(hf(hub_folder(tmp_path / "pairs", rows), max_pairs=2), resolution=4)
    assert len(ds) == 2 and ds.report.ties_dropped == 0
    assert is_solid(ds[1]["chosen"], RED) and is_solid(ds[1]["rejected"], GREEN) and ds[1]["prompt"] == "b"


def test_column_mapping_renames_every_key(tmp_path):
    rows = {"text": ["first wins", "second wins"], "left": [png(RED), png(BLACK)],
            "right": [png(BLACK), png(BLUE)], "pref": [1, 0]}  # an integer label column
    config = hf(hub_folder(tmp_path / "mapped", rows),
                columns={"prompt": "text", "chosen": "left", "rejected": "right", "label": "pref"})
    ds = open_preference_dataset(config, resolution=4)
    assert [ds[i]["prompt"] for i in range(2)] == ["first wins", "second wins"]
    assert is_solid(ds[0]["chosen"], RED) and is_solid(ds[1]["chosen"], BLUE)
    assert is_solid(ds[1]["rejected"], BLACK)


def test_missing_column_names_the_mapping_key(tmp_path):
    rows = {"text": ["a"], "chosen": [png(RED)], "rejected": [png(BLUE)]}
    with pytest.raises(SipoError) as error:
        open_preference_dataset(hf(hub_folder(tmp_path / "f", rows)), resolution=4)
    message = str(error.value)
    assert "'prompt'" in message and "data.columns.prompt" in message and "text" in message
    assert message.count(". ") == 0  # one sentence
    with pytest.raises(SipoError, match=r"column 'chosen' \(data.columns.label\) holds .*expected a number"):
        open_preference_dataset(hf(tmp_path / "f", columns={"prompt": "text", "label": "chosen"}), resolution=4)


def test_missing_split_names_the_splits_there(tmp_path):
    folder = hub_folder(tmp_path / "f", pickapic_rows())
    with pytest.raises(SipoError, match=r"has no test split \(it has train\); set data.split"):
        open_preference_dataset(hf(folder, split="test"), resolution=4)


# --- save_to_disk, Image features --------------------------------------------------------------
def test_save_to_disk_with_image_features_matches_bytes(tmp_path):
    rows = {"prompt": ["x", "y"], "chosen": [png(RED), png(GREEN)], "rejected": [png(BLUE), png(BLACK)]}
    as_bytes = datasets.Dataset.from_dict(rows)
    as_images = datasets.Dataset.from_dict({
        "prompt": rows["prompt"],
        "chosen": [Image.open(io.BytesIO(b)) for b in rows["chosen"]],  # PIL images become Image features
        "rejected": [{"bytes": b, "path": None} for b in rows["rejected"]],
    }).cast_column("chosen", datasets.Image()).cast_column("rejected", datasets.Image())
    assert isinstance(as_images.features["chosen"], datasets.Image)
    as_bytes.save_to_disk(tmp_path / "bytes")
    datasets.DatasetDict({"train": as_images}).save_to_disk(tmp_path / "images")
    from_bytes = open_preference_dataset(hf(tmp_path / "bytes"), resolution=4)
    from_images = open_preference_dataset(hf(tmp_path / "images"), resolution=4)
    for i, (winner, loser) in enumerate([(RED, BLUE), (GREEN, BLACK)]):
        assert is_solid(from_images[i]["chosen"], winner) and is_solid(from_images[i]["rejected"], loser)
        assert torch.equal(from_images[i]["chosen"], from_bytes[i]["chosen"])


def test_picture_paths_relative_to_the_folder_and_kept_inside_it(tmp_path):
    folder = tmp_path / "paths"
    (folder / "img").mkdir(parents=True)
    (folder / "img" / "a.png").write_bytes(png(RED))
    (folder / "img" / "b.png").write_bytes(png(GREEN))
    (tmp_path / "outside.png").write_bytes(png(BLUE))
    rows = {"prompt": ["ok", "escapes"], "chosen": ["img/a.png", "../outside.png"], "rejected": ["img/b.png"] * 2}
    datasets.Dataset.from_dict(rows).save_to_disk(folder)
    ds = open_preference_dataset(hf(folder), resolution=4)
    assert is_solid(ds[0]["chosen"], RED) and is_solid(ds[0]["rejected"], GREEN)
    skipped = ds[1]
    assert isinstance(skipped, reasons.SkippedRow) and skipped.reason == reasons.PATH_ESCAPES_ROOT


# --- malformed rows: the same skip-and-count as the other formats ------------------------------
def test_malformed_rows_are_skipped_and_counted(tmp_path):
    rows = {
        "caption": ["good", None, "corrupt", "bad label", "null label"],
        "jpg_0": [png(RED), png(RED), b"not a png", png(RED), png(RED)],
        "jpg_1": [png(BLACK)] * 5,
        "label_0": [1.0, 1.0, 1.0, 7.0, None],
    }
    ds = open_preference_dataset(hf(hub_folder(tmp_path / "f", rows)), resolution=4)
    assert len(ds) == 3  # rows 3 and 4 dropped at open (invalid label)
    assert ds.report.index_skips[reasons.INVALID_LABEL] == 2
    assert is_solid(ds[0]["chosen"], RED)
    assert ds[1].reason == reasons.MISSING_FIELD and ds[2].reason == reasons.CORRUPT_IMAGE
    assert ds.report.skipped_total == 4 and ds.report.used == 1
    with pytest.raises(SipoError, match="malformed"):
        open_preference_dataset(hf(tmp_path / "f", strict=True), resolution=4)


def test_all_ties_stop_with_one_sentence(tmp_path):
    rows = {**pickapic_rows(), "label_0": [0.5] * 4}
    with pytest.raises(SipoError, match="all 4 pairs .* are ties"):
        open_preference_dataset(hf(hub_folder(tmp_path / "f", rows)), resolution=4)


# --- the hub, offline ----------------------------------------------------------------------------
def test_hub_id_offline_fails_with_one_sentence(tmp_path):
    with pytest.raises(SipoError) as error:
        open_preference_dataset(hf("someone/pairs-that-are-not-cached"), resolution=4)
    message = str(error.value)
    assert "hub cannot be reached" in message and "point data.path at the folder" in message


def test_config_rejects_unknown_column_keys_and_columns_outside_hf():
    with pytest.raises(SipoError, match=r"unknown key data.columns.image; valid keys"):
        DataConfig(format="hf", columns={"image": "x"})
    with pytest.raises(SipoError, match="data.format=hf only"):
        DataConfig(format="jsonl", columns={"prompt": "x"})
    with pytest.raises(SipoError, match="data.streaming=true reads data.format=hf only"):
        DataConfig(format="pickapic", streaming=True)
    config = load_config(None, ["data.format=hf", "data.columns.prompt=text", "data.columns.label=null"])
    assert config.data.columns == {"prompt": "text", "label": None}


# --- fingerprint and cache key --------------------------------------------------------------------
def test_cache_key_follows_files_split_and_columns(tmp_path):
    from sipo.data.cache import cache_identity, cache_root

    folder = hub_folder(tmp_path / "f", pickapic_rows())
    base = load_config(None, ["data.format=hf", f"data.path={folder}"])
    same = load_config(None, ["data.format=hf", f"data.path={folder}"])
    other_split = load_config(None, ["data.format=hf", f"data.path={folder}", "data.split=test"])
    other_columns = load_config(None, ["data.format=hf", f"data.path={folder}", "data.columns.prompt=caption2"])
    assert cache_identity(base) == cache_identity(same)
    assert cache_identity(base) != cache_identity(other_split)
    assert cache_identity(base) != cache_identity(other_columns)
    assert cache_root(base) == folder / ".sipo-cache"
    hub = load_config(None, ["data.format=hf", "data.path=org/name"])
    assert cache_identity(hub)["data"]["hub_id"] == "org/name" and "org--name" in str(cache_root(hub))


# --- streaming ------------------------------------------------------------------------------------
def _stream_rows(n=7):
    """n rows, row i: caption "i", jpg_0 a grey of level 10 i, jpg_1 black; every third a tie."""
    return {
        "caption": [str(i) for i in range(n)],
        "jpg_0": [png((10 * i + 5,) * 3) for i in range(n)],
        "jpg_1": [png(BLACK)] * n,
        "label_0": [0.5 if i % 3 == 2 else 1.0 for i in range(n)],
    }


def _prompts(batches, count):
    return [list(next(batches)["prompts"]) for _ in range(count)]


def test_stream_in_its_own_order_numbers_the_decided_pairs(tmp_path):
    folder = hub_folder(tmp_path / "s", _stream_rows(), shards=2)
    stream = open_preference_dataset(hf(folder, streaming=True, shuffle_buffer=1), resolution=4)
    assert stream.streaming and len(stream) == 0  # no length: the trainer's checks read 0 as unknown
    decided = ["0", "1", "3", "4", "6"]  # rows 2 and 5 are ties
    batches = stream.micro_batches(batch_size=2, start=0)
    # two epochs of 5 pairs in 2-pair micro-batches: the second epoch continues mid-batch
    assert _prompts(batches, 5) == [decided[0:2], decided[2:4], [decided[4], decided[0]], decided[1:3], decided[3:5]]
    assert stream.report.ties_dropped == 2 and stream.report.pairs == 5 and stream.report.rows_seen == 7
    first = stream.micro_batches(batch_size=2, start=0)
    batch = next(first)
    assert is_solid(batch["chosen"][1], (15,) * 3) and batch["indices"] == [0, 1]


def test_stream_resume_workers_and_processes_read_what_one_uninterrupted_reader_reads(tmp_path):
    from sipo.data.hf_stream import stream_loader

    folder = hub_folder(tmp_path / "s", _stream_rows(11), shards=3)
    config = hf(folder, streaming=True, shuffle_buffer=4)
    stream = open_preference_dataset(config, resolution=4, seed=3)
    straight = _prompts(stream.micro_batches(batch_size=2, start=0), 8)
    flat = [p for batch in straight for p in batch]
    assert sorted(flat[:8]) == sorted(["0", "1", "3", "4", "6", "7", "9", "10"])  # one epoch: each decided row once
    assert flat[:8] != ["0", "1", "3", "4", "6", "7", "9", "10"]  # shuffled
    assert flat[8:] != flat[:8]  # the next epoch is shuffled anew (set_epoch)
    resumed = _prompts(open_preference_dataset(config, resolution=4, seed=3).micro_batches(batch_size=2, start=5), 3)
    assert resumed == straight[5:]
    with_workers = _prompts(stream_loader(open_preference_dataset(config, resolution=4, seed=3), 2, 0, 0, 1,
                                          num_workers=2), 8)
    assert with_workers == straight
    # two processes: micro-batch m of rank r holds global positions (2m + r) * 2, +1
    ranks = [_prompts(open_preference_dataset(config, resolution=4, seed=3).micro_batches(2, 0, rank, 2), 4)
             for rank in (0, 1)]
    assert [p for m in range(4) for rank in (0, 1) for p in ranks[rank][m]] == flat


def test_stream_config_refuses_what_needs_indices():
    with pytest.raises(SipoError, match="validation_fraction picks pairs by index"):
        DataConfig(format="hf", streaming=True, validation_fraction=0.1)
    with pytest.raises(SipoError, match="use_cache=always needs the indexed dataset"):
        DataConfig(format="hf", streaming=True, use_cache="always")


# --- training from hf data -------------------------------------------------------------------------
def _training_folder(tmp_path):
    """The trainer fixtures' 8 PNG pairs (smooth winner, noisy loser) as a hub-layout Pick-a-Pic folder,
    winners alternating between jpg_0 and jpg_1, plus two ties."""
    from train_fixtures import write_jsonl_pairs

    manifest = write_jsonl_pairs(tmp_path / "pngs")
    pairs = [json.loads(line) for line in manifest.read_text().splitlines()]
    first, second, labels = [], [], []
    for i, pair in enumerate(pairs):
        chosen, rejected = ((manifest.parent / pair[k]).read_bytes() for k in ("chosen", "rejected"))
        first.append(chosen if i % 2 == 0 else rejected)
        second.append(rejected if i % 2 == 0 else chosen)
        labels.append(1.0 if i % 2 == 0 else 0.0)
    rows = {"caption": [p["prompt"] for p in pairs] + ["tie a", "tie b"], "jpg_0": first + first[:2],
            "jpg_1": second + second[:2], "label_0": labels + [0.5, 0.5]}
    return hub_folder(tmp_path / "hub", rows, shards=2)


def test_sipo_train_two_steps_from_a_hub_layout_folder(tiny_sd15_dir, tmp_path, capsys):
    from sipo.cli import main as cli_main
    from train_fixtures import write_tiny_config

    folder = _training_folder(tmp_path)
    config = write_tiny_config(tmp_path / "hf.yaml", tiny_sd15_dir, folder, tmp_path / "run",
                               **{"data.format": "hf", "train.max_steps": 2, "data.num_workers": 1})
    assert cli_main(["train", "--config", str(config), "--no-progress"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["format"] == "hf" and report["pairs"] == 8 and report["ties_dropped"] == 2
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


def test_streamed_training_resumes_exactly(tiny_sd15_dir, tmp_path):
    from safetensors.torch import load_file
    from sipo.checkpoints import list_checkpoints
    from sipo.train import train
    from train_fixtures import tiny_overrides

    folder = _training_folder(tmp_path)
    extra = {"data.format": "hf", "data.streaming": True, "data.shuffle_buffer": 3, "train.max_steps": 4,
             "train.checkpoint_every": 2, "train.batch_size": 3, "train.deterministic": True}
    straight = train(load_config(None, tiny_overrides(tiny_sd15_dir, folder, tmp_path / "a", **extra)), progress=False)

    def crash(step, adapter):
        if step == 3:
            raise RuntimeError("simulated crash")

    interrupted = load_config(None, tiny_overrides(tiny_sd15_dir, folder, tmp_path / "b", **extra))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(interrupted, step_callback=crash, progress=False)
    resumed = train(interrupted, resume=True, progress=False)
    assert resumed.steps == 4
    weights = [load_file(list_checkpoints(tmp_path / run)[-1] / "trainable.safetensors") for run in ("a", "b")]
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=1e-6)
    assert [r["loss"] for r in straight.history] == pytest.approx([r["loss"] for r in resumed.history], abs=1e-6)
    report = json.loads((tmp_path / "a" / "data_report.json").read_text())
    assert report["ties_dropped"] == 2 and report["pairs"] == 8  # 4 steps x 3 pairs: past one epoch


def test_sipo_cache_of_an_hf_folder_serves_training(tiny_sd15_dir, tmp_path):
    from sipo.data.cache import build_cache, open_cache_for_training
    from train_fixtures import tiny_overrides

    folder = _training_folder(tmp_path)
    config = load_config(None, tiny_overrides(tiny_sd15_dir, folder, tmp_path / "run", **{"data.format": "hf"}))
    location = build_cache(config, progress=False)
    assert location.parent == folder / ".sipo-cache"
    dataset = open_preference_dataset(config.data, 32, family="sd15")  # the cache folder is not read as data
    assert len(dataset) == 8
    cached = open_cache_for_training(config, dataset)
    assert cached is not None and len(cached) == 8
    streamed = load_config(None, tiny_overrides(tiny_sd15_dir, folder, tmp_path / "run",
                                                **{"data.format": "hf", "data.streaming": True}))
    assert open_cache_for_training(streamed, dataset) is None  # a stream has no indices for the cache
    with pytest.raises(SipoError, match="sipo cache encodes an indexed dataset"):
        build_cache(streamed, progress=False)


def test_video_paths_read_as_clips(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    for name, colors in (("a.gif", [RED, GREEN, BLUE]), ("b.gif", [BLACK, WHITE, BLACK])):
        frames = [Image.new("RGB", (8, 8), c) for c in colors]
        frames[0].save(folder / name, save_all=True, append_images=frames[1:], duration=100)
    datasets.Dataset.from_dict({"prompt": ["a clip"], "chosen": ["a.gif"], "rejected": ["b.gif"]}).save_to_disk(folder)
    item = open_preference_dataset(hf(folder), resolution=4)[0]
    assert item["chosen"].shape == (3, 3, 4, 4)  # [F, 3, r, r]
    assert [is_solid(item["chosen"][f], c) for f, c in enumerate([RED, GREEN, BLUE])] == [True] * 3
    assert is_solid(item["rejected"][1], WHITE)


def test_buffer_shuffle_is_a_seeded_permutation_that_moves_items_at_most_a_buffer_early():
    from sipo.data.hf_stream import buffer_shuffle

    items = list(range(50))
    out = list(buffer_shuffle(iter(items), 5, np.random.default_rng(1)))
    assert sorted(out) == items and out != items
    # an item leaves the buffer only after it entered: output place p holds an input index <= p + 4
    assert all(value <= place + 4 for place, value in enumerate(out))
    assert out == list(buffer_shuffle(iter(items), 5, np.random.default_rng(1)))
    assert list(buffer_shuffle(iter(items), 1, np.random.default_rng(1))) == items


def test_empty_folder_and_validation_split_fallback(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SipoError, match="holds no dataset datasets can read"):
        open_preference_dataset(hf(tmp_path / "empty"), resolution=4)
    # a held-out folder with one (train) split serves data.validation_path, whose split is "validation"
    held = hub_folder(tmp_path / "held", pickapic_rows())
    assert len(open_preference_dataset(hf(held, split="validation"), resolution=4)) == 3


def test_a_decoded_pil_cell_reads_as_its_pixels():
    from sipo.data.hf import MediaReader
    from sipo.data.video import VideoSpec

    picture, source = MediaReader(None, 4, VideoSpec(), "image").read(Image.new("RGB", (9, 9), GREEN), "chosen")
    assert is_solid(picture, GREEN) and isinstance(source, bytes)
