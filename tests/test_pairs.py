"""`sipo pairs` and `objective.noise=stored` (docs/spec.md section 11): the pairing rules and the
standardised sum by hand, pairs then training on the tiny SD1.5 and the tiny FLUX, a killed run
continued to the same bytes, the folder's identity, and each side's x_t against the starting noise
recomputed here from the seed as the pipelines draw it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_scorers import make_tiny_clip
from train_fixtures import tiny_overrides, write_jsonl_pairs

from sipo.config import load_config
from sipo.errors import SipoError
from sipo.pairs import PairsOptions, choose_pairs, combined_scores, make_pairs, read_scores

PROMPTS = "a photo of a cat\na red dog\nthe blue painting\n"


# ----------------------------------------------------------------------------- pure parts
def test_pairing_rules_by_hand():
    scores = [0.5, 2.0, -1.0, 2.0]  # positions 1 and 3 tie for best; 2 is the worst
    assert choose_pairs(scores, "best-worst") == [(1, 2, 3.0)]  # the tie goes to the first position
    every = choose_pairs(scores, "all")
    assert sorted((w, l) for w, l, _ in every) == sorted([(1, 0), (1, 2), (3, 0), (3, 2), (0, 2)])  # the tie 1-3 dropped
    assert all(m == pytest.approx(scores[w] - scores[l]) for w, l, m in every)
    # margin: widest first, each picture once: (1, 2) 3.0, then (3, 0) 1.5
    assert choose_pairs(scores, "margin") == [(1, 2, 3.0), (3, 0, 1.5)]
    assert choose_pairs(scores, "all", min_margin=1.5) == [(1, 2, 3.0), (3, 2, 3.0)]
    assert choose_pairs([1.0, 1.0], "best-worst") == []


def test_combined_score_is_the_weighted_sum_of_standardised_scores():
    raw = {"a": np.array([1.0, 2.0, 3.0, 6.0]), "b": np.array([10.0, 10.0, 10.0, 10.0])}
    total, stats = combined_scores(raw, [2.0, 1.0])
    mean, std = 3.0, math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 4)  # population std 3.5 ** 0.5
    np.testing.assert_allclose(total, 2.0 * (raw["a"] - mean) / std)  # b is constant: standardised to 0
    assert stats["a"] == {"mean": 3.0, "std": pytest.approx(std), "weight": 2.0}


# ----------------------------------------------------------------------------- the command on tiny SD1.5
@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("pairs_scorer") / "clip", positive=True)


def _sd15_config(model_dir: Path, root: Path, **extra):
    return load_config(None, tiny_overrides(model_dir, root / "none.jsonl", root / "run", **extra))


def _options(prompts: Path, out: Path, scorer_dir: Path, **extra) -> PairsOptions:
    values = dict(prompts=str(prompts), out=out, samples_per_prompt=3, scorers=["pickscore", "clipscore"],
                  scorer_weights=[1.0, 0.5], scorer_paths={"pickscore": str(scorer_dir), "clipscore": str(scorer_dir)},
                  pairing="all", num_inference_steps=2, batch_size=2, progress=False)
    values.update(extra)
    return PairsOptions(**values)


@pytest.fixture(scope="module")
def sd15_pairs(tiny_sd15_dir, scorer_dir, tmp_path_factory):
    """One uninterrupted `sipo pairs` (through the CLI, in process): 3 prompts x 3 samples, pairing all."""
    from sipo.cli import main

    root = tmp_path_factory.mktemp("sd15_pairs")
    (root / "prompts.txt").write_text(PROMPTS)
    config = root / "tiny.yaml"
    config.write_text(f"model: {{family: sd15, pretrained_path: {tiny_sd15_dir}, resolution: 32}}\n")
    assert main(["pairs", "--config", str(config), "--prompts", str(root / "prompts.txt"), "--samples-per-prompt", "3",
                 "--scorers", "pickscore,clipscore", "--scorer-weights", "1,0.5", "--scorer-path", f"pickscore={scorer_dir}",
                 "--scorer-path", f"clipscore={scorer_dir}", "--pairing", "all", "--num-inference-steps", "2",
                 "--batch-size", "2", "--out", str(root / "out"), "--no-progress"]) == 0
    return root


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_pairs_rows_carry_scores_seeds_settings_and_the_weights_digest(sd15_pairs):
    out = sd15_pairs / "out"
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    scores = read_scores(out / "scores.jsonl")
    assert len(scores) == 2 * 9  # two scorers x 3 prompts x 3 samples, each once
    # the combined score recomputed from scores.jsonl: 1 * z(pickscore) + 0.5 * z(clipscore), population std
    keys = sorted({(i, s) for _, i, s in scores})
    z = {}
    for name, weight in (("pickscore", 1.0), ("clipscore", 0.5)):
        values = np.array([scores[(name, i, s)] for i, s in keys])
        for key, value in zip(keys, (values - values.mean()) / values.std()):
            z[key] = z.get(key, 0.0) + weight * value
    assert rows and all(row["score_margin"] > 0 for row in rows)
    for row in rows:
        chosen, rejected = (row["prompt_index"], row["chosen_seed"]), (row["prompt_index"], row["rejected_seed"])
        assert row["score_chosen"] == pytest.approx(z[chosen]) and row["score_rejected"] == pytest.approx(z[rejected])
        assert row["score_margin"] == pytest.approx(z[chosen] - z[rejected])
        assert row["scores_chosen"]["pickscore"] == scores[("pickscore", *chosen)]
        assert row["chosen"] == f"images/samples/p{row['prompt_index']:05d}_s{row['chosen_seed']}.png"
        # seed of picture k of prompt i: i * K + k
        assert row["chosen_seed"] // 3 == row["rejected_seed"] // 3 == row["prompt_index"]
        assert row["sampler"]["num_inference_steps"] == 2 and row["noise_dtype"] == "float32"
        assert len(row["weights_sha256"]) == 64
    # pairing all with K = 3: at most 3 pairs per prompt
    assert len(rows) <= 9
    report = json.loads((out / "report.json").read_text())
    assert report["pairs"] == len(rows) and set(report["scorer_agreement"]) == {"pickscore~clipscore"}
    assert (out / "scores.png").stat().st_size > 0


@pytest.mark.slow
def test_a_killed_pairs_run_continues_to_the_same_bytes(sd15_pairs, tiny_sd15_dir, scorer_dir, tmp_path, monkeypatch):
    """Killed once while sampling and once while scoring, rerun: every picture sampled once, every
    score computed once, and the folder byte for byte the uninterrupted run's."""
    import importlib

    evaluate_module, pairs_module = importlib.import_module("sipo.evaluate"), importlib.import_module("sipo.pairs")
    config = _sd15_config(tiny_sd15_dir, tmp_path)
    options = _options(sd15_pairs / "prompts.txt", tmp_path / "out", scorer_dir)
    sampled: list[tuple[int, int]] = []
    real_generate, real_append = evaluate_module.generate, pairs_module.append_scores

    def generate(sample_fn, samples, *args, **kwargs):
        if len(sampled) >= 4:
            raise KeyboardInterrupt  # the kill, after two chunks of two
        sampled.extend((s.prompt_index, s.seed) for s in samples)
        return real_generate(sample_fn, samples, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "generate", generate)
    with pytest.raises(KeyboardInterrupt):
        make_pairs(config, options)
    assert len(sampled) == 4 and not (tmp_path / "out" / "pairs.jsonl").exists()

    appended = []

    def append_scores(path, scorer, samples, scores):
        if len(appended) == 3:
            raise KeyboardInterrupt
        appended.append(scorer)
        real_append(path, scorer, samples, scores)

    def generate_and_count(sample_fn, samples, *args, **kwargs):
        sampled.extend((s.prompt_index, s.seed) for s in samples)
        return real_generate(sample_fn, samples, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "generate", generate_and_count)
    monkeypatch.setattr(pairs_module, "append_scores", append_scores)
    with pytest.raises(KeyboardInterrupt):
        make_pairs(config, options)
    monkeypatch.setattr(pairs_module, "append_scores", real_append)
    result = make_pairs(config, options)
    assert sorted(sampled) == sorted((i, i * 3 + k) for i in range(3) for k in range(3))  # each picture once
    assert result.sampled == 0 and result.scored == 2 * 9 - 3 * 2  # the three chunks scored before the kill stay
    assert _snapshot(tmp_path / "out") == _snapshot(sd15_pairs / "out")


