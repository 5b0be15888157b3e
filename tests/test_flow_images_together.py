"""`sipo cache`, training from it, `sipo eval` and per-prompt generators on the flow image families (FLUX, SD3.5,
FLUX.2 [klein], Z-Image).

The guarantees test_families_together.py gives the other families: training from the cache equals
training from the pictures (to test_cache.py's tolerance) with every text encoder replaced by a module
that raises, `sipo eval` scores the base and the trained run, and a picture is the same alone or batched.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from test_families_together import CACHE_RUN, RaisingEncoder, _assert_same_training, _csv_scores, _eval
from tiny_scorers import make_tiny_clip
from train_fixtures import tiny_overrides, write_jsonl_pairs

from sipo.cli import main as cli_main
from sipo.config import load_config, save_config
from sipo.evaluate import load_picture
from sipo.models import load_adapter
from sipo.train import train

SIZE = 32
FAMILIES = ("flux", "sd3", "flux2", "zimage")  # flux2: FLUX.2 [klein] (issue 28)


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory) -> dict[str, Path]:
    from sipo.models.flux import FluxAdapter
    from sipo.models.flux2 import Flux2Adapter
    from sipo.models.sd3 import SD3Adapter
    from sipo.models.zimage import ZImageAdapter

    return {"flux": FluxAdapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_flux")),
            "sd3": SD3Adapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_sd3")),
            "flux2": Flux2Adapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_flux2_klein")),
            "zimage": ZImageAdapter.build_random_pipeline(tmp_path_factory.mktemp("tiny_zimage"))}


def _config(family: str, model_dir: Path, manifest: Path, output_dir: Path, **extra):
    # batch 4 = the 4 pairs: the text encoders see as many prompts per call as while caching
    values = {"model.family": family, "model.resolution": SIZE, "data.random_flip": True, "train.batch_size": 4,
              **CACHE_RUN, **extra}
    return load_config(None, tiny_overrides(model_dir, manifest, output_dir, **values))


@pytest.fixture(scope="module", params=FAMILIES)
def flow_runs(request, flow_dirs, tmp_path_factory):
    """`sipo cache`, then 3 steps from the pictures and 3 from the cache with every text encoder raising."""
    family = request.param
    model_dir = flow_dirs[family]
    root = tmp_path_factory.mktemp(f"{family}_cache")
    manifest = write_jsonl_pairs(root / "pairs", num_pairs=4, size=SIZE)
    config = _config(family, model_dir, manifest, root / "unused")
    config_file = root / f"{family}.yaml"
    save_config(config, config_file)
    assert cli_main(["cache", "--config", str(config_file), "--no-progress"]) == 0
    # both runs get an adapter loaded before train(), so torch's generator is in the same state at the LoRA init
    pictures = train(_config(family, model_dir, manifest, root / "pictures", **{"data.use_cache": "never"}),
                     progress=False, adapter=load_adapter(family, str(model_dir), resolution=SIZE))
    adapter = load_adapter(family, str(model_dir), resolution=SIZE)
    for name in [n for n in adapter.parts if n.startswith("text_encoder")]:
        adapter.parts[name] = RaisingEncoder()
    with contextlib.redirect_stdout(io.StringIO()) as said:
        cached = train(_config(family, model_dir, manifest, root / "cached", **{"data.use_cache": "always"}),
                       progress=False, adapter=adapter)
    assert "training from the latent cache" in said.getvalue()
    with pytest.raises(AssertionError, match="text encoder ran"):  # the stand-ins are wired
        adapter.encode_prompts(["a smooth gradient number 0"])
    return family, root, pictures, cached


def test_training_from_the_cache_equals_training_from_pictures_without_text_encoders(flow_runs):
    family, root, pictures, cached = flow_runs
    _assert_same_training(root / "cached", root / "pictures")
    assert [r["loss"] for r in cached.history] == pytest.approx([r["loss"] for r in pictures.history], abs=1e-3)


@pytest.fixture(scope="module")
def clip_scorer(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip") / "pickscore")


def test_sipo_eval_scores_base_and_trained_run(flow_runs, clip_scorer, tmp_path, capsys):
    family, root, _, _ = flow_runs
    output = tmp_path / "eval"
    out = _eval(root / "cached" / "config.yaml", root / "cached", output, clip_scorer, capsys)  # the run's own config
    assert "| pickscore |" in out and "win rate" in out
    base = load_picture(output / "images" / "base" / "p00001_s1.png")
    aligned = load_picture(output / "images" / "aligned" / "p00001_s1.png")
    assert base.shape == aligned.shape == (3, SIZE, SIZE)  # sampled at the run's model.resolution
    # the tiny random VAE decoder turns the 3-step LoRA's change into about one 8-bit level: the saved
    # pictures differ (identical seeds and weights would give identical files), and before rounding the
    # aligned model's samples differ from the base's by far more than float noise
    assert (base - aligned).abs().max() > 0
    assert len(_csv_scores(output)) == 8
    from sipo.checkpoints import load_run_weights

    adapter = load_adapter(family, str(Path(load_config(root / "cached" / "config.yaml").model.pretrained_path)), resolution=SIZE)
    before = adapter.sample(["a red dog"], generator=torch.Generator().manual_seed(1), num_inference_steps=2)
    load_run_weights(adapter, root / "cached")
    after = adapter.sample(["a red dog"], generator=torch.Generator().manual_seed(1), num_inference_steps=2)
    assert (after - before).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_takes_one_generator_per_prompt(family, flow_dirs):
    """What `sipo eval` relies on: picture (prompt, seed) is the same alone or in a batch."""
    adapter = load_adapter(family, str(flow_dirs[family]), resolution=SIZE)

    def sample(prompts, seeds):
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        return adapter.sample(prompts, generator=generators, num_inference_steps=2, guidance_scale=3.5)

    batch = sample(["a red dog", "a cat"], [3, 5])
    alone = sample(["a cat"], [5])
    torch.testing.assert_close(batch[1], alone[0], rtol=0, atol=1e-5)
    assert (batch[0] - batch[1]).abs().max() > 1e-3
