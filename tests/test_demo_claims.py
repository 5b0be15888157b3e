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
