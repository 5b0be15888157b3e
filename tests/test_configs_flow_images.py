"""The shipped FLUX.1-dev, SD3.5, FLUX.2 and Z-Image configs: each model's own format and recipe values, and the FLUX
config training through the CLI on the tiny model with only paths and sizes overridden."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sipo.config import load_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name, family, sampling", [
    ("flux1_dev_lora.yaml", "flux", "uniform"),         # train_dreambooth_lora_flux.py: --weighting_scheme none
    ("sd35_medium_lora.yaml", "sd3", "logit_normal"),   # train_dreambooth_lora_sd3.py: --weighting_scheme logit_normal
    ("sd35_large_lora.yaml", "sd3", "logit_normal"),
    ("flux2_klein_4b_lora.yaml", "flux2", "uniform"),  # train_dreambooth_lora_flux2_klein.py: --weighting_scheme none
    ("flux2_klein_9b_lora.yaml", "flux2", "uniform"),
    ("flux2_dev_lora.yaml", "flux2", "uniform"),       # train_dreambooth_lora_flux2.py: --weighting_scheme none
    ("zimage_lora.yaml", "zimage", "uniform"),         # train_dreambooth_lora_z_image.py: --weighting_scheme none
])
def test_flow_image_configs_use_each_models_format(name, family, sampling):
    config = load_config(CONFIG_DIR / name)
    assert config.model.family == family
    assert config.model.resolution == 1024 and config.model.resolution % 16 == 0  # VAE factor 8 x 2x2 patches
    assert config.model.text_encoder_device == "cpu"  # T5-XXL stays off the GPU
    assert config.objective.timestep_sampling == sampling
    # SPEC 4a, images: SIPO 1 in the paper's units = 1000 here; SimpleTuner's Flow-DPO has the same z scaling
    assert config.objective.name == "sipo" and config.objective.beta == 1000.0
    assert config.train.finetune == "lora" and config.train.lora_target_modules == []  # the scripts' defaults
    assert config.train.mixed_precision == "bf16" and config.train.gradient_checkpointing
    if family in ("flux", "flux2"):
        assert config.model.guidance == 3.5  # the flux, flux2 scripts' --guidance_scale (only [dev]s embed it)


def test_shipped_flux_config_trains_through_the_cli(tmp_path):
    from train_fixtures import write_jsonl_pairs

    from sipo.models.flux import FluxAdapter

    model_dir = FluxAdapter.build_random_pipeline(tmp_path / "model")
    manifest = write_jsonl_pairs(tmp_path / "pairs", num_pairs=2, size=32)
    overrides = [
        f"model.pretrained_path={model_dir}", "model.resolution=32", "data.format=jsonl", f"data.path={manifest}",
        f"train.output_dir={tmp_path / 'run'}", "data.num_workers=0", "train.max_steps=1",
        "train.gradient_accumulation_steps=1",
        "train.mixed_precision=\"no\"",  # quoted: YAML reads a bare no as false; bf16 matmuls are slow on CPUs
    ]
    completed = subprocess.run(
        [sys.executable, "-m", "sipo", "train", "--config", str(CONFIG_DIR / "flux1_dev_lora.yaml"), *overrides, "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
