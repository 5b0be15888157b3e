"""The demo's claim statistics (sipo.demo.claims) against hand-computed values."""

import math

import pytest
import torch

from sipo.demo import claims as C


def test_t_interval_hand_value():
    # mean 0.3, sample sd sqrt(0.025) = 0.158114, n = 5, t_{0.975, 4} = 2.776445 (tables)
    mean, lo, hi = C.t_interval([0.1, 0.2, 0.3, 0.4, 0.5])
    half = 2.776445 * math.sqrt(0.025) / math.sqrt(5)
    assert mean == pytest.approx(0.3) and lo == pytest.approx(0.3 - half, rel=1e-5) and hi == pytest.approx(0.3 + half, rel=1e-5)
    assert all(math.isnan(v) for v in C.t_interval([0.4])[1:])


def test_verdict_rules():
    assert C._verdict(0.01, 0.2, claimed_positive=True) == "supported"
    assert C._verdict(-0.2, -0.01, claimed_positive=True) == "contradicted"
    assert C._verdict(-0.2, -0.01, claimed_positive=False) == "supported"
    assert C._verdict(-0.1, 0.1, claimed_positive=True).startswith("not resolved")


def _run(source, method, beta, seed, rewards_by_step, steps):
    curve = [{"step": s, "mean_reward": float(torch.tensor(r).mean()), "rewards": r} for s, r in rewards_by_step.items()]
    return {"source": source, "method": method, "beta": beta, "seed": seed, "name": f"{method}-{seed}",
            "curve": curve, "steps": steps}


def test_claims_from_synthetic_runs_paired_per_seed():
    base = torch.tensor([0.5, 0.5, 0.5, 0.5])
    # win rate = fraction of the 4 samples above 0.5 (no ties)
    results = []
    for seed, (dpo_wins, sipo_wins) in enumerate([(1, 2), (2, 3), (3, 4)]):
        for method, wins in (("dpo", dpo_wins), ("sipo", sipo_wins)):
            rewards = [0.9] * wins + [0.1] * (4 - wins)
            late = [0.9] * max(0, wins - 1) + [0.1] * (4 - max(0, wins - 1))  # one fewer win at step 30
            results.append(_run("mixed", method, 1000.0, seed, {0: [0.5] * 4, 10: rewards, 20: rewards, 30: late}, 30))
            results.append(_run("mixed", method, 3000.0, seed, {0: [0.5] * 4, 10: rewards}, 10))
    win = C.claim_win_rate(results, base, ["mixed"], ["dpo", "sipo"], 1000.0, 10)
    assert win["mixed"]["sipo"]["minus_dpo_per_seed"] == pytest.approx([0.25, 0.25, 0.25])
    assert win["mixed"]["sipo"]["minus_dpo"][0] == pytest.approx(0.25)
    # zero spread of the differences: a zero-width interval that excludes 0
    assert win["mixed"]["sipo"]["verdict"] == "supported"
    sens = C.claim_beta_sensitivity(results, base, ["mixed"], ["dpo", "sipo"], [1000.0, 3000.0], 10)
    assert sens["mixed"]["dpo"]["spread"][0] == pytest.approx(0.0)
    stab = C.claim_stability(results, ["mixed"], ["dpo", "sipo"], 1000.0, 30)
    # dpo seed 0: rewards mean 0.1+0.8*1/4 = 0.3 at 10 and 20, 0.1 at 30 -> drop 0.2
    assert stab["mixed"]["dpo"]["per_seed"] == pytest.approx([0.2, 0.2, 0.2])
    assert "minus_dpo" in stab["mixed"]["sipo"]
    line = C.penultimate_line({"win_rate": win})
    assert line.startswith("sipo - dpo: +0.250 [95% CI +0.250, +0.250]")