def test_a_folder_of_other_settings_stops_in_one_sentence(sd15_pairs, tiny_sd15_dir, scorer_dir, tmp_path):
    import shutil

    shutil.copytree(sd15_pairs / "out", tmp_path / "out")
    config = _sd15_config(tiny_sd15_dir, tmp_path)
    with pytest.raises(SipoError, match=r"holds samples made with other settings \(sampler\); pass another --out"):
        make_pairs(config, _options(sd15_pairs / "prompts.txt", tmp_path / "out", scorer_dir, num_inference_steps=3))
    with pytest.raises(SipoError, match=r"\(samples_per_prompt\)"):
        make_pairs(config, _options(sd15_pairs / "prompts.txt", tmp_path / "out", scorer_dir, samples_per_prompt=4))
    for bad, message in (({"samples_per_prompt": 1}, "makes no pair"), ({"scorer_weights": [1.0]}, "one weight per scorer"),
                         ({"pairing": "best"}, "not a pairing rule")):
        with pytest.raises(SipoError, match=message):
            make_pairs(config, _options(sd15_pairs / "prompts.txt", tmp_path / "other", scorer_dir, **bad))


# ----------------------------------------------------------------------------- stored noise
def _capture_x_t(adapter, monkeypatch) -> list[torch.Tensor]:
    seen = []
    real = adapter.predict

    def predict(x_t, timesteps, conditioning, denoiser=None):
        seen.append(x_t.detach().clone())
        return real(x_t, timesteps, conditioning, denoiser=denoiser)

    monkeypatch.setattr(adapter, "predict", predict)
    return seen


