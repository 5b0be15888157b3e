"""`sipo cache`, `sipo train` from the cache and `sipo eval` on the issue-19 families of this branch:
Wan2.2-TI2V-5B, Wan2.2-T2V-A14B (two experts) and Qwen-Image, as test_families_together.py does it for
the earlier ones: training from the cache equals training from the pictures (test_cache.py's
tolerance) with the text encoder replaced by a module that raises, and `sipo eval` scores the run.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from test_families_together import CACHE_RUN, RaisingEncoder, _assert_same_training, _csv_scores, _eval, _video_config
from tiny_scorers import make_tiny_clip
from train_fixtures import tiny_overrides, write_jsonl_pairs
from video_fixtures import write_video_pairs

from sipo.cli import main as cli_main
from sipo.config import load_config, save_config
from sipo.evaluate import load_picture
from sipo.models import load_adapter
from sipo.train import train

QWEN_SIZE = 32
#: test id -> (model.family, Wan variant or None for Qwen-Image)
CELLS = {"wan22-ti2v-5b": ("wan", "2.2-ti2v-5b"), "wan22-t2v-a14b": ("wan", "2.2-t2v-a14b"), "qwenimage": ("qwenimage", None)}


def _qwen_config(model_dir: Path, manifest: Path, output_dir: Path, **extra):
    # batch 4 = the 4 pairs: the text encoder sees as many prompts per call as while caching
    values = {"model.family": "qwenimage", "model.resolution": QWEN_SIZE, "data.random_flip": True, "train.batch_size": 4,
              **CACHE_RUN, **extra}
    return load_config(None, tiny_overrides(model_dir, manifest, output_dir, **values))


def _load(family: str, model_dir: Path):
    return load_adapter(family, str(model_dir), resolution=QWEN_SIZE)  # resolution: Qwen-Image's shift; Wan ignores it


@pytest.fixture(scope="module", params=sorted(CELLS))
def flow_runs(request, tmp_path_factory):
    """Build the tiny model, `sipo cache`, then 3 steps from the pictures and 3 from the cache (text encoder raising)."""
    family, variant = CELLS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    if family == "wan":
        from sipo.models.wan import WanAdapter

        model_dir = WanAdapter.build_random_pipeline(root / "model", variant=variant)
        manifest = write_video_pairs(root / "pairs", num_pairs=2)

        def config_for(output: Path, **extra):
            return _video_config(family, model_dir, manifest, output, **extra)
    else:
        from sipo.models.qwenimage import QwenImageAdapter

        model_dir = QwenImageAdapter.build_random_pipeline(root / "model")
        manifest = write_jsonl_pairs(root / "pairs", num_pairs=4, size=QWEN_SIZE)

        def config_for(output: Path, **extra):
            return _qwen_config(model_dir, manifest, output, **extra)
    config_file = root / "config.yaml"
    save_config(config_for(root / "unused"), config_file)
    assert cli_main(["cache", "--config", str(config_file), "--no-progress"]) == 0
    # both runs get an adapter loaded before train(): loading draws from torch's generator, the LoRA init after it
    pictures = train(config_for(root / "pictures", **{"data.use_cache": "never"}), progress=False, adapter=_load(family, model_dir))
    adapter = _load(family, model_dir)
    adapter.text_encoder = RaisingEncoder()
    with contextlib.redirect_stdout(io.StringIO()) as said:
        cached = train(config_for(root / "cached", **{"data.use_cache": "always"}), progress=False, adapter=adapter)
    assert "training from the latent cache" in said.getvalue()
    with pytest.raises(AssertionError, match="text encoder ran"):  # the stand-in is wired: a prompt would have stopped
        adapter.encode_prompts(["a moving gradient 0"])
    return request.param, root, config_file, pictures, cached


def test_training_from_the_cache_equals_training_from_pictures_without_the_text_encoder(flow_runs):
    _, root, _, pictures, cached = flow_runs
    _assert_same_training(root / "cached", root / "pictures")
    assert [r["loss"] for r in cached.history] == pytest.approx([r["loss"] for r in pictures.history], abs=1e-3)


@pytest.fixture(scope="module")
def clip_scorer(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip_flow") / "pickscore")


def test_sipo_eval_scores_base_and_aligned(flow_runs, clip_scorer, tmp_path, capsys):
    name, root, config_file, _, _ = flow_runs
    output = tmp_path / "eval"
    out = _eval(config_file, root / "cached", output, clip_scorer, capsys)
    assert "| pickscore |" in out and "win rate" in out
    assert len(_csv_scores(output)) == 8
    images = output / "images"
    if CELLS[name][0] == "wan":
        base, aligned = (load_picture(images / m / "p00000_s0") for m in ("base", "aligned"))
        assert base.shape == (9, 3, 32, 32)  # the 9 frames of 32x32 the run trained on
    else:
        base, aligned = (load_picture(images / m / "p00001_s1.png") for m in ("base", "aligned"))
        assert base.shape == (3, QWEN_SIZE, QWEN_SIZE)  # the run's resolution, not the pipeline's 1024
    # the LoRA changed the picture: 3 steps on these one-block models move it by ~1/255 (A14B: only the experts
    # the 3 pairs' timesteps chose trained), so any change of a pixel level counts
    assert torch.isfinite(aligned).all() and (aligned - base).abs().max() > 0