# ----------------------------------------------------------------------------- claim 3 on held-out pairs
def test_held_out_pairs_show_no_digit_the_training_pairs_show(tmp_path):
    """The held-out set (another seed, the real digits no training pair uses) shares no picture
    with the training pairs: no real digit index, and no image equal pixel for pixel."""
    from sipo.demo.pairs import PairSettings, make_pairs
    from sipo.demo.pretrain import load_digit_images
    from sipo.demo.reward import DigitReward
    from sipo.models.digits import DigitsAdapter, build_digits_scheduler, build_digits_unet

    torch.manual_seed(0)
    early = DigitsAdapter(build_digits_unet(8, (8, 16)), build_digits_scheduler())
    images, labels = load_digit_images(8)
    reward = DigitReward(seed=0)
    # 160 pairs, half their sides real: the exclusion has ~160 of the 1797 digits to keep out
    train_settings = PairSettings(num_pairs=160, real_fraction=0.5, min_gap=0.1, sampling_steps=2, seed=0)
    train_pairs = make_pairs(early, reward, images, labels, tmp_path / "train", train_settings, progress=False)
    held = make_pairs(early, reward, images, labels, tmp_path / "held", PairSettings(**{**train_settings.__dict__, "seed": 1}),
                      progress=False, exclude_real=train_pairs.real_indices())
    assert len(train_pairs.real_indices()) > 100 and len(held.real_indices()) > 50
    assert train_pairs.real_indices().isdisjoint(held.real_indices())
    seen = {bytes(x.numpy().tobytes()) for x in torch.cat([train_pairs.chosen, train_pairs.rejected])}
    assert not any(bytes(x.numpy().tobytes()) in seen for x in torch.cat([held.chosen, held.rejected]))
    # each recorded index is the real digit the side shows (the PNG's 8-bit levels of load_digits)
    from sipo.demo.pairs import quantize

    i = next(k for k, index in enumerate(held.chosen_real_index) if index >= 0)
    torch.testing.assert_close(held.chosen[i], quantize(images[held.chosen_real_index[i]]), rtol=0, atol=0)


