"""Run directories and checkpoints: write atomically, list, load, and put a run's weights into a model.

A checkpoint is ``<output_dir>/checkpoints/step-NNNNNNNN/`` holding ``trainable.safetensors``,
``optimizer.pt`` and ``lr_scheduler.pt`` (tensors only, read with ``weights_only=True``),
``rng_and_ema.safetensors`` and ``state.json`` (written last). It is filled under a ``.tmp-`` name
and renamed, so a crash never leaves a half-written checkpoint under a listed name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sipo.config import SipoConfig, config_from_dict
from sipo.errors import SipoError
from sipo.models.base import DiffusionAdapter, add_lora

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""

    step: int = 0
    micro_batches: int = 0  # global micro-batches consumed: the data position
    consecutive_bad_steps: int = 0
    bad_steps: int = 0
    all_masked_batches: int = 0
    skipped_rows: int = 0
    ema: Tensor | None = None
    ema_seen: Tensor | None = None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Half-written ones live under a ``.tmp-`` name and never match."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_PATTERN.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(
    output_dir: Path, trainable: dict[str, Tensor], optimizer, lr_scheduler, state: TrainState,
    generator: torch.Generator, keep_last: int,
) -> Path:
    """Write a checkpoint atomically: fill ``.tmp-step-N``, fsync, then rename to ``step-N``."""
    root = output_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
    tensors = {"generator_state": generator.get_state()}
    if state.ema is not None:
        tensors["ema"] = state.ema.cpu()
        tensors["ema_seen"] = state.ema_seen.cpu().to(torch.uint8)
    save_file(tensors, tmp / "rng_and_ema.safetensors")
    plain = {k: v for k, v in state.__dict__.items() if k not in ("ema", "ema_seen")}
    (tmp / "state.json").write_text(json.dumps(plain, indent=2))  # written last: marks completeness
    for child in tmp.iterdir():
        with open(child, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, trainable_module_params: dict[str, nn.Parameter], optimizer, lr_scheduler,
                    generator: torch.Generator) -> TrainState:
    """Restore weights, optimizer, lr schedule, RNG, EMA and counters; loads tensors only (no pickle code)."""
    weights = load_file(path / "trainable.safetensors")
    missing = set(trainable_module_params) - set(weights)
    if missing:
        raise SipoError(
            f"checkpoint {path} does not match this model ({len(missing)} trainable tensors missing); "
            "resume with the config the run was started with"
        )
    with torch.no_grad():
        for name, param in trainable_module_params.items():
            param.copy_(weights[name].to(param.device, param.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
    tensors = load_file(path / "rng_and_ema.safetensors")
    generator.set_state(tensors["generator_state"])
    state = TrainState(**json.loads((path / "state.json").read_text()))
    if "ema" in tensors:
        state.ema = tensors["ema"]
        state.ema_seen = tensors["ema_seen"].bool()
    return state


def load_run_weights(adapter: DiffusionAdapter, run_dir: str | Path) -> SipoConfig:
    """Put a finished or interrupted run's trained weights into ``adapter`` (LoRA injected if needed).

    Reads the run's saved config and its latest checkpoint (safetensors only). Returns that config.
    """
    import yaml

    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    checkpoints = list_checkpoints(run_dir)
    if not saved.is_file() or not checkpoints:
        raise SipoError(f"{run_dir} is not a sipo run directory (needs config.yaml and checkpoints/step-*); pass the train.output_dir of a run")
    run_config = config_from_dict(yaml.safe_load(saved.read_text()))
    if run_config.model.family != adapter.family:
        raise SipoError(f"{run_dir} was trained on a {run_config.model.family} model, not {adapter.family}; pass a matching config")
    if run_config.train.finetune == "lora" and not any("lora_" in n for n, _ in adapter.denoiser.named_parameters()):
        add_lora(adapter, run_config)
    weights = load_file(checkpoints[-1] / "trainable.safetensors")
    params = dict(adapter.denoiser.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise SipoError(f"{checkpoints[-1]} holds weights this model lacks (e.g. {unknown[0]}); pass the config the run was trained with")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    return run_config
