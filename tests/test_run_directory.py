"""A run directory is the run's own (issue 17): the manifest behind --overwrite, the lock, nothing
left by a run that never took a step, the stop signals, and honest resume and throughput figures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sipo.checkpoints import list_checkpoints
from sipo.cli import main as cli_main
from sipo.config import load_config
from sipo.errors import SipoError, TrainingInterrupted
from sipo.rundir import LOCK_FILE, RUN_MANIFEST
from sipo.train import train
from train_fixtures import snapshot, tiny_overrides, write_jsonl_pairs, write_tiny_config

REPO = Path(__file__).resolve().parents[1]


def _config(model_dir: Path, manifest: Path, output_dir: Path, **extra):
    values = {"train.max_steps": 2, "train.checkpoint_every": 1, "train.report_to": "none", **extra}
    return load_config(None, tiny_overrides(model_dir, manifest, output_dir, **values))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_jsonl_pairs(tmp_path_factory.mktemp("pairs"), num_pairs=4)


# ----------------------------------------------------------------------------- item 1: --overwrite and model directories
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_dir_at_the_base_model_is_refused_and_the_model_untouched(tiny_sd15_dir, manifest, tmp_path, overwrite):
    model = tmp_path / "model"
    import shutil

    shutil.copytree(tiny_sd15_dir, model)
    before = snapshot(model)
    with pytest.raises(SipoError, match="is a diffusers model directory .* set train.output_dir to another directory"):
        train(_config(model, manifest, model), progress=False, overwrite=overwrite)
    assert snapshot(model) == before  # unet/ and every other file are still there, byte for byte


def test_overwrite_of_a_directory_without_manifest_is_refused(tiny_sd15_dir, manifest, tmp_path):
    folder = tmp_path / "mine"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "weights.bin").write_bytes(b"the user's")
    (folder / "config.yaml").write_text("mine: true\n")
    before = snapshot(folder)
    with pytest.raises(SipoError, match=rf"overwrite=True refused: .* has no readable {RUN_MANIFEST}"):
        train(_config(tiny_sd15_dir, manifest, folder), progress=False, overwrite=True)
    assert snapshot(folder) == before


def test_overwrite_removes_only_what_the_manifest_lists(tiny_sd15_dir, manifest, tmp_path):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "my_log.txt").write_text("written before any sipo run")
    train(_config(tiny_sd15_dir, manifest, run), progress=False)
    owned = json.loads((run / RUN_MANIFEST).read_text())["owned"]
    assert "logs" not in owned and "checkpoints" in owned and "config.yaml" in owned
    (run / "notes.md").write_text("added by the user after the run")
    train(_config(tiny_sd15_dir, manifest, run, **{"train.max_steps": 1}), progress=False, overwrite=True)
    assert (run / "logs" / "my_log.txt").read_text() == "written before any sipo run"
    assert (run / "notes.md").read_text() == "added by the user after the run"
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001"]


# ----------------------------------------------------------------------------- item 7: one run at a time
def test_a_directory_locked_by_a_live_process_is_refused(tiny_sd15_dir, manifest, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (run / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        for resume in (False, True):
            with pytest.raises(SipoError, match=rf"is in use by another sipo run \(pid {holder.pid} on "):
                train(_config(tiny_sd15_dir, manifest, run), progress=False, resume=resume)
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing written beside the lock
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tiny_sd15_dir, manifest, tmp_path):
    import socket

    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert train(_config(tiny_sd15_dir, manifest, run), progress=False).steps == 2
    assert not (run / LOCK_FILE).exists()  # released at the end


def test_the_lock_is_held_during_the_run_and_released_after(tiny_sd15_dir, manifest, tmp_path):
    seen = []
    train(_config(tiny_sd15_dir, manifest, tmp_path / "run"), progress=False,
          callbacks=[lambda step, adapter: seen.append(json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"])])
    assert seen == [os.getpid(), os.getpid()]
    assert not (tmp_path / "run" / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- item 21: nothing left before step 1
def test_a_run_failing_before_its_first_step_leaves_nothing(tiny_sd15_dir, tmp_path):
    data = write_jsonl_pairs(tmp_path / "pairs", num_pairs=2)
    (tmp_path / "pairs" / "000_chosen.png").write_bytes(b"not a png")  # found when indexing, fails when decoded
    run = tmp_path / "runs" / "new"
    with pytest.raises(SipoError):
        train(_config(tiny_sd15_dir, data, run, **{"data.strict": True}), progress=False)
    assert not run.exists()  # neither config.yaml, logs/, the manifest nor the directory the checks made
    write_jsonl_pairs(tmp_path / "pairs", num_pairs=2)  # the fixed data: the same command runs, no --overwrite
    assert train(_config(tiny_sd15_dir, data, run, **{"data.strict": True}), progress=False).steps == 2


# ----------------------------------------------------------------------------- items 13 and 16: resume
def test_resume_with_max_steps_below_the_checkpoint_stops_and_keeps_the_config(tiny_sd15_dir, manifest, tmp_path):
    run = tmp_path / "run"
    train(_config(tiny_sd15_dir, manifest, run, **{"train.max_steps": 3}), progress=False)
    before = snapshot(run)
    with pytest.raises(SipoError, match=r"step-00000003 already holds 3 steps, more than train.max_steps=2; set "
                                        r"train.max_steps to at least 3"):
        train(_config(tiny_sd15_dir, manifest, run, **{"train.max_steps": 2}), progress=False, resume=True)
    assert snapshot(run) == before


def test_resume_reads_past_a_cut_and_a_non_utf8_metrics_line(tiny_sd15_dir, manifest, tmp_path, capsys):
    run = tmp_path / "run"
    train(_config(tiny_sd15_dir, manifest, run, **{"train.max_steps": 2, "train.checkpoint_every": 1}), progress=False)
    import shutil

    shutil.rmtree(list_checkpoints(run)[-1])  # resume from step 1
    lines = (run / "metrics.jsonl").read_bytes().splitlines()
    (run / "metrics.jsonl").write_bytes(lines[0] + b"\n\xff\xfe garbage\n" + lines[1][: len(lines[1]) // 2])
    capsys.readouterr()
    result = train(_config(tiny_sd15_dir, manifest, run, **{"train.max_steps": 3}), progress=False, resume=True)
    assert result.steps == 3
    assert "metrics.jsonl: dropped 2 unreadable line(s)" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


# ----------------------------------------------------------------------------- item 12: pairs per second
def test_pairs_per_s_counts_the_pairs_that_reached_the_model(tiny_sd15_dir, tmp_path, capsys):
    data = write_jsonl_pairs(tmp_path / "pairs", num_pairs=3)
    (tmp_path / "pairs" / "002_rejected.png").write_bytes(b"broken")  # skipped and counted, not trained on
    config = _config(tiny_sd15_dir, data, tmp_path / "run", **{"train.max_steps": 1, "train.batch_size": 3})
    record = train(config, progress=False).history[-1]
    # s_per_step = elapsed / 1 step and pairs_per_s = pairs / elapsed: their product is the pairs the step used
    assert record["pairs_per_s"] * record["s_per_step"] == pytest.approx(2.0, rel=1e-9)
    assert record["skipped_rows"] == 1
    config = _config(tiny_sd15_dir, data, tmp_path / "big", **{"train.max_steps": 1, "train.batch_size": 8})
    train(config, progress=False)
    assert "train.batch_size=8 is more than the 3 pairs, so every micro-batch repeats pairs" in capsys.readouterr().out


# ----------------------------------------------------------------------------- item 20: SIGTERM and SIGINT
@pytest.fixture
def interactive_sigint():
    """SIGINT as an interactive Python has it: a shell's background job (make test under `&`, some CI
    runners) starts with SIGINT ignored, which the trainer leaves ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_ignored_sigint_stays_ignored(tiny_sd15_dir, manifest, tmp_path):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        def press(step, adapter):
            os.kill(os.getpid(), signal.SIGINT)

        result = train(_config(tiny_sd15_dir, manifest, tmp_path / "run"), progress=False, callbacks=[press])
        assert result.steps == 2 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigint_twice_in_one_step_exits_at_once_without_a_checkpoint(tiny_sd15_dir, manifest, tmp_path,
                                                                      interactive_sigint):
    def press_twice(step, adapter):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the first sets the flag: the step would finish and checkpoint
            os.kill(os.getpid(), signal.SIGINT)  # the second raises here, at once

    with pytest.raises(KeyboardInterrupt):
        train(_config(tiny_sd15_dir, manifest, tmp_path / "run", **{"train.max_steps": 4, "train.checkpoint_every": 0}),
              progress=False, callbacks=[press_twice])
    assert list_checkpoints(tmp_path / "run") == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back


