"""Small preference datasets and configs for trainer tests (written by the tests, never downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_jsonl_pairs(directory: Path, num_pairs: int = 8, size: int = 32, seed: int = 0) -> Path:
    """PNG pairs + ``pairs.jsonl``: winners are smooth gradients, losers are noise (a learnable preference)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float64)
    lines = []
    for i in range(num_pairs):
        tint = rng.uniform(0.3, 1.0, size=3)
        smooth = (ramp[None, :, None] * tint[None, None, :]).repeat(size, axis=0).astype(np.uint8)
        noisy = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(smooth).save(directory / f"{i:03d}_chosen.png")
        Image.fromarray(noisy).save(directory / f"{i:03d}_rejected.png")
        lines.append(json.dumps({"prompt": f"a smooth gradient number {i}", "chosen": f"{i:03d}_chosen.png",
                                 "rejected": f"{i:03d}_rejected.png"}))
    manifest = directory / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def tiny_overrides(model_dir: Path, manifest: Path, output_dir: Path, **extra: object) -> list[str]:
    """``key=value`` overrides that point a config at the tiny SD1.5 model and the tiny dataset."""
    values = {
        "model.family": "sd15",
        "model.pretrained_path": str(model_dir),
        "model.resolution": 32,
        "data.format": "jsonl",
        "data.path": str(manifest),
        "objective.beta": 5000.0,
        "train.output_dir": str(output_dir),
        "train.max_steps": 2,
        "train.batch_size": 2,
        "train.learning_rate": 1e-3,
        "train.log_every": 1,
        "train.checkpoint_every": 1,
        "train.lora_rank": 4,
        "train.lora_alpha": 4.0,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def write_tiny_config(path: Path, model_dir: Path, manifest: Path, output_dir: Path, **extra: object) -> Path:
    """The same settings as a YAML file, for CLI tests."""
    import yaml

    nested: dict = {}
    for override in tiny_overrides(model_dir, manifest, output_dir, **extra):
        key, value = override.split("=", 1)
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(nested))
    return path


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes: 'nothing was written' means this is unchanged."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
