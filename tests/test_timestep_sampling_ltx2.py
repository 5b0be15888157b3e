"""objective.timestep_sampling=ltx2: the LTX-2 trainer's density (ltx-trainer timestep_samplers.py,
ShiftedLogitNormalTimestepSampler) against an independent closed-form CDF written here with math.erf."""

from __future__ import annotations

import math

import pytest
import torch

from sipo.config import load_config
from sipo.errors import SipoError
from sipo.preference import draw_pair_noise, ltx2_shift, ltx2_sigmas

EPS, UNIFORM_PROB = 1e-3, 0.1


def normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def mixture_cdf(x: float, tokens: int) -> float:
    """P(sigma <= x), eps <= x < 1, by hand: the shift is the line through (1024, 0.95) and (4096, 2.05); the
    logit-normal l = sigmoid(mu + n) is stretched to z = (l - lo) / (hi - lo) between its 0.5% and 99.9%
    quantiles, z < eps reflected to 2 eps - z, so P(stretched <= x) = P(2 eps - x <= z <= x); 10% uniform on [eps, 1)."""
    mu = 0.95 + (tokens - 1024) * 1.1 / 3072
    lo, hi = 1 / (1 + math.exp(-(mu - 2.5758))), 1 / (1 + math.exp(-(mu + 3.0902)))
    upper = lo + x * (hi - lo)  # z <= x  <=>  l <= upper
    lower = lo + (2 * EPS - x) * (hi - lo)  # z >= 2 eps - x  <=>  l >= lower
    p_upper = normal_cdf(logit(upper) - mu) if upper < 1 else 1.0
    p_lower = normal_cdf(logit(lower) - mu) if lower > 0 else 0.0
    return UNIFORM_PROB * (x - EPS) / (1 - EPS) + (1 - UNIFORM_PROB) * (p_upper - p_lower)


@pytest.mark.parametrize(("tokens", "shift"), [(1024, 0.95), (2560, 1.5), (4096, 2.05), (6144, 0.95 + 5120 * 1.1 / 3072)])
def test_the_shift_is_linear_in_the_token_count(tokens, shift):
    assert ltx2_shift(tokens) == pytest.approx(shift, abs=1e-12)


@pytest.mark.parametrize("tokens", [1024, 2560, 6144])
def test_the_density_matches_the_closed_form_cdf(tokens):
    """Stratified inputs (normal and uniform at their (i + 1/2)/N quantiles, the coin at its own grid, all
    crossed) make the empirical CDF of ltx2_sigmas the exact mixture up to 1/N; no random draw."""
    count = 4000
    q = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    normal = torch.distributions.Normal(0.0, 1.0).icdf(q)
    coins = (torch.arange(20, dtype=torch.float64) + 0.5) / 20  # 2 of 20 below 0.1: the uniform branch
    sigmas = torch.cat([ltx2_sigmas(normal, q, torch.full_like(q, c), tokens) for c in coins])
    assert sigmas.min() >= 0 and sigmas.max() <= 1
    for x in (0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
        empirical = float((sigmas <= x).double().mean())
        assert empirical == pytest.approx(mixture_cdf(x, tokens), abs=2e-3), x


def test_more_tokens_means_more_noise():
    q = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    normal = torch.distributions.Normal(0.0, 1.0).icdf(q)
    ones = torch.ones_like(q)
    assert ltx2_sigmas(normal, q, ones, 1024).median() < ltx2_sigmas(normal, q, ones, 4096).median()


def test_draws_are_training_indices_of_the_unshifted_grid_and_follow_the_density():
    """A seeded draw for latents [B, C, 16, 16, 24] (6144 tokens; one channel keeps the test's noise small):
    t = round(sigma T) - 1, so P(t <= k) = P(sigma <= (k + 1.5) / T) up to the draw's sampling error
    (3000 draws: standard error <= 0.009)."""
    shape = torch.Size((3000, 1, 16, 16, 24))
    noise = draw_pair_noise(shape, 1000, torch.Generator().manual_seed(0), timestep_sampling="ltx2")
    t = noise.timesteps
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    for k in (199, 499, 799):
        assert float((t <= k).double().mean()) == pytest.approx(mixture_cdf((k + 1.5) / 1000, 6144), abs=0.03)
    again = draw_pair_noise(shape, 1000, torch.Generator().manual_seed(0), timestep_sampling="ltx2")
    assert torch.equal(t, again.timesteps)


def test_image_latents_are_refused():
    with pytest.raises(ValueError, match="LTX-2 video latents"):
        draw_pair_noise(torch.Size((2, 4, 8, 8)), 1000, torch.Generator().manual_seed(0), timestep_sampling="ltx2")


def test_another_family_stops_in_one_sentence(tmp_path):
    with pytest.raises(SipoError, match="model.family=ltx2"):
        load_config(None, [f"train.output_dir={tmp_path}", "objective.timestep_sampling=ltx2", "model.family=wan"])
