"""The demo's on-policy question (issue 27): pairs sampled from the base itself, each side's seed
reproducing its picture, and the question's table read back from the runs' files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from sipo.models.digits import DigitsAdapter, build_digits_scheduler, build_digits_unet, parse_digit_prompt


def brightness(images, labels):
    """A stand-in reward (any function of the picture will do for the pairing rule): mean pixel value."""
    return images.float().mean(dim=(1, 2, 3))


def png_levels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_onpolicy_pairs_are_the_best_and_worst_of_k_base_samples_regenerated_from_their_seeds(tmp_path):
    """Each row's two pictures are the base's own DDIM samples from x_T = randn(1, 1, 8, 8) of a
    fresh CPU generator seeded with the row's seed; of the prompt's K samples they score highest and lowest."""
    from sipo.config import DataConfig
    from sipo.data import open_preference_dataset
    from sipo.demo.onpolicy import OnPolicySettings, make_onpolicy_pairs

    torch.manual_seed(0)
    base = DigitsAdapter(build_digits_unet(8, (8, 16)), build_digits_scheduler())
    k, steps = 3, 2
    settings = OnPolicySettings(num_pairs=12, samples_per_prompt=k, min_gap=0.0, sampling_steps=steps, seed=2)
    pairs = make_onpolicy_pairs(base, brightness, tmp_path / "pairs", settings, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "pairs" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and pairs.summary()["pairs"] == 12
    for i, row in enumerate(rows):
        # seeds are integers, two different samples of this prompt instance (min_gap 0 keeps every prompt)
        first = 2 * 10**9 + i * k
        assert isinstance(row["chosen_seed"], int) and isinstance(row["rejected_seed"], int)
        assert row["chosen_seed"] != row["rejected_seed"]
        assert first <= min(row["chosen_seed"], row["rejected_seed"]) <= max(row["chosen_seed"], row["rejected_seed"]) < first + k
        assert parse_digit_prompt(row["prompt"]) == i % 10
        assert row["score_chosen"] >= row["score_rejected"]
    for i in (0, 7):  # regenerate every sample of two prompts, one picture at a time, from its seed alone
        row = rows[i]
        samples = {}
        for seed in range(2 * 10**9 + i * k, 2 * 10**9 + i * k + k):
            x_t = torch.randn((1, 1, 8, 8), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
            picture = base.sample_labels([i % 10], noise=x_t, num_inference_steps=steps)
            samples[seed] = np.round((picture[0, 0].clamp(-1, 1).numpy() + 1) / 2 * 255).astype(np.int16)
        by_score = sorted(samples, key=lambda s: float(samples[s].mean()))
        assert row["chosen_seed"] == by_score[-1] and row["rejected_seed"] == by_score[0]
        # batched sampling vs one at a time may round a level differently, nothing more
        assert np.abs(png_levels(tmp_path / "pairs" / row["chosen"]) - samples[row["chosen_seed"]]).max() <= 1
        assert np.abs(png_levels(tmp_path / "pairs" / row["rejected"]) - samples[row["rejected_seed"]]).max() <= 1
    # sipo train reads the manifest as it is (the seed and score columns ride along)
    dataset = open_preference_dataset(DataConfig(format="jsonl", path=str(pairs.manifest)), 8)
    assert len(dataset) == 12
    summary = json.loads((tmp_path / "pairs" / "pairs.json").read_text())
    assert "manual_seed(seed)" in summary["noise"] and summary["settings"]["samples_per_prompt"] == k


def _write_run(root, source, method, seed, wins_out_of_10, step=4):
    """A run's result.json whose 10 eval rewards win ``wins_out_of_10`` times against any base
    (2.0 beats every probability, -1.0 loses to every one)."""
    rewards = [2.0] * wins_out_of_10 + [-1.0] * (10 - wins_out_of_10)
    run_dir = root / "runs" / source / f"{method}-beta3000-seed{seed}"
    run_dir.mkdir(parents=True)
    record = {"method": method, "beta": 3000.0, "seed": seed, "name": run_dir.name, "variant": source, "source": source,
              "curve": [{"step": step, "mean_reward": float(np.mean(rewards)), "rewards": rewards}], "rewards": rewards,
              "history": [], "steps": step, "wall_seconds": 1.0, "validation": []}
    (run_dir / "result.json").write_text(json.dumps(record))


def test_the_onpolicy_table_reads_back_from_the_run_files(tmp_path):
    """claims_from_runs on run folders alone: arms and paired answers equal hand-computed t-intervals;
    the stored-noise rows name what is missing."""
    from scipy.stats import t as student_t

    from sipo.demo import claims as C

    torch.manual_seed(0)
    DigitsAdapter(build_digits_unet(8, (8, 16)), build_digits_scheduler()).save_pretrained(tmp_path / "base")
    wins = {("onpolicy", "dpo"): [5, 6, 5], ("onpolicy", "sipo"): [7, 9, 8], ("offpolicy", "sipo"): [6, 6, 7],
            ("offpolicy", "dpo"): [4, 5, 4], ("iterative", "dpo"): [6, 7, 5]}
    for (source, method), values in wins.items():
        for seed, value in enumerate(values):
            _write_run(tmp_path, source, method, seed, value)
    found, context = C.claims_from_runs(tmp_path, eval_per_class=1, sampling_steps=2, max_steps=4)
    claim = found["onpolicy"]
    dpo = claim["arms"]["onpolicy"]["dpo"]
    assert dpo["win_rate_per_seed"] == pytest.approx([0.5, 0.6, 0.5])
    assert dpo["mean_reward_per_seed"] == pytest.approx([(2 * w - (10 - w)) / 10 for w in (5, 6, 5)])
    question = next(q for q in claim["questions"] if q["question"] == "SIPO beats DPO on on-policy pairs")
    differences = np.array([0.2, 0.3, 0.3])  # (7 - 5, 9 - 6, 8 - 5) / 10
    half = student_t.ppf(0.975, 2) * differences.std(ddof=1) / math.sqrt(3)
    assert question["win_rate_diff"] == pytest.approx((differences.mean(), differences.mean() - half, differences.mean() + half))
    assert question["answer_win_rate"] == "yes: A beat B"
    # reward differences are 3x the win-rate ones (each win moves a sample from -1 to 2: +0.3 per 0.1)
    assert question["mean_reward_diff"][0] == pytest.approx(3 * differences.mean())
    onpolicy_vs_off = next(q for q in claim["questions"] if q["question"].startswith("DPO on on-policy pairs beats SIPO on off"))
    assert onpolicy_vs_off["win_rate_diff_per_seed"] == pytest.approx([-0.1, 0.0, -0.2])
    assert onpolicy_vs_off["answer_win_rate"] == "not resolved (CI contains 0)"
    text = C.claims_markdown(found, context)
    assert "Does SIPO beat on-policy pairs?" in text
    assert f"{differences.mean():+.3f} [95% CI {differences.mean() - half:+.3f}, {differences.mean() + half:+.3f}]" in text
    stored_rows = [line for line in text.splitlines() if line.startswith("| stored noise helps")]
    assert len(stored_rows) == 2
    from sipo.demo.settings import stored_noise_available

    if not stored_noise_available():
        assert all("stored noise: needs objective.noise" in line for line in stored_rows)


def test_onpolicy_arms_stay_out_of_the_default_demo_and_skip_stored_noise_without_the_key(tmp_path):
    """`make demo` runs none of the arms (no on-policy pairs, no extra runs); --full and --onpolicy run
    all three; the stored-noise runs exist exactly when this sipo has objective.noise."""
    from types import SimpleNamespace

    from sipo.demo.run import DEFAULT, FULL, ONPOLICY, onpolicy_jobs
    from sipo.demo.settings import STORED_NOISE_SKIP, stored_noise_available

    assert not (DEFAULT.onpolicy_methods or DEFAULT.stored_noise_methods or DEFAULT.iterative_methods)
    for settings in (FULL, ONPOLICY):
        assert settings.onpolicy_methods == ("dpo", "dpo-cm", "sipo") and settings.iterative_methods == ("dpo",)
        assert settings.stored_noise_methods == ("dpo", "sipo") and settings.iterative_rounds == 2
    pair_sets = {"onpolicy": SimpleNamespace(manifest=tmp_path / "manifest.jsonl")}
    jobs, notes = onpolicy_jobs(ONPOLICY, "demo.yaml", [], tmp_path / "base", pair_sets, tmp_path, 100, 3000.0)
    sources = [job.source for job in jobs]
    stored = 10 if stored_noise_available() else 0
    assert sources.count("onpolicy") == 15 and sources.count("iterative") == 5 and sources.count("onpolicy-stored") == stored
    assert all(job.rounds == 2 and job.onpolicy["samples_per_prompt"] == 4 for job in jobs if job.source == "iterative")
    assert all("objective.noise=stored" in job.overrides for job in jobs if job.source == "onpolicy-stored")
    assert (notes == []) == stored_noise_available() and all(n.startswith(STORED_NOISE_SKIP) for n in notes)
    assert onpolicy_jobs(DEFAULT, "demo.yaml", [], tmp_path / "base", {}, tmp_path, 100, 3000.0) == ([], [])


def test_iterative_round_two_samples_its_pairs_from_round_one_policy_and_resumes_the_run(monkeypatch, tmp_path):
    """Two rounds of 2 steps: one run of 4 steps (resumed, not restarted); round 2's pictures are
    round 1's policy's samples from their seeds (checkpoint step 2 loaded independently), not the base's."""
    from dataclasses import asdict

    from sipo.checkpoints import load_run_weights
    from sipo.demo.iterative import round_pair_seed
    from sipo.demo.onpolicy import SEED_STRIDE, OnPolicySettings, make_onpolicy_pairs
    from sipo.demo.pretrain import PretrainSettings, pretrain
    from sipo.demo.reward import DigitReward
    from sipo.demo.run import RunJob, run_one
    from sipo.demo.settings import demo_config_path

    monkeypatch.setenv("SIPO_CACHE_DIR", str(tmp_path / "cache"))
    pretrained = pretrain(PretrainSettings(block_out_channels=(8, 16), steps=3, batch_size=8, early_step=1,
                                           warmup_steps=1), progress=False)
    base = DigitsAdapter.from_pretrained(pretrained.base_dir)
    settings = OnPolicySettings(num_pairs=8, samples_per_prompt=2, min_gap=0.0, sampling_steps=2)
    round1 = make_onpolicy_pairs(base, DigitReward(seed=0), tmp_path / "pairs", settings, progress=False)
    run_dir = tmp_path / "run"
    result = run_one(RunJob(
        method="dpo", beta=3000.0, seed=1, config_path=str(demo_config_path()),
        overrides=[f"model.pretrained_path={pretrained.base_dir}", f"data.path={round1.manifest}", "objective.name=dpo",
                   "train.seed=1", "train.max_steps=4", "train.batch_size=4", "train.log_every=1",
                   "train.learning_rate=0.05", "train.checkpoint_every=2", "train.keep_last=2", f"train.output_dir={run_dir}"],
        base_dir=str(pretrained.base_dir), run_dir=str(run_dir), eval_every=4, eval_per_class=1, eval_seed=0,
        sampling_steps=2, reward_seed=0, source="iterative", rounds=2, onpolicy=asdict(settings)))
    assert result["steps"] == 4 and result["round_ends"] == [2, 4]
    assert [p["step"] for p in result["curve"]] == [2, 4]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # one run, resumed at step 2
    rows = [json.loads(line) for line in (run_dir / "round2_pairs" / "manifest.jsonl").read_text().splitlines()]
    first_seed = round_pair_seed(1, 1) * SEED_STRIDE
    assert len(rows) == 2 * 4 and all(first_seed <= row["chosen_seed"] < first_seed + 2 * 8 * 10 for row in rows)
    policy = DigitsAdapter.from_pretrained(pretrained.base_dir)
    load_run_weights(policy, run_dir, run_dir / "checkpoints" / "step-00000002")
    differs_from_base = False
    for row in rows[:4]:
        x_t = torch.randn((1, 1, 8, 8), generator=torch.Generator("cpu").manual_seed(row["chosen_seed"]))
        label = [parse_digit_prompt(row["prompt"])]
        levels = png_levels(run_dir / "round2_pairs" / row["chosen"])
        as_policy, as_base = (np.round((m.sample_labels(label, noise=x_t, num_inference_steps=2)[0, 0].numpy() + 1) / 2 * 255)
                              for m in (policy, base))
        assert np.abs(levels - as_policy).max() <= 1
        differs_from_base |= bool(np.abs(levels - as_base).max() > 1)
    assert differs_from_base
