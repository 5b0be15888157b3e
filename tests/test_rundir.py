"""A run directory belongs to one run (issue 9): ownership, --overwrite, verified resume with
fallback, fingerprint checks before anything is written, zero usable pairs, honest stop messages,
disk-full writes and one stable log folder."""

from __future__ import annotations

import importlib
import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from sipo import checkpoints as ckpt
from sipo.checkpoints import TrainState, list_checkpoints, read_fingerprint, save_checkpoint, verify_checkpoint
from sipo.cli import main as cli_main
from sipo.config import load_config
from sipo.errors import SipoError
from sipo.train import train
from train_fixtures import snapshot, tiny_overrides, write_jsonl_pairs, write_tiny_config

BASE_STEPS = 3


def _config(model_dir: Path, manifest: Path, output_dir: Path, **extra):
    values = {"train.max_steps": BASE_STEPS, "train.checkpoint_every": 1, "train.keep_last": 3, **extra}
    return load_config(None, tiny_overrides(model_dir, manifest, output_dir, **values))



@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_jsonl_pairs(tmp_path_factory.mktemp("pairs"), num_pairs=4)


@pytest.fixture(scope="module")
def finished_run(tiny_sd15_dir, manifest, tmp_path_factory) -> Path:
    """A finished 3-step run with checkpoints step-1..3 (read-only: tests copy it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(_config(tiny_sd15_dir, manifest, run), progress=False)
    assert [p.name for p in list_checkpoints(run)] == [f"step-{s:08d}" for s in (1, 2, 3)]
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


# ----------------------------------------------------------------------------- ownership
def test_new_run_into_an_old_runs_directory_stops_and_changes_nothing(tiny_sd15_dir, manifest, run_copy):
    before = snapshot(run_copy)
    with pytest.raises(SipoError) as info:
        train(_config(tiny_sd15_dir, manifest, run_copy, **{"train.seed": 7}), progress=False)
    message = str(info.value)
    assert "already holds another run" in message and "resume=True" in message and "overwrite=True" in message
    assert "step-00000003" in message and "\n" not in message
    assert snapshot(run_copy) == before


def test_overwrite_replaces_the_old_run_and_keeps_the_users_own_files(tiny_sd15_dir, manifest, run_copy):
    (run_copy / "my_notes.txt").write_text("not sipo's")
    train(_config(tiny_sd15_dir, manifest, run_copy, **{"train.max_steps": 1, "train.seed": 7}), progress=False,
          overwrite=True)
    # the old run's step-2 and step-3 would sort after the new step-1: they must be gone, not kept
    assert [p.name for p in list_checkpoints(run_copy)] == ["step-00000001"]
    assert read_fingerprint(list_checkpoints(run_copy)[0])["train.seed"] == 7
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["train"]["seed"] == 7
    assert len((run_copy / "metrics.jsonl").read_text().splitlines()) == 1
    assert (run_copy / "my_notes.txt").read_text() == "not sipo's"


def test_pruning_keeps_the_newest_steps_by_number_and_the_one_just_written(tmp_path):
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    generator = torch.Generator().manual_seed(0)
    for step in (9, 10, 100):  # "step-9" < "step-10" only by number once names are unpadded
        save_checkpoint(tmp_path, {"w": param}, optimizer, scheduler, TrainState(step=step), generator, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010", "step-00000100"]
    # keep_last=1 and an older step written last (an old run's leftovers are newer): it survives
    save_checkpoint(tmp_path, {"w": param}, optimizer, scheduler, TrainState(step=5), generator, keep_last=1)
    assert "step-00000005" in [p.name for p in list_checkpoints(tmp_path)]


# ----------------------------------------------------------------------------- verified resume
@pytest.mark.parametrize("damaged_file", ["trainable.safetensors", "optimizer.pt", "state.json"])
def test_resume_skips_a_truncated_newest_checkpoint_and_says_so(tiny_sd15_dir, manifest, run_copy, damaged_file,
                                                               capsys):
    newest = list_checkpoints(run_copy)[-1]
    data = (newest / damaged_file).read_bytes()
    (newest / damaged_file).write_bytes(data[: len(data) // 2])
    (run_copy / "checkpoints" / ".tmp-step-00000004").mkdir()  # left by a crash or a full disk
    (run_copy / "checkpoints" / ".tmp-step-00000004" / "optimizer.pt").write_bytes(b"\0" * 1000)
    assert verify_checkpoint(newest) is not None and verify_checkpoint(list_checkpoints(run_copy)[-2]) is None

    result = train(_config(tiny_sd15_dir, manifest, run_copy, **{"train.max_steps": 4}), resume=True, progress=False)
    out = capsys.readouterr().out
    assert f"checkpoint step-00000003 is damaged ({damaged_file}" in out
    assert "resuming from step-00000002, the newest intact checkpoint" in out
    assert "at step 2" in out and "removed .tmp-step-00000004" in out
    assert result.steps == 4
    assert [p.name for p in list_checkpoints(run_copy)] == ["step-00000002", "step-00000003", "step-00000004"]
    assert all(verify_checkpoint(p) is None for p in list_checkpoints(run_copy))
    assert not list((run_copy / "checkpoints").glob(".tmp-*"))
    steps = [json.loads(line)["step"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # step 3 logged once: the damaged run's record was dropped


def test_resume_with_every_checkpoint_damaged_is_one_sentence(tiny_sd15_dir, manifest, run_copy):
    for path in list_checkpoints(run_copy):
        (path / "state.json").write_text("{")
    with pytest.raises(SipoError, match="no intact checkpoint .* start again with overwrite=True"):
        train(_config(tiny_sd15_dir, manifest, run_copy), resume=True, progress=False)


def test_mismatched_resume_names_each_key_and_writes_nothing(tiny_sd15_dir, manifest, run_copy, tmp_path):
    other_data = write_jsonl_pairs(tmp_path / "other_pairs", num_pairs=3, seed=1)
    before = snapshot(run_copy)
    changed = {"train.lora_rank": 8, "train.lora_alpha": 8.0, "train.seed": 3, "train.batch_size": 1,
               "data.path": str(other_data)}
    with pytest.raises(SipoError) as info:
        train(_config(tiny_sd15_dir, manifest, run_copy, **changed), resume=True, progress=False)
    message = str(info.value)
    for key in ("train.lora_rank: 4 -> 8", "train.seed: 0 -> 3", "train.batch_size: 2 -> 1", "data.files: '1 files, sha256"):
        assert key in message, key
    assert "overwrite=True" in message and "\n" not in message
    assert snapshot(run_copy) == before  # config.yaml included: `sipo analyze` still reads the old run


def test_same_data_copied_elsewhere_with_other_mtimes_still_resumes(tiny_sd15_dir, manifest, run_copy, tmp_path, capsys):
    copied = tmp_path / "copied_pairs"
    shutil.copytree(manifest.parent, copied)
    train(_config(tiny_sd15_dir, copied / manifest.name, run_copy, **{"train.max_steps": 4, "objective.beta": 2500.0}),
          resume=True, progress=False)
    out = capsys.readouterr().out
    # the allowed changes are listed; the data files' contents are equal, so they are not a change
    assert "changed since the checkpoint:" in out and "train.max_steps: 3 -> 4" in out
    assert "objective.beta: 5000.0 -> 2500.0" in out and "data.files" not in out


# ----------------------------------------------------------------------------- honest endings
def test_zero_usable_pairs_stop_with_an_error_and_no_weights(tiny_sd15_dir, tmp_path):
    pairs = write_jsonl_pairs(tmp_path / "pairs", num_pairs=3)
    for picture in (tmp_path / "pairs").glob("*_chosen.png"):
        picture.write_bytes(b"this is not a png")
    run = tmp_path / "run"
    with pytest.raises(SipoError) as info:
        train(_config(tiny_sd15_dir, pairs, run, **{"train.max_steps": 2}), progress=False)
    message = str(info.value)
    assert "no usable pair" in message and "corrupt image: 3" in message and "data_report.json" in message
    assert not (run / "pytorch_lora_weights.safetensors").exists() and not (run / "README.md").exists()
    assert json.loads((run / "data_report.json").read_text())["used"] == 0


def _poison_from(step_to_poison: int):
    def poison(step, adapter):
        if step >= step_to_poison:
            with torch.no_grad():
                for name, param in adapter.denoiser.named_parameters():
                    if "lora_A" in name:
                        param.fill_(float("nan"))
    return poison


def test_divergence_before_any_checkpoint_does_not_promise_one(tiny_sd15_dir, manifest, tmp_path):
    config = _config(tiny_sd15_dir, manifest, tmp_path / "run",
                     **{"train.max_steps": 6, "train.checkpoint_every": 0, "train.max_bad_steps": 2})
    with pytest.raises(SipoError) as info:
        train(config, step_callback=_poison_from(1), progress=False)
    message = str(info.value)
    assert "no checkpoint was written" in message and "overwrite=True" in message
    assert "resume=True" not in message and "intact" not in message


def test_divergence_after_a_checkpoint_names_it(tiny_sd15_dir, manifest, tmp_path):
    config = _config(tiny_sd15_dir, manifest, tmp_path / "run",
                     **{"train.max_steps": 6, "train.checkpoint_every": 2, "train.max_bad_steps": 2})
    with pytest.raises(SipoError, match="resume=True from step-00000002, the last good checkpoint"):
        train(config, step_callback=_poison_from(3), progress=False)


@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_ctrl_c_suggests_resume_only_when_a_checkpoint_exists(tiny_sd15_dir, manifest, tmp_path, monkeypatch, capsys,
                                                             with_checkpoint):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    if with_checkpoint:
        (run / "checkpoints" / "step-00000004").mkdir()
        (run / "checkpoints" / "step-00000004" / "manifest.json").write_text("{}")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("sipo.train"), "train", interrupted)  # sipo.train is the function
    config = write_tiny_config(tmp_path / "c.yaml", tiny_sd15_dir, manifest, run)
    assert cli_main(["train", "--config", str(config)]) == 130
    err = capsys.readouterr().err
    if with_checkpoint:
        assert "--resume (from step-00000004)" in err
    else:
        assert "--resume" not in err and "no checkpoint was written yet" in err and "--overwrite" in err


# ----------------------------------------------------------------------------- disk full
def test_disk_full_while_checkpointing_removes_the_partial_directory(tmp_path, monkeypatch):
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    real_save = torch.save

    def save_until_full(obj, path, *args, **kwargs):
        if str(path).endswith("lr_scheduler.pt"):
            Path(path).write_bytes(b"\0" * 512)  # part of the file reached the disk
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save_until_full)
    with pytest.raises(SipoError) as info:
        save_checkpoint(tmp_path, {"w": param}, optimizer, scheduler, TrainState(step=3), torch.Generator(), 2)
    message = str(info.value)
    assert message.startswith("the disk filled up while writing checkpoint") and "free space" in message
    assert "overwrite=True" in message  # nothing to resume from yet
    assert list((tmp_path / "checkpoints").iterdir()) == []  # no .tmp-step-00000003 holding the space


def test_torch_save_hiding_the_errno_is_still_read_as_disk_full(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError('... iostream error'); free space then decides."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def failing_save(obj, path, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(SipoError, match="the disk filled up"):
        save_checkpoint(tmp_path, {"w": param}, optimizer, scheduler, TrainState(step=1), torch.Generator(), 2)


# ----------------------------------------------------------------------------- what the run prints and logs
def test_header_before_the_bar_and_summary_after_it_without_progress(finished_run, capsys, tiny_sd15_dir, manifest,
                                                                     run_copy):
    train(_config(tiny_sd15_dir, manifest, run_copy, **{"train.max_steps": 4}), resume=True, progress=False)
    out = capsys.readouterr().out
    header = out.index("sipo: training sd15 model")
    assert f"into {run_copy}" in out and "data: 4 pairs found in" in out
    assert out.index("data: jsonl") > header  # the data summary, although progress=False


def test_logs_stay_in_one_folder_across_invocations(tiny_sd15_dir, manifest, run_copy):
    def log_folders():
        return sorted(str(p.relative_to(run_copy / "logs")) for p in (run_copy / "logs").rglob("*") if p.is_dir())

    before = log_folders()
    train(_config(tiny_sd15_dir, manifest, run_copy, **{"train.max_steps": 4}), resume=True, progress=False)
    assert log_folders() == before == []  # no timestamped folder per invocation
    assert len(list((run_copy / "logs").glob("events.out.tfevents.*"))) == 2  # one event file per invocation


def test_report_to_none_writes_no_logs(tiny_sd15_dir, manifest, tmp_path):
    run = tmp_path / "run"
    train(_config(tiny_sd15_dir, manifest, run, **{"train.max_steps": 1, "train.report_to": "none"}), progress=False)
    assert not (run / "logs").exists() and (run / "pytorch_lora_weights.safetensors").is_file()


def test_model_card_links_to_the_project_not_a_placeholder(finished_run):
    card = (finished_run / "README.md").read_text()
    assert "(https://github.com/)" not in card
    assert "[sipo](https://" in card
