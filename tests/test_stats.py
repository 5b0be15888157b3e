"""sipo.stats against hand-computed values: paired win rates and their bootstrap, the Bradley-Terry fit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sipo.stats import (
    bootstrap_bradley_terry,
    bootstrap_counts,
    bootstrap_win_matrix,
    bradley_terry,
    paired_differences,
    pairwise_outcomes,
    ranks_of,
    t_interval,
    win_matrix,
)


def test_win_matrix_is_a_hand_count():
    # sample:        0    1    2    3
    scores = np.array([[3.0, 1.0, 2.0, 2.0],   # A
                       [1.0, 2.0, 2.0, 5.0],   # B
                       [0.0, 0.0, 0.0, 9.0]])  # C
    rates = win_matrix(scores)
    # A vs B: win, loss, tie, loss -> 1.5 / 4; A vs C: win win win loss -> 3 / 4; B vs C: win win win loss
    assert rates[0, 1] == pytest.approx(1.5 / 4) and rates[1, 0] == pytest.approx(2.5 / 4)
    assert rates[0, 2] == pytest.approx(3 / 4) and rates[1, 2] == pytest.approx(3 / 4)
    assert np.allclose(np.diag(rates), 0.5)
    assert np.allclose(rates + rates.T, 1.0)
    assert pairwise_outcomes(scores)[0, 1].tolist() == [1.0, 0.0, 0.5, 0.0]


def test_paired_bootstrap_resamples_samples_with_all_models():
    """Resampling (prompt, seed) with every model's score of it: A beats B on all 5 samples, so every
    resample says 1 (an unpaired bootstrap, drawing A's and B's samples apart, would not)."""
    scores = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [0.5, 1.5, 2.5, 3.5, 4.5]])
    rates, low, high = bootstrap_win_matrix(scores)
    assert rates[0, 1] == 1.0 and low[0, 1] == 1.0 and high[0, 1] == 1.0
    assert low[1, 0] == 0.0 and high[1, 0] == 0.0


def test_bootstrap_win_interval_hand_computed():
    """Outcomes [1, 0, 0] of A over B: a resample's rate is k/3, k ~ Binomial(3, 1/3); P(k=0) = 8/27 > 2.5%
    so the low end is 0, P(k<=2) = 26/27 < 97.5% so the high end is 1 (as sipo eval's bootstrap_ci)."""
    scores = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    rates, low, high = bootstrap_win_matrix(scores, num_resamples=20000)
    assert rates[0, 1] == pytest.approx(1 / 3) and (low[0, 1], high[0, 1]) == (0.0, 1.0)
    counts = bootstrap_counts(3, num_resamples=4, seed=0)
    assert counts.shape == (4, 3) and np.all(counts.sum(axis=1) == 3)


def test_bradley_terry_two_models_is_the_log_odds():
    """Two models: the MLE solves p_a / (p_a + p_b) = w_ab / n, so theta_a - theta_b = log(w_ab / w_ba)."""
    theta = bradley_terry(np.array([[0.0, 3.0], [1.0, 0.0]]))
    assert theta[0] - theta[1] == pytest.approx(math.log(3.0), abs=1e-8)
    assert theta.sum() == pytest.approx(0.0, abs=1e-12)
    # a prior of 0.5 virtual wins each way: log(3.5 / 1.5); a clean sweep stays finite
    assert np.diff(bradley_terry(np.array([[0.0, 3.0], [1.0, 0.0]]), prior=0.5))[0] == pytest.approx(-math.log(3.5 / 1.5))
    assert np.diff(bradley_terry(np.array([[0.0, 4.0], [0.0, 0.0]]), prior=0.5))[0] == pytest.approx(-math.log(4.5 / 0.5))


def test_bradley_terry_three_models_recovers_consistent_strengths():
    """Strengths 1, 2, 4 and 15 games per pair with the expected outcomes: P(2>1) = 2/3 -> 10 of 15,
    P(4>1) = 4/5 -> 12, P(4>2) = 2/3 -> 10. Those counts satisfy the likelihood equations exactly, so the
    fit is log(1, 2, 4) shifted to mean 0."""
    wins = np.array([[0.0, 5.0, 3.0],
                     [10.0, 0.0, 5.0],
                     [12.0, 10.0, 0.0]])
    theta = bradley_terry(wins)
    expected = np.log([1.0, 2.0, 4.0]) - np.log([1.0, 2.0, 4.0]).mean()
    assert np.allclose(theta, expected, atol=1e-8)
    # a batch of fits gives each its own answer
    batch = bradley_terry(np.stack([wins, wins.T]))
    assert np.allclose(batch[0], expected, atol=1e-8) and np.allclose(batch[1], -expected, atol=1e-8)


def test_bootstrap_ranking_orders_a_dominating_model_first():
    scores = np.array([[5.0, 6.0, 7.0, 8.0, 9.0, 10.0],   # always best
                       [1.0, 3.0, 2.0, 4.0, 3.0, 1.0],
                       [2.0, 2.0, 3.0, 3.0, 2.0, 2.0]])
    ranking = bootstrap_bradley_terry(scores, num_resamples=500)
    assert ranking["rank"].tolist()[0] == 1 and ranking["rank_low"][0] == 1 and ranking["rank_high"][0] == 1
    # point estimate: the prior-0.5 fit of the hand-counted wins (A 6-0 over both; B beats C on samples 1, 3, 4)
    wins = np.array([[0.0, 6.0, 6.0], [0.0, 0.0, 3.0], [0.0, 3.0, 0.0]])
    assert np.allclose(ranking["strength"], bradley_terry(wins, prior=0.5))
    assert ranking["strength"][1] == pytest.approx(ranking["strength"][2])  # B and C split their games
    assert np.all(ranking["low"] <= ranking["high"]) and np.all(ranking["rank_low"] <= ranking["rank_high"])


def test_ranks_of_and_t_interval():
    assert ranks_of(np.array([0.1, 0.5, -2.0])).tolist() == [2, 1, 3]
    # mean 0.3, sd = sqrt(0.025), t_{0.975, 4} = 2.7764451: half-width 0.19632
    mean, low, high = t_interval([0.1, 0.2, 0.3, 0.4, 0.5])
    assert mean == pytest.approx(0.3) and high - mean == pytest.approx(2.7764451 * math.sqrt(0.025 / 5), abs=1e-6)
    assert all(math.isnan(v) for v in t_interval([0.4])[1:])


def test_a_tie_tolerance_makes_close_scores_half_wins_everywhere():
    """Scores 0.50 vs 0.505, 0.52 and 0.49: with tolerance 0.01 the first is a tie (1/2), the others a
    loss and a win, so A's rate over B is (0.5 + 0 + 1) / 3 = 0.5; without it A loses the first: 1/3."""
    scores = np.array([[0.50, 0.50, 0.50], [0.505, 0.52, 0.49]])
    assert win_matrix(scores)[0, 1] == pytest.approx(1 / 3)
    assert win_matrix(scores, tolerance=0.01)[0, 1] == pytest.approx(0.5)
    rates, low, high = bootstrap_win_matrix(scores, tolerance=0.01, num_resamples=200)
    assert rates[0, 1] == pytest.approx(0.5) and low[0, 1] <= 0.5 <= high[0, 1]
    # the same outcomes drive the ranking: with the tie, two equally strong models
    ranking = bootstrap_bradley_terry(scores, tolerance=0.01, num_resamples=50)
    assert ranking["strength"] == pytest.approx([0.0, 0.0], abs=1e-8)


def test_paired_differences_use_only_shared_seeds():
    """Seeds 0, 1, 2 against 1, 2, 3: differences on 1 and 2 only, 0.2 and 0.4; mean 0.3, sd 0.1414,
    t_{0.975, 1} = 12.7062: half-width 12.7062 * 0.1414 / sqrt(2) = 1.2706."""
    result = paired_differences({0: 0.9, 1: 0.7, 2: 0.8}, {1: 0.5, 2: 0.4, 3: 0.0})
    assert result["seeds"] == [1, 2] and result["per_seed"] == pytest.approx([0.2, 0.4])
    assert result["mean"] == pytest.approx(0.3)
    assert (result["low"], result["high"]) == pytest.approx((0.3 - 1.27062, 0.3 + 1.27062), abs=1e-4)
