"""Crash safety and safe loading (issue: runs that survive crashes and load nothing unsafe)."""

from __future__ import annotations

import ast
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
from train_fixtures import write_jsonl_pairs, write_tiny_config

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 24


def _train_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sipo", "train", "--config", str(config), "--no-progress", *extra]


def _env() -> dict[str, str]:
    # One thread in every process, so the interrupted and the straight run do identical arithmetic.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _compare_checkpoints(a: Path, b: Path) -> None:
    weights_a, weights_b = load_file(a / "trainable.safetensors"), load_file(b / "trainable.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=0, atol=1e-6)
    optim_a = torch.load(a / "optimizer.pt", weights_only=True)
    optim_b = torch.load(b / "optimizer.pt", weights_only=True)
    assert optim_a["param_groups"] == optim_b["param_groups"]
    for key, state in optim_a["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(value, optim_b["state"][key][name], rtol=0, atol=1e-6)
    assert torch.load(a / "lr_scheduler.pt", weights_only=True) == torch.load(b / "lr_scheduler.pt", weights_only=True)
    state_a, state_b = json.loads((a / "state.json").read_text()), json.loads((b / "state.json").read_text())
    assert state_a == state_b and state_a["micro_batches"] == MAX_STEPS  # the data position


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tiny_sd15_dir, tmp_path):
    manifest = write_jsonl_pairs(tmp_path / "pairs", num_pairs=5)  # 5 pairs, batch 2: epochs wrap mid-batch
    common = {"train.max_steps": MAX_STEPS, "train.checkpoint_every": 2, "train.keep_last": 2,
              "objective.name": "sipo", "objective.tau": 0.05, "train.lr_scheduler": "cosine", "train.lr_warmup_steps": 3,
              "train.deterministic": True}  # bit-exact kernels: the comparison holds on CUDA too
    straight_cfg = write_tiny_config(tmp_path / "straight.yaml", tiny_sd15_dir, manifest, tmp_path / "straight", **common)
    killed_cfg = write_tiny_config(tmp_path / "killed.yaml", tiny_sd15_dir, manifest, tmp_path / "killed", **common)

    process = subprocess.Popen(_train_command(killed_cfg), cwd=REPO, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not any(int(p.name.split("-")[1]) >= 4 for p in list_checkpoints(tmp_path / "killed")):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the run never wrote its step-4 checkpoint"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "pytorch_lora_weights.safetensors").exists(), "killed after the run had finished"
    steps_at_kill = [p.name for p in list_checkpoints(tmp_path / "killed")]
    assert steps_at_kill and f"step-{MAX_STEPS:08d}" not in steps_at_kill

    resumed = subprocess.run(_train_command(killed_cfg, "--resume"), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    straight = subprocess.run(_train_command(straight_cfg), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]

    final_killed = list_checkpoints(tmp_path / "killed")
    final_straight = list_checkpoints(tmp_path / "straight")
    assert [p.name for p in final_killed] == [p.name for p in final_straight]  # keep_last=2 honoured in both
    assert len(final_killed) == 2
    _compare_checkpoints(final_straight[-1], final_killed[-1])
    metrics_a = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    metrics_b = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics_a) == len(metrics_b) == MAX_STEPS  # no step logged twice after the resume


def test_resume_without_checkpoint_is_one_sentence(tiny_sd15_dir, tmp_path, capsys):
    from sipo.cli import main

    manifest = write_jsonl_pairs(tmp_path / "pairs", num_pairs=2)
    config = write_tiny_config(tmp_path / "c.yaml", tiny_sd15_dir, manifest, tmp_path / "run")
    assert main(["train", "--config", str(config), "--resume"]) == 2
    assert "found no checkpoint" in capsys.readouterr().err


def _calls(tree: ast.AST, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            full = f"{getattr(func.value, 'id', '')}.{func.attr}" if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if full == name or (isinstance(func, ast.Attribute) and func.attr == name.split(".")[-1] and name.startswith(".")):
                yield node


@pytest.mark.parametrize("path", sorted((REPO / "src" / "sipo").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_source_loads_nothing_unsafe(path):
    """Every torch.load passes weights_only=True; nothing turns trust_remote_code on; no pickle."""
    tree = ast.parse(path.read_text())
    for call in _calls(tree, "torch.load"):
        keywords = {k.arg: k.value for k in call.keywords}
        assert "weights_only" in keywords and getattr(keywords["weights_only"], "value", None) is True, f"{path}:{call.lineno}"
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
            assert not (isinstance(node.value, ast.Constant) and node.value.value is True), f"{path}:{node.value.lineno}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
            assert "pickle" not in names, f"{path}: imports pickle"