def test_sigint_in_process_finishes_the_step_and_checkpoints_it(tiny_sd15_dir, manifest, tmp_path, interactive_sigint):
    def press(step, adapter):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as stopped:
        train(_config(tiny_sd15_dir, manifest, tmp_path / "run", **{"train.max_steps": 6, "train.checkpoint_every": 0}),
              progress=False, callbacks=[press])
    assert stopped.value.signum == signal.SIGINT and stopped.value.step == 2
    assert str(stopped.value) == ("stopped by SIGINT after step 2; its checkpoint is saved, continue with resume=True "
                                  "(from step-00000002)")
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000002"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_sigterm_then_resume_equals_an_uninterrupted_run(tiny_sd15_dir, tmp_path):
    data = write_jsonl_pairs(tmp_path / "pairs", num_pairs=5)
    common = {"train.max_steps": 10, "train.checkpoint_every": 0, "objective.name": "sipo", "objective.tau": 0.05,
              "train.lr_scheduler": "cosine", "train.lr_warmup_steps": 2, "train.deterministic": True,
              "train.report_to": "none"}
    straight_cfg = write_tiny_config(tmp_path / "straight.yaml", tiny_sd15_dir, data, tmp_path / "straight", **common)
    stopped_cfg = write_tiny_config(tmp_path / "stopped.yaml", tiny_sd15_dir, data, tmp_path / "stopped", **common)
    command = [sys.executable, "-m", "sipo", "train", "--no-progress", "--config"]
    process = subprocess.Popen([*command, str(stopped_cfg)], cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))  # whatever CI ignores
    metrics, deadline = tmp_path / "stopped" / "metrics.jsonl", time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the run never logged step 2"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("sipo: stopped by SIGTERM after step ") and "continue with --resume (from step-" in last
    stopped_at = [p.name for p in list_checkpoints(tmp_path / "stopped")]
    assert len(stopped_at) == 1 and stopped_at[0] != "step-00000010"  # checkpoint_every=0: the signal's own

    resumed = subprocess.run([*command, str(stopped_cfg), "--resume"], cwd=REPO, env=_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = subprocess.run([*command, str(straight_cfg)], cwd=REPO, env=_env(), capture_output=True, text=True,
                              timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    a = load_file(list_checkpoints(tmp_path / "straight")[-1] / "trainable.safetensors")
    b = load_file(list_checkpoints(tmp_path / "stopped")[-1] / "trainable.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    losses = lambda run: [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")


def test_a_short_run_whose_mask_kept_nothing_says_so(tiny_sd15_dir, manifest, tmp_path, capsys):
    train(_config(tiny_sd15_dir, manifest, tmp_path / "run", **{"objective.tau": 1.0e9}), progress=False)
    assert "warning: the mask dropped all 4 pairs of this run" in capsys.readouterr().out


# ----------------------------------------------------------------------------- launches (issue 21's FSDP-on-CPU report)
def test_processes_that_accelerate_left_apart_stop_before_training(monkeypatch):
    """`accelerate launch` with an FSDP config on 2 CPU processes gave each process a world of one:
    both trained alone and wrote every metrics line twice. That launch now stops in one sentence."""
    from sipo.rundir import check_launch

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SipoError, match=r"the launcher started 2 processes \(WORLD_SIZE=2\), but accelerate gave each "
                                        r"a world of one, so they would train apart"):
        check_launch(1)
    check_launch(2)  # a real group of two
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_launch(1)


def test_the_ranks_of_one_launch_share_its_lock_and_other_launches_do_not(tmp_path, monkeypatch):
    import socket

    from sipo.rundir import refuse_if_locked

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", "29500")
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
        lock = {"pid": holder.pid, "host": socket.gethostname(), "launch": "none:127.0.0.1:29500"}
        (tmp_path / LOCK_FILE).write_text(json.dumps(lock))
        refuse_if_locked(tmp_path)  # rank 1 of the launch whose rank 0 holds the lock
        monkeypatch.setenv("MASTER_PORT", "29501")
        with pytest.raises(SipoError, match="is in use by another sipo run"):
            refuse_if_locked(tmp_path)  # another launch
    finally:
        holder.kill()
        holder.wait()


def test_a_stop_crosses_a_process_boundary_whole():
    """TrainingInterrupted pickles with its signal and step (a `sipo sweep --workers` cell's comes back
    through its future); request_stop with no training running does nothing."""
    import pickle

    from sipo.train import request_stop

    stopped = pickle.loads(pickle.dumps(TrainingInterrupted("stopped by SIGTERM after step 3", signal.SIGTERM, 3)))
    assert (str(stopped), stopped.signum, stopped.step) == ("stopped by SIGTERM after step 3", signal.SIGTERM, 3)
    request_stop()  # no training in this process: no effect, no error
