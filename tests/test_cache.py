"""The latent cache (`sipo cache`): training from it equals training from the pictures, a stale cache
is refused, an interrupted build continues, and the skip counts survive."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sipo.checkpoints import list_checkpoints
from sipo.cli import main as cli_main
from sipo.config import DataConfig, load_config
from sipo.data import open_preference_dataset
from sipo.data.pairs import flip_decision
from sipo.data.cache import MANIFEST, build_cache, cache_location, open_cache
from sipo.errors import SipoError
from sipo.train import train
from train_fixtures import tiny_overrides, write_jsonl_pairs, write_tiny_config


def _config(model_dir: Path, manifest: Path, output_dir: Path, **extra):
    # the project reading (one weight per pair, outside the log-sigmoid): the tolerances below were derived
    # for it; the cache is about the data path, which every objective shares
    # deterministic kernels: on CUDA the cache is then encoded, and the runs train, with TF32 off
    values = {"objective.name": "sipo-outside", "objective.tau": 0.05, "train.max_steps": 3, "train.checkpoint_every": 0,
              "train.deterministic": True}
    values.update(extra)
    return load_config(None, tiny_overrides(model_dir, manifest, output_dir, **values))


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(list_checkpoints(run)[-1] / "trainable.safetensors")


def test_training_from_the_cache_equals_training_from_pictures(tiny_sd15_dir, tmp_path, capsys):
    # 5 pairs, batch 2: epochs wrap mid-batch; random_flip: both orientations are read from the cache.
    manifest = write_jsonl_pairs(tmp_path / "pairs", num_pairs=5)
    # AdamW's epsilon 1e-4 instead of 1e-8: a LoRA element whose gradient is a near-cancelling sum then moves by
    # ~lr*g/eps instead of +-lr whichever way the encoders' rounding tipped it (one of 128 elements did, by 6.5e-5,
    # with the noise keyed per pair); the weights compare the gradients the two data paths give
    flips = {"data.random_flip": True, "train.adam_epsilon": 1e-4}
    location = build_cache(_config(tiny_sd15_dir, manifest, tmp_path / "unused", **flips), progress=False, shard_pairs=2)
    assert location.parent == tmp_path / "pairs" / ".sipo-cache"
    assert sorted(p.name for p in location.iterdir()) == [MANIFEST] + [f"shard-0000{i}.safetensors" for i in range(3)]

    pictures = train(_config(tiny_sd15_dir, manifest, tmp_path / "pictures", **flips, **{"data.use_cache": "never"}), progress=False)
    cached = train(_config(tiny_sd15_dir, manifest, tmp_path / "cached", **flips, **{"data.use_cache": "always"}), progress=False)
    assert "training from the latent cache" in capsys.readouterr().out
    weights_p, weights_c = _final_weights(tmp_path / "pictures"), _final_weights(tmp_path / "cached")
    assert weights_p.keys() == weights_c.keys()
    assert any(v.abs().max() > 0 for k, v in weights_c.items() if "lora_B" in k)  # it trained
    for name in weights_p:
        # the encoders see 4 images per call from pictures and up to 8 per call while caching:
        # equal up to float32 rounding of the convolutions
        torch.testing.assert_close(weights_c[name], weights_p[name], rtol=0, atol=1e-5)
    # beta = 5000 scales error differences of ~1e-7 into z: the losses agree to ~1e-4, not to 1e-7
    assert [r["loss"] for r in cached.history] == pytest.approx([r["loss"] for r in pictures.history], abs=1e-3)
    # and the tolerance above is tight: the weights moved far more than it from their start
    assert max(float(v.abs().max()) for k, v in weights_c.items() if "lora_B" in k) > 1e-3


def test_cached_latents_are_the_encoders_output_in_both_orientations(tiny_sd15_dir, tiny_sd15_adapter, tmp_path):
    manifest = write_jsonl_pairs(tmp_path / "pairs", num_pairs=3)
    config = _config(tiny_sd15_dir, manifest, tmp_path / "run", **{"data.random_flip": True})
    build_cache(config, progress=False)
    cache = open_cache(config)
    plain = open_preference_dataset(DataConfig(format="jsonl", path=str(manifest)), 32)
    flips = [flip_decision(config.train.seed, 0, index) for index in range(3)]
    for index, flipped in enumerate(flips):
        item, pair = cache[index], plain[index]
        pictures = torch.stack([pair["chosen"], pair["rejected"]])
        if flipped:
            pictures = pictures.flip(-1)
        expected = tiny_sd15_adapter.encode_images(pictures)
        torch.testing.assert_close(item["x0_chosen"], expected[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(item["x0_rejected"], expected[1], rtol=0, atol=1e-5)
        states = tiny_sd15_adapter.encode_prompts([pair["prompt"]])["encoder_hidden_states"][0]
        torch.testing.assert_close(item["conditioning"]["encoder_hidden_states"], states, rtol=0, atol=1e-5)


def test_a_stale_cache_is_refused_and_auto_falls_back(tiny_sd15_dir, tmp_path, capsys):
    manifest = write_jsonl_pairs(tmp_path / "pairs", num_pairs=4)
    config = _config(tiny_sd15_dir, manifest, tmp_path / "run", **{"data.use_cache": "always"})
    old = build_cache(config, progress=False)
    manifest.write_text(manifest.read_text().replace("number 0", "number zero"))  # the data changed
    assert cache_location(config) != old
    with pytest.raises(SipoError, match=r"built for another model, resolution, data or precision.*`sipo cache --config FILE`"):
        train(config, progress=False)
    other_resolution = _config(tiny_sd15_dir, manifest, tmp_path / "run2", **{"data.use_cache": "auto"})
    result = train(other_resolution, progress=False)
    assert result.steps == 3
    assert "encoding pictures every step" in capsys.readouterr().out


def test_an_interrupted_cache_continues_from_the_missing_shards(tiny_sd15_dir, tiny_sd15_adapter, tmp_path):
    manifest = write_jsonl_pairs(tmp_path / "pairs", num_pairs=5)
    config = _config(tiny_sd15_dir, manifest, tmp_path / "run")
    location = build_cache(config, adapter=tiny_sd15_adapter, progress=False, shard_pairs=2)
    complete = {p.name: load_file(p) for p in location.glob("shard-*")}
    # an interruption while shard 1 was written: its file absent, a partial one left, no manifest
    (location / "shard-00001.safetensors").unlink()
    (location / ".tmp-shard-00001.safetensors").write_bytes(b"half")
    (location / MANIFEST).unlink()
    kept = {name: os.stat(location / name).st_mtime_ns for name in ("shard-00000.safetensors", "shard-00002.safetensors")}
    with pytest.raises(SipoError, match="incomplete"):
        train(_config(tiny_sd15_dir, manifest, tmp_path / "run", **{"data.use_cache": "always"}), progress=False)

    encoded: list[int] = []
    original = tiny_sd15_adapter.encode_images
    tiny_sd15_adapter.encode_images = lambda pictures: encoded.append(pictures.shape[0]) or original(pictures)
    build_cache(config, adapter=tiny_sd15_adapter, progress=False, shard_pairs=2)
    assert encoded == [4]  # shard 1 only: 2 pairs, winners and losers in one call
    assert {n: os.stat(location / n).st_mtime_ns for n in kept} == kept
    for name, tensors in complete.items():
        again = load_file(location / name)
        for key in tensors:
            torch.testing.assert_close(again[key], tensors[key], rtol=0, atol=1e-6)
    assert open_cache(config) is not None


def test_skip_counts_survive_the_cache(tiny_sd15_dir, tmp_path):
    manifest = write_jsonl_pairs(tmp_path / "pairs", num_pairs=6)
    (tmp_path / "pairs" / "001_rejected.png").write_bytes(b"\x89PNG truncated")
    (tmp_path / "pairs" / "004_chosen.png").unlink()
    with open(manifest, "a") as handle:
        handle.write("{not json\n")
    extra = {"train.batch_size": 3, "train.max_steps": 2}
    build_cache(_config(tiny_sd15_dir, manifest, tmp_path / "unused", **extra), progress=False, shard_pairs=4)
    pictures = train(_config(tiny_sd15_dir, manifest, tmp_path / "pictures", **extra, **{"data.use_cache": "never"}), progress=False)
    cached = train(_config(tiny_sd15_dir, manifest, tmp_path / "cached", **extra, **{"data.use_cache": "always"}), progress=False)
    # PIL's message names a BytesIO object by its address: the one difference the two reports may have
    read = lambda run: json.loads(re.sub(r" at 0x[0-9a-f]+", "", (tmp_path / run / "data_report.json").read_text()))  # noqa: E731
    report_p, report_c = read("pictures"), read("cached")
    assert report_c == report_p
    assert report_c["skipped_total"] == 3 and report_c["used"] == 4
    assert cached.history[-1]["skipped_rows"] == pictures.history[-1]["skipped_rows"] == 2


def test_cli_cache_then_train(tiny_sd15_dir, tmp_path, capsys):
    manifest = write_jsonl_pairs(tmp_path / "pairs", num_pairs=3)
    config = write_tiny_config(tmp_path / "c.yaml", tiny_sd15_dir, manifest, tmp_path / "run",
                               **{"data.cache_dir": str(tmp_path / "cache"), "train.max_steps": 1})
    assert cli_main(["cache", "--config", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "cached 3 pairs in 1 shards" in out and str(tmp_path / "cache") in out
    assert cli_main(["train", "--config", str(config), "--no-progress", "data.use_cache=always"]) == 0
    assert "training from the latent cache" in capsys.readouterr().out