def _stored_x_t(adapter, manifest: Path, resolution: int, monkeypatch):
    """The x_t `compute_pair_terms` feeds the model for the manifest's first two pairs under
    objective.noise=stored, with the batch, its x0 and the timesteps."""
    from sipo.data import collate_pairs
    from sipo.data.jsonl import JsonlDataset
    from sipo.preference import batch_pair_noise, compute_pair_terms, draw_pair_noise, encoded_batch, reference_predictor

    dataset = JsonlDataset(str(manifest), resolution)
    batch = collate_pairs([dataset[0], dataset[1]])
    encoded = encoded_batch(adapter, batch, torch.device("cpu"))
    noise = draw_pair_noise(encoded.x0_winner.shape, adapter.schedule.num_train_timesteps, torch.Generator().manual_seed(0))
    noise = batch_pair_noise(noise, batch, "stored")
    seen = _capture_x_t(adapter, monkeypatch)
    with torch.no_grad():
        compute_pair_terms(adapter, encoded, noise, beta=5000.0, reference_predict=reference_predictor(adapter, adapter.denoiser))
    return batch, encoded, noise.timesteps, seen[0]


def _pipeline_draw(seed: int, latent_shape, dtype=torch.float32) -> torch.Tensor:
    """As diffusers' prepare_latents with a list of CPU generators (randn_tensor): one
    ``torch.randn((1, *shape), generator=g, device='cpu', dtype=prompt_embeds.dtype)`` per picture,
    times the scheduler's init_noise_sigma (1.0 for SD1.5's DDIM and for FLUX)."""
    return torch.randn((1, *latent_shape), generator=torch.Generator("cpu").manual_seed(seed), dtype=dtype).float()


