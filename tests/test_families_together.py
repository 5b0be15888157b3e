"""`sipo cache`, `sipo train` from the cache and `sipo eval` on the families beyond SD1.5 (SDXL, Wan, CogVideoX).

Issue 11: every family gets the cache's guarantee (training from it equals training from the pictures,
to test_cache.py's tolerance); issue 12: video families are scored with frame-averaged image scorers.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_scorers import make_tiny_clip
from torch import nn
from train_fixtures import tiny_overrides
from video_contract import video_overrides
from video_fixtures import write_video_pairs

from sipo.checkpoints import list_checkpoints
from sipo.cli import main as cli_main
from sipo.config import load_config, save_config
from sipo.data.cache import open_cache
from sipo.data.pairs import flip_decision
from sipo.evaluate import load_picture
from sipo.models import load_adapter
from sipo.train import train

SDXL_SIZE = 32
#: test_cache.py's setting: one weight per pair outside the log-sigmoid, 3 steps, no intermediate checkpoints
#: and deterministic kernels, so the cache is encoded and the runs train with TF32 off on CUDA too
CACHE_RUN = {"objective.name": "sipo-outside", "objective.tau": 0.05, "train.max_steps": 3, "train.checkpoint_every": 0,
             "train.deterministic": True}


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(list_checkpoints(run)[-1] / "trainable.safetensors")


def _assert_same_training(cached: Path, pictures: Path) -> None:
    """test_cache.py's tolerance: equal to float32 rounding of the encoders, while the LoRA moved far more."""
    weights_p, weights_c = _final_weights(pictures), _final_weights(cached)
    assert weights_p.keys() == weights_c.keys()
    for name in weights_p:
        torch.testing.assert_close(weights_c[name], weights_p[name], rtol=0, atol=1e-5)
    assert max(float(v.abs().max()) for k, v in weights_c.items() if "lora_B" in k) > 1e-3


