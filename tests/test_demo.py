"""The embedded demo: its reward, pretraining cache, off-policy pairs, evaluation, and `sipo demo
--quick` end to end through the CLI in a subprocess (STYLE 10)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sipo.config import DataConfig, load_config
from sipo.demo.cache import cache_root, settings_key
from sipo.demo.evaluate import TIE_TOLERANCE, EvalSet, win_rate
from sipo.demo.pretrain import PretrainSettings, load_digit_images, pretrain
from sipo.demo.reward import DigitReward
from sipo.demo.run import FULL, QUICK, DemoSettings, demo_config_path
from sipo.models.digits import DigitsAdapter, build_digits_scheduler, build_digits_unet, parse_digit_prompt

REPO = Path(__file__).resolve().parents[1]
FINAL_LINE = re.compile(r"^win rate vs base: dpo=[01]\.\d\d dpo-cm=[01]\.\d\d sipo=[01]\.\d\d$")
PENULTIMATE_LINE = re.compile(r"^sipo - dpo: [+-]\d\.\d{3} \[95% CI (n/a|[+-]\d\.\d{3}, [+-]\d\.\d{3})\]$")
TINY_PRETRAIN = PretrainSettings(block_out_channels=(8, 16), steps=3, batch_size=8, early_step=1, warmup_steps=1)


@pytest.fixture(scope="module")
def reward():
    return DigitReward(seed=0)


# ----------------------------------------------------------------------------- reward
def test_reward_prefers_the_prompted_digit_on_held_out_digits(reward):
    """On real digits the classifier never saw, prompt N scores a real N higher than prompt N+1 does.

    A multinomial logistic regression on the 64 pixels of load_digits is ~96-97% accurate on a
    held-out half (measured here: 0.966 with seed 0), so both checks have a wide margin.
    """
    images, labels = reward.held_out_images, reward.held_out_labels
    right = reward(images, labels)
    wrong = reward(images, (labels + 1) % 10)
    assert (right > wrong).float().mean() > 0.95
    assert right.mean() > 0.8 and wrong.mean() < 0.05
    assert reward.held_out_accuracy() > 0.9
    assert set(reward.train_index).isdisjoint(reward.held_out_index)


def test_reward_accepts_three_channels_and_larger_pictures(reward):
    images, labels = reward.held_out_images[:20], reward.held_out_labels[:20]
    rgb_16 = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest").expand(-1, 3, -1, -1)
    torch.testing.assert_close(reward(rgb_16, labels), reward(images, labels), rtol=0, atol=1e-6)


def test_reward_of_a_blank_image_is_low(reward):
    blank = -torch.ones(10, 1, 8, 8)
    assert reward(blank, torch.arange(10)).mean() < 0.5


# ----------------------------------------------------------------------------- evaluation
def test_win_rate_counts_ties_as_half():
    base = torch.tensor([0.5, 0.5, 0.5, 0.5])
    policy = torch.tensor([0.9, 0.1, 0.5 + TIE_TOLERANCE / 2, 0.6])
    assert win_rate(policy, base) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert win_rate(base, base) == 0.5
    with pytest.raises(ValueError):
        win_rate(policy[:3], base)


def test_eval_set_is_fixed_by_its_seed():
    first, second = EvalSet.make(3, 8, seed=7), EvalSet.make(3, 8, seed=7)
    assert torch.equal(first.noise, second.noise) and torch.equal(first.labels, second.labels)
    assert len(first) == 30 and first.labels.bincount().tolist() == [3] * 10
    assert not torch.equal(EvalSet.make(3, 8, seed=8).noise, first.noise)


# ----------------------------------------------------------------------------- cache and pretraining
def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("SIPO_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "sipo" / "demo"
    monkeypatch.setenv("SIPO_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("SIPO_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "sipo" / "demo"


def test_settings_key_changes_with_any_setting():
    assert settings_key(TINY_PRETRAIN) == settings_key(PretrainSettings(**TINY_PRETRAIN.__dict__))
    assert settings_key(TINY_PRETRAIN) != settings_key(PretrainSettings(**{**TINY_PRETRAIN.__dict__, "seed": 1}))


def test_pretraining_is_reproducible_and_cached(monkeypatch, tmp_path):
    weights = []
    for name in ("a", "b"):
        monkeypatch.setenv("SIPO_CACHE_DIR", str(tmp_path / name))
        result = pretrain(TINY_PRETRAIN, progress=False)
        assert not result.cached
        assert result.base_dir.parent.name == f"pretrain-{settings_key(TINY_PRETRAIN)}"
        weights.append([DigitsAdapter.from_pretrained(d).denoiser.state_dict() for d in (result.base_dir, result.early_dir)])
        again = pretrain(TINY_PRETRAIN, progress=False)
        assert again.cached and again.base_dir == result.base_dir
    for state_a, state_b in zip(*weights):
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), key
    # the early checkpoint is a different policy from the base
    assert any(not torch.equal(weights[0][0][k], weights[0][1][k]) for k in weights[0][0])
    assert not list(tmp_path.glob("*/*.tmp-*"))


def test_digit_images_are_all_of_load_digits_in_unit_range():
    images, labels = load_digit_images(8)
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert images.min() == -1 and images.max() == 1


# ----------------------------------------------------------------------------- off-policy pairs
def test_pairs_are_ranked_by_the_reward_and_load_as_jsonl(reward, tmp_path):
    from sipo.data import open_preference_dataset
    from sipo.demo.pairs import PairSettings, make_pairs, quantize

    torch.manual_seed(0)
    early = DigitsAdapter(build_digits_unet(8, (8, 16)), build_digits_scheduler())
    images, labels = load_digit_images(8)
    settings = PairSettings(num_pairs=24, real_fraction=0.5, min_gap=0.1, sampling_steps=2, seed=3)
    pairs = make_pairs(early, reward, images, labels, tmp_path / "pairs", settings, progress=False)
    assert len(pairs.prompts) == 24
    assert (pairs.chosen_reward - pairs.rejected_reward >= settings.min_gap).all()
    assert set(pairs.chosen_source) | set(pairs.rejected_source) <= {"real", "early"}
    summary = json.loads((tmp_path / "pairs" / "pairs.json").read_text())
    assert summary["pairs"] == 24 and summary["dropped_near_ties"] == summary["candidate_pairs_drawn"] - 24

    dataset = open_preference_dataset(DataConfig(format="jsonl", path=str(pairs.manifest)), 8)
    assert len(dataset) == 24
    for i in (0, 23):
        item = dataset[i]
        label = parse_digit_prompt(item["prompt"])
        assert label == int(pairs.labels[i])
        chosen = item["chosen"].mean(dim=0, keepdim=True)[None]
        torch.testing.assert_close(chosen, quantize(pairs.chosen[i : i + 1]), rtol=0, atol=1e-6)
        # the reward of what training reads is the reward the pair was ranked by
        assert float(reward(chosen, [label])) == pytest.approx(float(pairs.chosen_reward[i]), abs=1e-5)


# ----------------------------------------------------------------------------- w(t) profile
def test_weight_profile_shapes_and_the_undefined_last_step(reward):
    from sipo.demo.profile import weight_profile

    torch.manual_seed(0)
    model = DigitsAdapter(build_digits_unet(8, (8, 16)), build_digits_scheduler())
    images = reward.held_out_images[:6]
    labels = reward.held_out_labels[:6]
    profile = weight_profile(model, labels, images, images.flip(-1), num_buckets=10, seed=0)
    assert profile.log_w_pair.shape == (10, 6) and profile.t_mid.shape == (10,)
    # t < T/50 = 20 (s < 0) has no weight; bucket 0 of 10 is t in [0, 100): some NaN, the rest finite
    assert np.isfinite(profile.log_w_pair[1:]).all()
    assert (profile.masked_fraction(0.0) <= 1).all()
    torch.testing.assert_close(
        torch.from_numpy(profile.log_w_pair[1:]),
        torch.from_numpy(profile.log_w_winner[1:] + profile.log_w_loser[1:]),
    )


# ----------------------------------------------------------------------------- settings and config
def test_demo_config_and_settings_agree():
    config = load_config(demo_config_path())
    assert config.model.family == "digits" and config.data.format == "jsonl"
    for settings in (DemoSettings(), QUICK, FULL):
        assert config.objective.beta in settings.betas
    for settings in (DemoSettings(), FULL):
        assert len(settings.seeds) >= 5 and len(settings.betas) == 3 and settings.stability_factor == 3
        assert max(settings.betas) / min(settings.betas) == pytest.approx(10.0)
        assert set(settings.methods) == {"dpo", "dpo-cm", "sipo", "dpo-cm-outside", "sipo-outside"}
        assert set(settings.sources) == {"mixed", "offpolicy"}
    assert set(FULL.sensitivity_methods) == set(FULL.stability_methods) == set(FULL.methods)


def test_the_demos_comparison_is_the_library_compare_of_its_runs(tmp_path):
    """write_compares on made-up runs (3 methods x 2 seeds, 20 samples): the compare's pooled win rate of
    each method over the base, per seed, is a hand count of wins with the demo's tie tolerance; the
    final line reads it; entries come in the demo's method order; the page and the matrix exist."""
    from sipo.compare import BASE
    from sipo.demo.report import SCORER, final_line, write_compares

    generator = torch.Generator().manual_seed(0)
    eval_set = EvalSet.make(2, 8, seed=3)
    n = len(eval_set)
    base_rewards = torch.rand(n, generator=generator)
    results = []
    for method in ("sipo", "dpo", "dpo-cm"):  # not in the demo's order: the compare orders them
        for seed in (0, 1):
            rewards = (base_rewards + 0.05 * torch.randn(n, generator=generator)).clamp(0, 1)
            rewards[0] = base_rewards[0] + 0.005  # within the tie tolerance: half a win
            results.append({"method": method, "beta": 3000.0, "seed": seed, "name": f"{method}-seed{seed}",
                            "variant": "", "curve": [{"step": 4, "rewards": rewards.tolist()}],
                            "images_at": {4: torch.rand(n, 1, 8, 8) * 2 - 1}})
    base_images = torch.rand(n, 1, 8, 8) * 2 - 1
    compares = write_compares(tmp_path, results, base_images, base_rewards, eval_set, 4, "made up",
                              methods=("dpo", "dpo-cm", "sipo"))
    summary = json.loads((tmp_path / "compare" / "mixed" / "summary.json").read_text())
    assert summary["entries"] == ["dpo", "dpo-cm", "sipo", BASE]
    rates = {}
    for method in ("dpo", "dpo-cm", "sipo"):
        cell = summary["scorers"][SCORER]["win_rate"][method][BASE]
        hand = []
        for seed in (0, 1):
            mine = next(r for r in results if r["method"] == method and r["seed"] == seed)["curve"][0]["rewards"]
            outcomes = [1.0 if a - b > TIE_TOLERANCE else 0.0 if b - a > TIE_TOLERANCE else 0.5
                        for a, b in zip(mine, base_rewards.tolist())]
            hand.append(sum(outcomes) / n)
        assert cell["seeds"] == [0, 1] and cell["per_seed"] == pytest.approx(hand)
        rates[method] = sum(hand) / 2
        assert cell["rate"] == pytest.approx(rates[method])
    line = final_line(compares["mixed"], ("dpo", "dpo-cm", "sipo"), 3000.0)
    assert FINAL_LINE.match(line) and line == "win rate vs base: " + " ".join(f"{m}={r:.2f}" for m, r in rates.items())
    for name in ("report.html", "win_matrix.png", "scores.csv", "summary.md"):
        assert (tmp_path / "compare" / "mixed" / name).is_file()
    assert len(list((tmp_path / "compare" / "mixed" / "images" / "sipo-seed1").glob("*.png"))) == n


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_quick_demo_end_to_end_through_the_cli(tmp_path):
    """`python -m sipo demo --quick` finishes, writes the report and plots, and ends with the line."""
    env = {**os.environ, "SIPO_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "demo"
    completed = subprocess.run(
        [sys.executable, "-m", "sipo", "demo", "--quick", "--output-dir", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    assert FINAL_LINE.match(lines[-1]), lines[-5:]
    assert PENULTIMATE_LINE.match(lines[-2]), lines[-5:]
    for name in ("report.md", "reward_vs_step.png", "w_profile.png", "w_profile.csv", "results.json",
                 "base/model_index.json", "pairs/manifest.jsonl", "pairs_offpolicy/manifest.jsonl", "claims.json",
                 "claim1_win_rate.png", "claim3_stability.png", "compare/mixed/report.html",
                 "compare/mixed/win_matrix.png", "compare/offpolicy/summary.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    compare = json.loads((out / "compare" / "mixed" / "summary.json").read_text())
    assert results["compare"]["mixed"] == compare
    beta = f"{load_config(demo_config_path()).objective.beta:g}"
    rates = {m: compare["scorers"]["digits-classifier"]["win_rate"][m]["base"] for m in ("dpo", "dpo-cm", "sipo")}
    assert lines[-1] == "win rate vs base: " + " ".join(f"{m}={rates[m]['rate']:.2f}" for m in rates)
    claims = json.loads((out / "claims.json").read_text())
    for method, cell in rates.items():  # the claims pair the same per-seed numbers (sipo.evaluate.win_rate)
        assert claims["win_rate"]["mixed"][method]["per_seed"] == pytest.approx(cell["per_seed"])
    assert "Diffusion-DPO" in completed.stdout and "SIPO" in completed.stdout
    report = (out / "report.md").read_text()
    assert "Wall time" in report and "win rate vs base" in report.lower()
    # every run was trained for the quick number of steps (3x for the stability runs) and saved its LoRA
    for method in ("dpo", "dpo-cm", "sipo"):
        for run in (out / "runs" / f"{method}-beta{beta}-seed0", out / "runs" / "offpolicy" / f"{method}-beta{beta}-seed0"):
            assert (run / "pytorch_lora_weights.safetensors").is_file()
            long = method in QUICK.stability_methods and "offpolicy" not in str(run)
            steps = QUICK.max_steps * (QUICK.stability_factor if long else 1)
            assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == steps
    assert set(claims["win_rate"]) == {"mixed", "offpolicy"}
    # claim 3's long runs validated on their own held-out pairs; its columns are their logs' numbers
    assert (out / "pairs_heldout" / "manifest.jsonl").is_file() and "Claim 3 on held-out pairs" in report
    long_steps = QUICK.max_steps * QUICK.stability_factor
    for method in QUICK.stability_methods:
        lines = (out / "runs" / f"{method}-beta{beta}-seed0" / "validation.jsonl").read_text().splitlines()
        records = [json.loads(x) for x in lines]
        assert [r["step"] for r in records] == list(range(0, long_steps + 1, QUICK.eval_every))
        held_out = claims["stability"]["mixed"][method]["held_out"]
        assert held_out["accuracy"] == pytest.approx([r["held_out/accuracy"] for r in records])
        assert held_out["final_accuracy"][0] == pytest.approx(records[-1]["held_out/accuracy"])
        assert records[-1]["held_out/pairs"] == QUICK.held_out_pairs
    assert not (out / "runs" / f"dpo-cm-beta{beta}-seed0" / "validation.jsonl").exists()  # short runs: none
    # the demo's runs are ordinary runs: `sipo compare` samples and scores them as any family's
    from sipo.cli import main

    prompts = tmp_path / "digits.txt"
    prompts.write_text("a handwritten digit 3\na handwritten digit 8\n")
    runs = [str(out / "runs" / f"{m}-beta{beta}-seed0") for m in ("dpo", "sipo")]
    assert main(["compare", *runs, "--base", "--prompts", str(prompts), "--seeds", "0,1", "--scorers",
                 "digits-classifier", "--tie-tolerance", "0.01", "--num-inference-steps", "4",
                 "--output-dir", str(tmp_path / "compare"), "--no-progress"]) == 0
    compared = json.loads((tmp_path / "compare" / "summary.json").read_text())
    assert compared["entries"] == ["base", f"dpo-beta{beta}-seed0", f"sipo-beta{beta}-seed0"]
    assert compared["settings"]["guidance_scale"] == 1.0 and compared["tie_tolerance"] == 0.01