@pytest.mark.slow
def test_stored_noise_x_t_of_an_eps_family_is_the_seeds_draw(sd15_pairs, tiny_sd15_adapter, monkeypatch):
    """SD1.5: x_t of each side = sqrt(abar_t) x0 + sqrt(1 - abar_t) x_T, x_T drawn from that side's seed
    at the latent shape (4, 32/2, 32/2) of the 32-px pictures (tiny VAE: factor 2)."""
    batch, encoded, timesteps, x_t = _stored_x_t(tiny_sd15_adapter, sd15_pairs / "out" / "pairs.jsonl", 32, monkeypatch)
    abar = tiny_sd15_adapter.scheduler.alphas_cumprod[timesteps].double()
    x0 = torch.cat([encoded.x0_winner, encoded.x0_loser]).double()
    seeds = [*batch["chosen_seed"].tolist(), *batch["rejected_seed"].tolist()]
    assert len(set(seeds)) == 4 or seeds[0] != seeds[2]  # winner and loser noises differ
    x_T = torch.cat([_pipeline_draw(s, (4, 16, 16)) for s in seeds]).double()
    a = abar.repeat(2).sqrt().view(-1, 1, 1, 1)
    b = (1 - abar.repeat(2)).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t.double(), a * x0 + b * x_T, atol=1e-5, rtol=1e-5)