def test_claim3_held_out_accuracy_is_read_back_from_each_runs_validation_log(monkeypatch, tmp_path):
    """Tiny long runs (dpo, sipo; 2 seeds; 4 steps, validated every 2): claim 3's held-out columns
    equal the numbers in the runs' validation.jsonl, and drop / paired difference their hand values."""
    import json

    from sipo.demo.pairs import PairSettings, make_pairs
    from sipo.demo.pretrain import PretrainSettings, load_digit_images, pretrain
    from sipo.demo.reward import DigitReward
    from sipo.demo.run import RunJob, run_one
    from sipo.demo.settings import demo_config_path
    from sipo.models.digits import DigitsAdapter

    monkeypatch.setenv("SIPO_CACHE_DIR", str(tmp_path / "cache"))
    pretrained = pretrain(PretrainSettings(block_out_channels=(8, 16), steps=3, batch_size=8, early_step=1,
                                           warmup_steps=1), progress=False)
    early = DigitsAdapter.from_pretrained(pretrained.early_dir)
    images, labels = load_digit_images(8)
    reward = DigitReward(seed=0)
    settings = PairSettings(num_pairs=16, sampling_steps=2)
    train_pairs = make_pairs(early, reward, images, labels, tmp_path / "pairs", settings, progress=False)
    held = make_pairs(early, reward, images, labels, tmp_path / "held", PairSettings(num_pairs=12, sampling_steps=2, seed=1),
                      progress=False, exclude_real=train_pairs.real_indices())
    results = []
    for method in ("dpo", "sipo"):
        for seed in (0, 1):
            run_dir = tmp_path / "runs" / f"{method}-{seed}"
            results.append(run_one(RunJob(
                method=method, beta=3000.0, seed=seed, config_path=str(demo_config_path()),
                overrides=[f"model.pretrained_path={pretrained.base_dir}", f"data.path={train_pairs.manifest}",
                           f"objective.name={method}", f"train.seed={seed}", "train.max_steps=4", "train.batch_size=4",
                           "train.log_every=1", f"train.output_dir={run_dir}",
                           f"data.validation_path={held.manifest}", "train.validate_every=2"],
                base_dir=str(pretrained.base_dir), run_dir=str(run_dir), eval_every=2, eval_per_class=1, eval_seed=0,
                sampling_steps=2, reward_seed=0)))
    stability = C.claim_stability(results, ["mixed"], ["dpo", "sipo"], 3000.0, long_steps=4, short_steps=2)["mixed"]
    # validating takes nothing from training: the same run without held-out pairs samples the same rewards
    # (claim 1 reads the long runs at the short length, so its numbers must not move)
    plain_dir = tmp_path / "runs" / "dpo-0-plain"
    plain = run_one(RunJob(
        method="dpo", beta=3000.0, seed=0, config_path=str(demo_config_path()),
        overrides=[f"model.pretrained_path={pretrained.base_dir}", f"data.path={train_pairs.manifest}",
                   "objective.name=dpo", "train.seed=0", "train.max_steps=4", "train.batch_size=4",
                   "train.log_every=1", f"train.output_dir={plain_dir}"],
        base_dir=str(pretrained.base_dir), run_dir=str(plain_dir), eval_every=2, eval_per_class=1, eval_seed=0,
        sampling_steps=2, reward_seed=0))
    assert plain["validation"] == [] and [p["rewards"] for p in plain["curve"]] == [p["rewards"] for p in results[0]["curve"]]

    def log(method, seed):  # the file itself, read independently of the run's record
        lines = (tmp_path / "runs" / f"{method}-{seed}" / "validation.jsonl").read_text().splitlines()
        return {json.loads(x)["step"]: json.loads(x) for x in lines}

    logs = {(m, s): log(m, s) for m in ("dpo", "sipo") for s in (0, 1)}
    assert all(sorted(v) == [0, 2, 4] for v in logs.values())
    assert all(v[2]["held_out/pairs"] == 12 for v in logs.values())
    for method in ("dpo", "sipo"):
        row = stability[method]["held_out"]
        assert row["steps"] == [0, 2, 4]
        for k, step in enumerate((0, 2, 4)):
            assert row["accuracy"][k] == pytest.approx(
                (logs[method, 0][step]["held_out/accuracy"] + logs[method, 1][step]["held_out/accuracy"]) / 2)
            assert row["margin"][k] == pytest.approx(
                (logs[method, 0][step]["held_out/reward_margin"] + logs[method, 1][step]["held_out/reward_margin"]) / 2)
        finals = [logs[method, s][4]["held_out/accuracy"] for s in (0, 1)]
        assert row["final_accuracy"][0] == pytest.approx(sum(finals) / 2)
        assert row["accuracy_at_short"][0] == pytest.approx((logs[method, 0][2]["held_out/accuracy"]
                                                             + logs[method, 1][2]["held_out/accuracy"]) / 2)
        # drop = max over steps 2 and 4 - step 4 (step 0 left out, as for the reward)
        drops = [max(logs[method, s][2]["held_out/accuracy"], logs[method, s][4]["held_out/accuracy"])
                 - logs[method, s][4]["held_out/accuracy"] for s in (0, 1)]
        assert row["drop_per_seed"] == pytest.approx(drops)
    # step 0: the LoRA is zero, every z is 0, so no held-out pair counts as won
    assert logs["dpo", 0][0]["held_out/accuracy"] == 0.0
    paired = [logs["sipo", s][4]["held_out/accuracy"] - logs["dpo", s][4]["held_out/accuracy"] for s in (0, 1)]
    assert stability["sipo"]["held_out"]["final_minus_dpo"][0] == pytest.approx(sum(paired) / 2)
    text = C.claims_markdown({"win_rate": {}, "beta_sensitivity": {}, "stability": {"mixed": stability}},
                             {"default_beta": 3000.0, "max_steps": 2, "long_steps": 4, "betas": [3000.0]})
    assert "Claim 3 on held-out pairs" in text
    assert f"{stability['sipo']['held_out']['final_accuracy'][0]:.3f}" in text


def test_the_default_demo_draws_no_held_out_pairs(tmp_path):
    """`make demo` runs no claim 3, so it draws no held-out pairs and validates nothing (its time and
    its last two lines stay as they were); quick and --full do, for every source of their long runs."""
    from sipo.demo.run import DEFAULT, FULL, QUICK, held_out_pairs

    assert held_out_pairs(DEFAULT, None, None, None, None, {"mixed": None}, tmp_path) == {}
    assert list(tmp_path.iterdir()) == []
    assert DEFAULT.stability_methods == () and QUICK.stability_methods and FULL.stability_methods
    for settings in (QUICK, FULL):
        assert settings.held_out_seed not in (settings.pairs.seed, settings.offpolicy_pairs.seed)
