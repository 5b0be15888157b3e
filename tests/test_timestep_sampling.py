"""``objective.timestep_sampling``: uniform stays today's draw bit for bit; logit_normal and mode follow
the SD3 paper's densities (Esser et al. 2024, section 3.1), checked against their analytic CDFs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from train_fixtures import tiny_overrides, write_jsonl_pairs

from sipo.config import load_config
from sipo.errors import SipoError
from sipo.preference import draw_pair_noise

T = 1000
DRAWS = 20000
#: the Kolmogorov-Smirnov bound at level 0.001 (1.95 / sqrt(n)); the grid is discrete (1000 values), so
#: the statistic is taken at the grid's points, where the analytic CDF is exact
KS_BOUND = 1.95 / math.sqrt(DRAWS)


def _draw(sampling: str, seed: int = 0, **density) -> torch.Tensor:
    noise = draw_pair_noise(torch.Size([DRAWS, 1]), T, torch.Generator().manual_seed(seed), timestep_sampling=sampling, **density)
    return noise.timesteps


def _ks_against(timesteps: torch.Tensor, cdf_of_fraction) -> float:
    """max_k |empirical P(t <= k) - analytic P(t <= k)|, with P(t <= k) = P(u >= (T - 1 - k) / T).

    (``t = T - 1 - floor(u T)``: t <= k  <=>  floor(u T) >= T - 1 - k  <=>  u >= (T - 1 - k) / T.)
    """
    k = np.arange(T)
    empirical = np.searchsorted(np.sort(timesteps.numpy()), k, side="right") / len(timesteps)
    analytic = 1.0 - cdf_of_fraction((T - 1 - k) / T)
    return float(np.abs(empirical - analytic).max())


def test_uniform_is_todays_draw_bit_for_bit():
    """The default must repeat the stream the exact-resume and reference tests were written against:
    randint over [0, T), then eps, then the posterior noise, on the same generator."""
    shape = torch.Size([3, 4, 2, 2])
    generator = torch.Generator().manual_seed(7)
    expected_t = torch.randint(0, T, (3,), generator=generator)
    expected_eps = torch.randn(tuple(shape), generator=generator)
    expected_posterior = torch.randn(tuple(shape), generator=generator)
    for noise in (draw_pair_noise(shape, T, torch.Generator().manual_seed(7)),
                  draw_pair_noise(shape, T, torch.Generator().manual_seed(7), timestep_sampling="uniform", mode_scale=1.29)):
        assert torch.equal(noise.timesteps, expected_t)
        assert torch.equal(noise.eps, expected_eps)
        assert torch.equal(noise.posterior_noise, expected_posterior)


def test_logit_normal_matches_its_cdf():
    """u = sigmoid(n), n ~ N(0, 1): P(u <= x) = Phi(logit(x)) (scipy's normal CDF, not the code's)."""
    timesteps = _draw("logit_normal")
    with np.errstate(divide="ignore"):
        statistic = _ks_against(timesteps, lambda x: stats.norm.cdf(np.log(x) - np.log1p(-x)))
    assert statistic < KS_BOUND
    # and it is not uniform: the middle fifth of the grid holds 0.2 under uniform, ~0.31 here
    # (Phi(logit 0.6) - Phi(logit 0.4) = 2 Phi(0.4055) - 1 = 0.3149)
    middle = ((timesteps >= 400) & (timesteps < 600)).float().mean().item()
    assert middle == pytest.approx(0.3149, abs=0.015)


def test_logit_normal_mean_moves_towards_low_noise_as_in_diffusers():
    """diffusers indexes its descending timesteps with floor(u T): a positive logit_mean is low noise,
    i.e. small t on this project's ascending grid. P(u <= x) = Phi((logit x - 1) / 0.5)."""
    timesteps = _draw("logit_normal", seed=1, logit_mean=1.0, logit_std=0.5)
    with np.errstate(divide="ignore"):
        statistic = _ks_against(timesteps, lambda x: stats.norm.cdf((np.log(x) - np.log1p(-x) - 1.0) / 0.5))
    assert statistic < KS_BOUND
    assert timesteps.float().mean() < 300  # E[u] ~ 0.71 -> t ~ 290