def test_a_pair_without_seeds_under_stored_noise_is_one_sentence(tmp_path):
    from sipo.preference import PairNoise, batch_pair_noise

    noise = PairNoise(torch.tensor([3]), torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2))
    with pytest.raises(SipoError, match=r"carry no chosen_seed/rejected_seed; train on a manifest written by `sipo pairs`"):
        batch_pair_noise(noise, {"prompts": ["x"], "indices": [0]}, "stored")
    assert batch_pair_noise(noise, {}, "shared") is noise
    with pytest.raises(SipoError, match="set data.random_flip=false"):
        load_config(None, ["objective.noise=stored", "data.random_flip=true"])
    # seeds the jsonl rows lack never reach the batch
    manifest = write_jsonl_pairs(tmp_path / "data", num_pairs=2)
    from sipo.data import collate_pairs
    from sipo.data.jsonl import JsonlDataset

    dataset = JsonlDataset(str(manifest), 32)
    assert "chosen_seed" not in collate_pairs([dataset[0], dataset[1]])
    # seeds of pictures sampled at another size than the run trains at: another latent shape, another draw
    rows = [dict(json.loads(line), chosen_seed=1, rejected_seed=2, height=64, width=64)
            for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    batch = collate_pairs([JsonlDataset(str(manifest), 32)[0]])
    with pytest.raises(SipoError, match=r"line 1 of .* was sampled at 64x64 px and trains at 32x32; set model.resolution"):
        batch_pair_noise(noise, batch, "stored")


@pytest.mark.slow
def test_pairs_then_train_with_stored_noise_sd15_and_the_cache_keeps_the_seeds(sd15_pairs, tiny_sd15_dir, tmp_path):
    from sipo.data.cache import build_cache, open_cache
    from sipo.train import train

    manifest = sd15_pairs / "out" / "pairs.jsonl"
    overrides = {"data.path": str(manifest), "objective.noise": "stored", "train.max_steps": 1, "data.use_cache": "always"}
    config = load_config(None, tiny_overrides(tiny_sd15_dir, manifest, tmp_path / "run", **overrides))
    build_cache(config, progress=False)
    cached = open_cache(config)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    batch = cached.collate([cached[0], cached[1]])
    assert batch["chosen_seed"].tolist() == [rows[0]["chosen_seed"], rows[1]["chosen_seed"]]
    assert batch["rejected_seed"].tolist() == [rows[0]["rejected_seed"], rows[1]["rejected_seed"]]
    torch.testing.assert_close(batch["score_margin"], torch.tensor([rows[0]["score_margin"], rows[1]["score_margin"]]))
    result = train(config, progress=False)
    assert result.steps == 1 and math.isfinite(result.history[-1]["loss"])


# ----------------------------------------------------------------------------- a flow family: FLUX
@pytest.fixture(scope="module")
def flux_pairs(scorer_dir, tmp_path_factory):
    from sipo.models.flux import FluxAdapter

    root = tmp_path_factory.mktemp("flux_pairs")
    model_dir = FluxAdapter.build_random_pipeline(root / "flux", scale="tiny", seed=0)
    (root / "prompts.txt").write_text("a cat\na dog\n")
    config = load_config(None, [f"model.pretrained_path={model_dir}", "model.family=flux", "model.resolution=32"])
    make_pairs(config, _options(root / "prompts.txt", root / "out", scorer_dir, samples_per_prompt=2, pairing="best-worst",
                                scorers=["pickscore"], scorer_weights=None, scorer_paths={"pickscore": str(scorer_dir)}))
    return root, model_dir


@pytest.mark.slow
def test_pairs_then_train_with_stored_noise_flux(flux_pairs, monkeypatch, tmp_path):
    """FLUX: x_t = (1 - sigma) x0 + sigma x_T per side, x_T the seed's draw at FluxPipeline's unpacked latent
    shape (16 channels... here the tiny VAE's 4, 2 * (32 // (4 * 2)) = 8 per side) before it packs it; then
    a step of `sipo train` on the pairs."""
    from sipo.models import load_adapter
    from sipo.train import train

    root, model_dir = flux_pairs
    manifest = root / "out" / "pairs.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["sampler"]["family"] == "flux"
    adapter = load_adapter("flux", str(model_dir), resolution=32)
    batch, encoded, timesteps, x_t = _stored_x_t(adapter, manifest, 32, monkeypatch)
    assert tuple(encoded.x0_winner.shape[1:]) == (4, 8, 8)
    a, b = adapter.schedule.coefficients(timesteps)
    torch.testing.assert_close(a.double(), 1 - b.double())  # rectified flow: a = 1 - sigma
    sigma = b.double().repeat(2).view(-1, 1, 1, 1)
    x0 = torch.cat([encoded.x0_winner, encoded.x0_loser]).double()
    seeds = [*batch["chosen_seed"].tolist(), *batch["rejected_seed"].tolist()]
    x_T = torch.cat([_pipeline_draw(s, (4, 8, 8)) for s in seeds]).double()
    torch.testing.assert_close(x_t.double(), (1 - sigma) * x0 + sigma * x_T, atol=1e-5, rtol=1e-5)

    config = load_config(None, tiny_overrides(model_dir, manifest, tmp_path / "run", **{
        "model.family": "flux", "objective.noise": "stored", "train.max_steps": 1}))
    result = train(config, progress=False)
    assert result.steps == 1 and math.isfinite(result.history[-1]["loss"])


# ----------------------------------------------------------------------------- the draw is the pipeline's own
@pytest.mark.slow
def test_the_pipelines_given_the_stored_noise_as_latents_make_the_seeded_pictures(tiny_sd15_dir, flux_pairs):
    """Sampling from ``latents=starting_noise(seed)`` reproduces the picture the seeded generator made:
    the draw is the tensor each pipeline's prepare_latents drew (FLUX: packed afterwards, as it packs)."""
    from diffusers import DDIMScheduler, FluxPipeline, StableDiffusionPipeline

    from sipo.models.flux import pack_latents
    from sipo.preference import starting_noise

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd15_dir), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):  # --dtype: the draw's own dtype, not a rounding
        drawn = pipe.prepare_latents(2, 4, 32, 32, dtype, torch.device("cpu"), [torch.Generator().manual_seed(s) for s in (5, 6)])
        assert torch.equal(drawn.float(), torch.cat([starting_noise(5, (4, 16, 16), dtype), starting_noise(6, (4, 16, 16), dtype)]))
    common = dict(num_inference_steps=2, output_type="pt")
    seeded = pipe(["a cat"], generator=[torch.Generator().manual_seed(7)], **common).images
    stored = pipe(["a cat"], latents=starting_noise(7, (4, 16, 16)), **common).images
    torch.testing.assert_close(seeded, stored, rtol=0, atol=0)

    _, flux_dir = flux_pairs
    flux = FluxPipeline.from_pretrained(str(flux_dir))
    flux.set_progress_bar_config(disable=True)
    common = dict(num_inference_steps=2, height=32, width=32, output_type="pt", max_sequence_length=32)
    seeded = flux(["a cat"], generator=[torch.Generator().manual_seed(7)], **common).images
    stored = flux(["a cat"], latents=pack_latents(starting_noise(7, (4, 8, 8))), **common).images
    torch.testing.assert_close(seeded, stored, rtol=0, atol=0)
    other = flux(["a cat"], latents=pack_latents(starting_noise(8, (4, 8, 8))), **common).images
    assert not torch.equal(seeded, other)  # the comparison can fail


