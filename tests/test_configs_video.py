"""The video configs and the accelerate launch configs shipped in configs/."""

from __future__ import annotations

from pathlib import Path

import pytest

from sipo.config import load_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
ACCELERATE_CONFIGS = sorted((CONFIG_DIR / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_parse_with_accelerates_own_loader(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes == 8 and config.distributed_type.value in ("MULTI_GPU", "FSDP", "DEEPSPEED")


@pytest.mark.parametrize(
    "name, family, frames, fps, size",
    [
        ("cogvideox_2b_lora.yaml", "cogvideox", 49, 8, (480, 720)),
        ("cogvideox_5b_lora.yaml", "cogvideox", 49, 8, (480, 720)),
        ("wan21_1.3b_lora.yaml", "wan", 81, 16, (480, 832)),
        ("wan22_ti2v_5b_lora.yaml", "wan", 121, 24, (704, 1280)),
        ("wan22_t2v_a14b_lora.yaml", "wan", 81, 16, (480, 832)),
        ("ltx2_lora.yaml", "ltx2", 121, 24, (512, 768)),
        ("hunyuanvideo15_lora.yaml", "hunyuanvideo15", 121, 24, (480, 848)),
    ],
)
def test_video_configs_use_each_models_format_and_keep_the_text_encoder_off_the_gpu(name, family, frames, fps, size):
    config = load_config(CONFIG_DIR / name)
    assert config.model.family == family
    assert (config.data.num_frames, config.data.fps, (config.data.height, config.data.width)) == (frames, fps, size)
    assert (frames - 1) % 4 == 0 and size[0] % 16 == 0 and size[1] % 16 == 0  # VAE x patch factors
    assert config.model.text_encoder_device == "cpu" and config.model.prompt_cache_size > 0
    # SPEC 4a, video: SIPO 0.02 in the paper's units = 20 here (x1000, as image DPO 5 = 5000)
    assert config.objective.name == "sipo" and config.objective.beta == 20.0


def test_shipped_wan_config_trains_through_the_cli(tmp_path):
    """`python -m sipo train --config configs/wan21_1.3b_lora.yaml` with only paths and sizes
    overridden: the shipped values (CPU text encoder, prompt cache, checkpointing, sipo beta 20) run."""
    import subprocess
    import sys

    from video_fixtures import write_video_pairs

    from sipo.models.wan import WanAdapter

    model_dir = WanAdapter.build_random_pipeline(tmp_path / "model")
    manifest = write_video_pairs(tmp_path / "pairs", num_pairs=2, frames=9, size=32)
    overrides = [
        f"model.pretrained_path={model_dir}", f"data.path={manifest}", f"train.output_dir={tmp_path / 'run'}",
        "data.num_frames=9", "data.height=32", "data.width=32", "data.num_workers=0",
        "train.max_steps=1", "train.gradient_accumulation_steps=1", "train.lora_rank=4", "train.lora_alpha=4",
        "train.mixed_precision=\"no\"",  # quoted: YAML reads a bare no as false. bf16 matmuls are ~100x slower than fp32 on CPUs without AMX
    ]
    completed = subprocess.run(
        [sys.executable, "-m", "sipo", "train", "--config", str(CONFIG_DIR / "wan21_1.3b_lora.yaml"), *overrides, "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