def _mode_inverse(x: np.ndarray, scale: float) -> np.ndarray:
    """f^-1(x) for f(v) = 1 - v - s (cos(pi v / 2)^2 - 1 + v), decreasing on [0, 1]: by bisection."""
    low, high = np.zeros_like(x), np.ones_like(x)
    for _ in range(60):
        mid = (low + high) / 2
        f_mid = 1 - mid - scale * (np.cos(np.pi * mid / 2) ** 2 - 1 + mid)
        go_right = f_mid > x  # f decreasing: f(mid) > x means the root is right of mid
        low, high = np.where(go_right, mid, low), np.where(go_right, high, mid)
    return (low + high) / 2


def test_mode_matches_its_cdf():
    """u = f(v), v ~ U[0, 1), f decreasing with f(0) = 1, f(1) = 0: P(u <= x) = P(v >= f^-1(x)) = 1 - f^-1(x)."""
    timesteps = _draw("mode", seed=2)
    statistic = _ks_against(timesteps, lambda x: 1.0 - _mode_inverse(np.asarray(x, dtype=np.float64), 1.29))
    assert statistic < KS_BOUND
    # mode_scale 1.29 puts more mass mid-grid than uniform: 1 - f^-1(0.4) - (1 - f^-1(0.6))
    expected = float(_mode_inverse(np.array([0.4]), 1.29)[0] - _mode_inverse(np.array([0.6]), 1.29)[0])
    middle = ((timesteps >= 400) & (timesteps < 600)).float().mean().item()
    assert expected > 0.25 and middle == pytest.approx(expected, abs=0.015)


def test_mode_scale_zero_is_uniform_in_distribution():
    """s = 0: f(v) = 1 - v, so t is uniform on the grid (the paper's limit)."""
    statistic = _ks_against(_draw("mode", seed=3, mode_scale=0.0), lambda x: np.asarray(x))
    assert statistic < KS_BOUND


def test_non_uniform_sampling_refuses_a_timestep_band():
    with pytest.raises(ValueError, match="all 1000 timesteps"):
        draw_pair_noise(torch.Size([2, 1]), T, torch.Generator(), t_low=0, t_high=500, timestep_sampling="mode")


def test_config_key_defaults_to_uniform_and_checks_its_values():
    config = load_config(None)
    assert config.objective.timestep_sampling == "uniform"
    assert config.objective.timestep_settings()["timestep_sampling"] == "uniform"
    chosen = load_config(None, ["objective.timestep_sampling=logit_normal", "objective.logit_std=0.5"])
    assert chosen.objective.timestep_settings() == {"timestep_sampling": "logit_normal", "logit_mean": 0.0,
                                                    "logit_std": 0.5, "mode_scale": 1.29}
    with pytest.raises(SipoError, match="choose one of"):
        load_config(None, ["objective.timestep_sampling=cosmap"])
    with pytest.raises(SipoError, match="mode_scale"):
        load_config(None, ["objective.mode_scale=2.0"])  # above 2/(pi-2) ~ 1.75 the density turns negative
    with pytest.raises(SipoError, match="logit_std"):
        load_config(None, ["objective.logit_std=0"])


def test_the_trainer_draws_with_the_configured_density(tiny_sd15_dir, tmp_path, monkeypatch):
    """train() passes objective.timestep_sampling to draw_step_noise (the one call site), which draws with it."""
    import importlib

    from sipo.preference import pair_noise_seed

    trainer = importlib.import_module("sipo.train")  # the module: the package's sipo.train is the function
    seen = []
    original = trainer.draw_step_noise

    def recording(*args, **kwargs):
        noise = original(*args, **kwargs)
        seen.append((kwargs.get("timestep_sampling"), noise.timesteps))
        return noise

    monkeypatch.setattr(trainer, "draw_step_noise", recording)
    manifest = write_jsonl_pairs(tmp_path / "pairs", num_pairs=2)
    config = load_config(None, tiny_overrides(tiny_sd15_dir, manifest, tmp_path / "run", **{
        "objective.name": "dpo", "objective.timestep_sampling": "mode", "train.max_steps": 1,
        "train.checkpoint_every": 0, "train.report_to": "none"}))
    trainer.train(config, progress=False)
    assert seen and all(sampling == "mode" for sampling, _ in seen)
    # each pair's own generator, seeded by (train.seed 0, step 0, its place 0 or 1), gives the same draw
    expected = torch.cat([draw_pair_noise(torch.Size([1, 1]), T, torch.Generator().manual_seed(pair_noise_seed(0, 0, place)),
                                          timestep_sampling="mode").timesteps for place in (0, 1)])
    assert torch.equal(seen[0][1], expected)
