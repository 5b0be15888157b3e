"""train.report_to=wandb, offline (WANDB_MODE=offline, WANDB_DIR in tmp): the metrics, the config and
the validation images reach the run's .wandb file, read back record by record; --resume appends to the
same run id; without report_to=wandb, wandb is never imported."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sipo.config import load_config
from sipo.tracking import WANDB_RUN_ID_FILE
from sipo.train import train
from train_fixtures import tiny_overrides, write_jsonl_pairs

wandb_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")


def read_wandb_file(path: Path) -> list:
    """The protobuf records of a ``.wandb`` file: wandb's LevelDB-log framing (a 7-byte file header, 32 KiB
    blocks, each record chunk behind checksum u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pending, position = [], b"", 7
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _history(records) -> dict[int, dict]:
    rows = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items: dict = {}
            for item in record.history.item:  # a media value arrives as one item per field, under nested_key
                *parents, name = list(item.nested_key) or [item.key]
                target = items
                for parent in parents:
                    target = target.setdefault(parent, {})
                target[name] = json.loads(item.value_json)
            rows[int(items["_step"])] = items
    return rows


def _of(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def test_offline_run_holds_metrics_config_images_and_resume_appends_to_the_same_run(tiny_sd15_dir, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    manifest = write_jsonl_pairs(tmp_path / "pairs", num_pairs=8)
    run = tmp_path / "run"
    extra = {"train.report_to": "wandb", "train.validation_prompts": "[a smooth gradient]", "train.sample_every": 1,
             "train.sample_steps": 2, "train.max_steps": 2, "objective.name": "dpo"}
    train(load_config(None, tiny_overrides(tiny_sd15_dir, manifest, run, **extra)), progress=False)
    train(load_config(None, tiny_overrides(tiny_sd15_dir, manifest, run, **{**extra, "train.max_steps": 3})),
          progress=False, resume=True)

    files = sorted((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # one per process start, both of the run's id (wandb sync joins them)
    run_id = (run / WANDB_RUN_ID_FILE).read_text().strip()
    first, second = (read_wandb_file(f) for f in files)
    assert [r.run_id for r in _of(first, "run") + _of(second, "run")] == [run_id, run_id]
    assert all(f.name == f"run-{run_id}.wandb" for f in files)

    # metrics: every step's loss as metrics.jsonl has it, steps 1-2 before the resume, 3 after
    metrics = {row["step"]: row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    history = {**_history(first), **_history(second)}
    assert sorted(_history(second)) == [3] and set(metrics) == {1, 2, 3}
    for step, row in metrics.items():
        assert history[step]["loss"] == pytest.approx(row["loss"], rel=1e-6)
        assert history[step]["implicit_acc"] == pytest.approx(row["implicit_acc"])

    # config: the flattened resolved config
    config = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in _of(first, "config")[0].update}
    assert config["train.lora_rank"] == "4" and config["objective.name"] == "dpo"
    assert config["train.output_dir"] == str(run)

    # validation images: at steps 0, 1, 2 and (resumed) 3, each the grid sipo wrote under samples/
    for step in range(4):
        image = history[step]["validation_samples"]
        assert image["_type"] == "images/separated" and image["count"] == 1
        folder = files[0 if step < 3 else 1].parent / "files"
        logged = np.asarray(Image.open(folder / image["filenames"][0]).convert("RGB"))
        written = np.asarray(Image.open(run / "samples" / f"step-{step:08d}" / "grid.png").convert("RGB"))
        assert np.array_equal(logged, written)
        assert history[step]["validation_samples_each"]["captions"] == ["a smooth gradient (seed 0)"]

    # --overwrite is a new run: a new id
    train(load_config(None, tiny_overrides(tiny_sd15_dir, manifest, run, **{**extra, "train.max_steps": 1,
                                                                             "train.validation_prompts": "[]"})),
          progress=False, overwrite=True)
    assert (run / WANDB_RUN_ID_FILE).read_text().strip() != run_id


def test_wandb_is_not_imported_unless_a_run_reports_to_it():
    code = ("import sys, sipo.train, sipo.cli, sipo.validation, sipo.tracking, accelerate; "
            "print('wandb' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    assert load_config(None, []).train.report_to == "tensorboard"