class RaisingEncoder(nn.Module):
    """Stands in for T5/UMT5 in a run that must not encode a prompt."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1), requires_grad=False)  # the trainer may move or cast it

    @property
    def dtype(self) -> torch.dtype:  # the pipelines' encode_prompt reads it before the call
        return self.weight.dtype

    def forward(self, *args, **kwargs):
        raise AssertionError("the text encoder ran during training from the latent cache")


# ----------------------------------------------------------------------------- SDXL
def _write_non_square_pairs(directory: Path, num_pairs: int = 4) -> Path:
    """Pairs whose winners are wider than high or higher than wide: each has its own crop (SDXL's time_ids)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(num_pairs):
        width, height = (45, 32) if i % 2 == 0 else (32, 41 + i)
        ramp = np.linspace(0, 255, width)[None, :, None] * rng.uniform(0.3, 1.0, size=3)
        Image.fromarray(np.repeat(ramp, height, axis=0).astype(np.uint8)).save(directory / f"{i}_c.png")
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(directory / f"{i}_r.png")
        lines.append(json.dumps({"prompt": f"a wide gradient {i}", "chosen": f"{i}_c.png", "rejected": f"{i}_r.png"}))
    (directory / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return directory / "pairs.jsonl"


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    from sipo.models.sdxl import SDXLAdapter

    return SDXLAdapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_sdxl"), scale="tiny", seed=0)


def _sdxl_config(model_dir: Path, manifest: Path, output_dir: Path, **extra):
    # batch 4 = the 4 pairs: the text encoders see as many prompts per call as while caching (the pooled
    # embedding moves by ~2e-7 with the batch size, which beta = 5000 would carry past the tolerance)
    values = {"model.family": "sdxl", "model.resolution": SDXL_SIZE, "data.random_flip": True, "train.batch_size": 4,
              **CACHE_RUN, **extra}
    return load_config(None, tiny_overrides(model_dir, manifest, output_dir, **values))


@pytest.fixture(scope="module")
def sdxl_runs(sdxl_dir, tmp_path_factory):
    """`sipo cache` (the CLI, in process), then 3 steps from the pictures and 3 from the cache."""
    root = tmp_path_factory.mktemp("sdxl_cache")
    manifest = _write_non_square_pairs(root / "pairs")
    config = _sdxl_config(sdxl_dir, manifest, root / "unused")
    config_file = root / "sdxl.yaml"
    save_config(config, config_file)
    assert cli_main(["cache", "--config", str(config_file), "--no-progress"]) == 0
    pictures = train(_sdxl_config(sdxl_dir, manifest, root / "pictures", **{"data.use_cache": "never"}), progress=False)
    with contextlib.redirect_stdout(io.StringIO()) as said:
        cached = train(_sdxl_config(sdxl_dir, manifest, root / "cached", **{"data.use_cache": "always"}), progress=False)
    assert "training from the latent cache" in said.getvalue()
    return root, config, pictures, cached


def test_sdxl_training_from_the_cache_equals_training_from_pictures(sdxl_runs):
    root, _, pictures, cached = sdxl_runs
    _assert_same_training(root / "cached", root / "pictures")
    assert [r["loss"] for r in cached.history] == pytest.approx([r["loss"] for r in pictures.history], abs=1e-3)


def test_sdxl_cache_carries_each_pairs_time_ids_in_both_orientations(sdxl_runs):
    """time_ids = (orig_h, orig_w, crop_top, crop_left, 32, 32) of each pair's winner; a flip mirrors crop_left."""
    _, config, _, _ = sdxl_runs
    cache = open_cache(config)
    # by hand (shorter side -> 32, centre crop): 45 wide x 32 high -> 45x32, left round(13 / 2) = 6, mirrored
    # 45 - 6 - 32 = 7; 32 wide x 42 high -> 32x42, top round(10 / 2) = 5; 32 x 44 -> top 6; no left to mirror
    plain = [[32, 45, 0, 6], [42, 32, 5, 0], [32, 45, 0, 6], [44, 32, 6, 0]]
    mirrored = [[32, 45, 0, 7], [42, 32, 5, 0], [32, 45, 0, 7], [44, 32, 6, 0]]
    flipped_seen = set()
    for epoch in (0, 1, 2):
        cache.set_epoch(epoch)
        for index in range(4):
            flipped = flip_decision(config.train.seed, epoch, index)
            flipped_seen.add(flipped)
            expected = torch.tensor((mirrored if flipped else plain)[index] + [SDXL_SIZE, SDXL_SIZE]).float()
            torch.testing.assert_close(cache[index]["conditioning"]["time_ids"], expected, rtol=0, atol=0)
    assert flipped_seen == {True, False}


# ----------------------------------------------------------------------------- video (Wan, CogVideoX)
@pytest.fixture(scope="module")
def video_dirs(tmp_path_factory) -> dict[str, Path]:
    from sipo.models.cogvideox import CogVideoXAdapter
    from sipo.models.hunyuanvideo15 import HunyuanVideo15Adapter
    from sipo.models.ltx2 import LTX2Adapter
    from sipo.models.wan import WanAdapter

    return {"wan": WanAdapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_wan")),
            "cogvideox": CogVideoXAdapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_cogvideox"), variant="5b"),
            "ltx2": LTX2Adapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_ltx2")),
            "hunyuanvideo15": HunyuanVideo15Adapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_hunyuanvideo15"))}


def _video_config(family: str, model_dir: Path, manifest: Path, output_dir: Path, **extra):
    # batch 2 = the 2 pairs: the text encoder sees as many prompts per call as while caching
    values = {"data.random_flip": True, "train.batch_size": 2, "model.prompt_cache_size": 0, **CACHE_RUN, **extra}
    return load_config(None, video_overrides(family, model_dir, manifest, output_dir, **values))


@pytest.fixture(scope="module", params=["wan", "cogvideox", "ltx2", "hunyuanvideo15"])
def video_runs(request, video_dirs, tmp_path_factory):
    """`sipo cache` on mp4 pairs, then 3 steps from the clips and 3 from the cache with T5/UMT5 replaced by
    a module that raises."""
    family = request.param
    root = tmp_path_factory.mktemp(f"{family}_cache")
    manifest = write_video_pairs(root / "pairs", num_pairs=2)
    config = _video_config(family, video_dirs[family], manifest, root / "unused")
    config_file = root / f"{family}.yaml"
    save_config(config, config_file)
    assert cli_main(["cache", "--config", str(config_file), "--no-progress"]) == 0
    # both runs get an adapter loaded before train(): loading draws from torch's generator, the LoRA init after it
    pictures = train(_video_config(family, video_dirs[family], manifest, root / "pictures", **{"data.use_cache": "never"}),
                     progress=False, adapter=load_adapter(family, str(video_dirs[family])))
    adapter = load_adapter(family, str(video_dirs[family]))
    adapter.text_encoder = RaisingEncoder()
    with contextlib.redirect_stdout(io.StringIO()) as said:
        cached = train(_video_config(family, video_dirs[family], manifest, root / "cached", **{"data.use_cache": "always"}),
                       progress=False, adapter=adapter)
    assert "training from the latent cache" in said.getvalue()
    with pytest.raises(AssertionError, match="text encoder ran"):  # the stand-in is wired: a prompt would have stopped
        adapter.encode_prompts(["a moving gradient 0"])
    return family, root, config_file, pictures, cached


def test_video_training_from_the_cache_equals_training_from_clips_without_the_text_encoder(video_runs):
    family, root, _, pictures, cached = video_runs
    _assert_same_training(root / "cached", root / "pictures")
    assert [r["loss"] for r in cached.history] == pytest.approx([r["loss"] for r in pictures.history], abs=1e-3)


def test_a_video_cache_is_keyed_by_the_clip_sampling(video_runs, video_dirs):
    """Other frames per clip make other latents: that cache no longer matches."""
    family, root, config_file, _, _ = video_runs
    manifest = root / "pairs" / "pairs.jsonl"
    same = _video_config(family, video_dirs[family], manifest, root / "x")
    other = _video_config(family, video_dirs[family], manifest, root / "x", **{"data.num_frames": 5})
    assert open_cache(same) is not None and open_cache(other) is None


# ----------------------------------------------------------------------------- sipo eval
@pytest.fixture(scope="module")
def clip_scorer(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip") / "pickscore")


def _eval(config_file: Path, run: Path, output: Path, scorer: Path, capsys) -> str:
    prompts = output.parent / "prompts.txt"
    prompts.write_text("a moving gradient 0\na red dog\n")
    capsys.readouterr()
    assert cli_main(["eval", "--config", str(config_file), "--checkpoint", str(run), "--prompts", str(prompts),
                     "--seeds", "0,1", "--scorers", "pickscore", "--scorer-path", f"pickscore={scorer}",
                     "--num-inference-steps", "2", "--batch-size", "2", "--output-dir", str(output), "--no-progress"]) == 0
    return capsys.readouterr().out


def _csv_scores(output: Path) -> dict[tuple[str, str, str], float]:
    import csv

    rows = list(csv.DictReader((output / "scores.csv").open()))
    assert len(rows) == 2 * 2 * 2  # models x prompts x seeds
    return {(r["model"], r["prompt_index"], r["seed"]): float(r["pickscore"]) for r in rows}


def test_sipo_eval_on_a_video_family_scores_the_frame_average(video_runs, clip_scorer, tmp_path, capsys):
    from sipo.rewards import load_scorer

    family, root, config_file, _, _ = video_runs
    output = tmp_path / "eval"
    out = _eval(config_file, root / "cached", output, clip_scorer, capsys)
    assert "| pickscore |" in out and "win rate" in out
    for name in ("scores.csv", "summary.md", "summary.json", "grid.png"):
        assert (output / name).is_file()
    base, aligned = (output / "images" / m / "p00000_s0" for m in ("base", "aligned"))
    assert base.is_dir() and len(list(base.glob("frame_*.png"))) == 9  # the 9 frames the run trained on, 32x32
    video = load_picture(base)
    assert video.shape == (9, 3, 32, 32)
    # the LoRA changed the clip: with the base weights the same seeds and sampler give a bit-identical clip, so
    # any pixel that moved is the LoRA's (3 steps move LTX-2's tiny clip by 1/255 at most)
    assert (load_picture(aligned) - video).abs().max() > 0
    # the reported score of a clip is the mean of its frames scored one by one as pictures
    scorer = load_scorer("pickscore", str(clip_scorer), torch.device("cpu"))
    by_frame = scorer.score(video, ["a moving gradient 0"] * 9)
    assert _csv_scores(output)[("base", "0", "0")] == pytest.approx(float(by_frame.mean()), abs=1e-4)
    assert float(by_frame.std()) > 0  # the frames differ, so the mean is not a single frame's score


def test_sipo_eval_on_sdxl(sdxl_runs, clip_scorer, tmp_path, capsys):
    root = sdxl_runs[0]

    output = tmp_path / "eval"
    out = _eval(root / "cached" / "config.yaml", root / "cached", output, clip_scorer, capsys)  # the run's own config
    assert "| pickscore |" in out and "win rate" in out
    base = load_picture(output / "images" / "base" / "p00001_s1.png")
    aligned = load_picture(output / "images" / "aligned" / "p00001_s1.png")
    assert base.shape == aligned.shape == (3, SDXL_SIZE, SDXL_SIZE)
    assert (base - aligned).abs().max() > 2 / 255
    assert len(_csv_scores(output)) == 8


# ----------------------------------------------------------------------------- one generator per prompt
def _sample_each_family(family: str, model_dir: Path, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    adapter = load_adapter(family, str(model_dir))
    sizes = {} if family == "sdxl" else {"height": 32, "width": 32, "num_frames": 9}
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return adapter.sample(prompts, generator=generators, num_inference_steps=2, guidance_scale=5.0, **sizes)


@pytest.mark.parametrize("family", ["sdxl", "wan", "cogvideox", "ltx2", "hunyuanvideo15"])
def test_sample_takes_one_generator_per_prompt(family, sdxl_dir, video_dirs):
    """What `sipo eval` relies on: picture (prompt, seed) is the same alone or in a batch, whatever its neighbours."""
    model_dir = sdxl_dir if family == "sdxl" else video_dirs[family]
    batch = _sample_each_family(family, model_dir, ["a red dog", "a cat"], [3, 5])
    alone = _sample_each_family(family, model_dir, ["a cat"], [5])
    torch.testing.assert_close(batch[1], alone[0], rtol=0, atol=1e-5)
    assert (batch[0] - batch[1]).abs().max() > 1e-3  # other prompt and seed, another picture