# ----------------------------------------------------------------------------- a video family: Wan
@pytest.mark.slow
def test_pairs_then_train_with_stored_noise_wan_video(scorer_dir, tmp_path, monkeypatch):
    """Wan2.1 (tiny): the rows name GIF clips the JSONL reader loads; each side's x_t is
    (1 - sigma) x0 + sigma x_T with x_T WanPipeline's float32 draw of shape (1, in_channels,
    (F - 1) // scale_factor_temporal + 1, H // scale_factor_spatial, W // scale_factor_spatial)."""
    from video_contract import TINY_FRAMES, TINY_SIZE, video_overrides

    from sipo.models import load_adapter
    from sipo.models.wan import WanAdapter
    from sipo.train import train

    model_dir = WanAdapter.build_random_pipeline(tmp_path / "wan")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    manifest = tmp_path / "pairs" / "pairs.jsonl"
    config = load_config(None, video_overrides("wan", model_dir, manifest, tmp_path / "run", **{
        "objective.noise": "stored", "train.max_steps": 1, "train.batch_size": 1}))
    make_pairs(config, _options(tmp_path / "prompts.txt", tmp_path / "pairs", scorer_dir, samples_per_prompt=2,
                                pairing="best-worst", scorers=["pickscore"], scorer_weights=None,
                                scorer_paths={"pickscore": str(scorer_dir)}))
    row = json.loads(manifest.read_text())
    assert row["chosen"].startswith("clips/") and row["chosen"].endswith(".gif") and row["noise_dtype"] == "float32"

    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    channels = json.loads((model_dir / "transformer" / "config.json").read_text())["in_channels"]
    shape = (channels, (TINY_FRAMES - 1) // vae["scale_factor_temporal"] + 1,
             TINY_SIZE // vae["scale_factor_spatial"], TINY_SIZE // vae["scale_factor_spatial"])
    adapter = load_adapter("wan", str(model_dir))
    from sipo.data import collate_pairs
    from sipo.data.jsonl import JsonlDataset
    from sipo.preference import batch_pair_noise, compute_pair_terms, draw_pair_noise, encoded_batch, reference_predictor

    batch = collate_pairs([JsonlDataset(str(manifest), TINY_SIZE)[0]])
    encoded = encoded_batch(adapter, batch, torch.device("cpu"))
    assert tuple(encoded.x0_winner.shape[1:]) == shape
    noise = batch_pair_noise(draw_pair_noise(encoded.x0_winner.shape, 1000, torch.Generator().manual_seed(0)), batch, "stored")
    seen = _capture_x_t(adapter, monkeypatch)
    with torch.no_grad():
        compute_pair_terms(adapter, encoded, noise, beta=5000.0, reference_predict=reference_predictor(adapter, adapter.denoiser))
    sigma = adapter.schedule.coefficients(noise.timesteps)[1].double().repeat(2).view(-1, 1, 1, 1, 1)
    x0 = torch.cat([encoded.x0_winner, encoded.x0_loser]).double()
    x_T = torch.cat([_pipeline_draw(s, shape) for s in (row["chosen_seed"], row["rejected_seed"])]).double()
    torch.testing.assert_close(seen[0].double(), (1 - sigma) * x0 + sigma * x_T, atol=1e-5, rtol=1e-5)
    monkeypatch.undo()
    result = train(config, progress=False)
    assert result.steps == 1 and math.isfinite(result.history[-1]["loss"])


def test_cli_mistakes_are_one_sentence(tmp_path, capsys):
    """Each stops before any model loads, exit status 2, one `sipo: error:` line (CLI in process)."""
    from sipo.cli import main

    (tmp_path / "prompts.txt").write_text("a cat\n")
    common = ["--config", "demo", "--prompts", str(tmp_path / "prompts.txt"), "--scorers", "pickscore",
              "--out", str(tmp_path / "out")]
    for extra, message in ((["--scorer-weights", "one"], "--scorer-weights 'one' is not a list of numbers"),
                           (["--samples-per-prompt", "1"], "--samples-per-prompt 1 makes no pair"),
                           (["--min-margin", "-1"], "--min-margin -1.0 must be a finite number >= 0")):
        assert main(["pairs", *common, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("sipo: error: ") and message in err and len(err.splitlines()) == 1
    assert main(["iterate", *common, "--rounds", "0", "--steps-per-round", "1"]) == 2
    assert "--rounds and --steps-per-round must be at least 1" in capsys.readouterr().err
    # the Python API forwards the same options to the same checks
    import sipo

    with pytest.raises(SipoError, match="makes no pair"):
        sipo.pairs(load_config("demo"), tmp_path / "prompts.txt", tmp_path / "out", samples_per_prompt=1)
    with pytest.raises(SipoError, match="at least 1"):
        sipo.iterate(load_config("demo"), tmp_path / "prompts.txt", tmp_path / "out", rounds=1, steps_per_round=0)


# ----------------------------------------------------------------------------- PNAPO's per-pair beta
@pytest.mark.slow
def test_reward_beta_scales_each_pairs_z_by_its_reward_gap(sd15_pairs, tiny_sd15_adapter):
    """objective.reward_beta: z_i = (2 sigmoid(score_margin_i) - 1) * z_i of plain DPO, in both placements."""
    import torch.nn.functional as F

    from sipo.data import collate_pairs
    from sipo.data.jsonl import JsonlDataset
    from sipo.preference import batch_pair_noise, compute_pair_terms, draw_pair_noise, encoded_batch, objective_loss, reference_predictor

    adapter = tiny_sd15_adapter
    manifest = sd15_pairs / "out" / "pairs.jsonl"
    margins = [json.loads(line)["score_margin"] for line in manifest.read_text().splitlines()[:2]]
    factors = torch.tensor([2.0 / (1.0 + math.exp(-m)) - 1.0 for m in margins])  # 2 sigmoid(m) - 1, by hand
    dataset = JsonlDataset(str(manifest), 32)
    batch = collate_pairs([dataset[0], dataset[1]])
    encoded = encoded_batch(adapter, batch, torch.device("cpu"))
    drawn = draw_pair_noise(encoded.x0_winner.shape, 1000, torch.Generator().manual_seed(0))
    # a reference that differs from the policy, so z is not 0
    reference = lambda x_t, t, c: adapter.predict(x_t, t, c) * 1.01  # noqa: E731
    with torch.no_grad():
        plain = compute_pair_terms(adapter, encoded, drawn, beta=5000.0, reference_predict=reference)
        scaled = compute_pair_terms(adapter, encoded, batch_pair_noise(drawn, batch, "shared", reward_beta=True),
                                    beta=5000.0, reference_predict=reference)
    assert plain.z.abs().min() > 0
    torch.testing.assert_close(scaled.z, factors * plain.z)
    settings = dict(beta=5000.0, mask=False, clip=False, reweight=False, tau=0.0, t_min=None, t_max=None, clip_eps=1.0,
                    normalize="self")
    expected = -F.logsigmoid(factors * plain.z).mean()
    for placement in ("inside", "outside"):
        loss, _, _ = objective_loss(scaled, torch.ones(2), placement=placement, **settings)
        torch.testing.assert_close(loss, expected)
    with pytest.raises(SipoError, match="carry no score_margin; train on pairs from `sipo pairs` or `sipo relabel`"):
        batch_pair_noise(drawn, {k: v for k, v in batch.items() if k != "score_margin"}, "shared", reward_beta=True)
    with pytest.raises(SipoError, match="objective.reward_beta scales beta inside z"):
        load_config(None, ["objective.name=mapo", "objective.reward_beta=true"])
