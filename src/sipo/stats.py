"""Pure statistics of comparing several models on the same samples: paired win rates with a paired
bootstrap, a Bradley-Terry ranking with its bootstrap, and the t-interval over training seeds.

Everything here is a function of arrays (no I/O, no models); ``sipo compare`` and ``sipo sweep``
(:mod:`sipo.compare`, :mod:`sipo.sweep`) and the demo's claims read them.

Notation: ``scores`` is ``[M, N]``, model ``a``'s score on sample ``n`` (one ``(prompt, seed)``; every
model drew sample ``n`` from the same prompt and initial noise). The outcome of ``a`` against ``b`` on
``n`` is 1 if ``a`` scores higher, 0 if lower, 1/2 on a tie (:func:`sipo.evaluate.win_outcomes`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the t-interval of the mean, ``mean +- t_{(1+c)/2, n-1} * sd / sqrt(n)`` (sd with
    ``n - 1``); ``lo = hi = nan`` with one value, all nan with none. For a few training seeds, where a
    bootstrap over 2 or 3 values would be degenerate."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(np.mean(values))
    if n < 2:
        return mean, float("nan"), float("nan")
    from scipy.stats import t as student_t

    half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * float(np.std(values, ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_differences(values: dict[int, float], others: dict[int, float],
                       confidence: float = 0.95) -> dict[str, object]:
    """``values[s] - others[s]`` on the training seeds ``s`` both hold (the same seed: the same LoRA
    initialisation, data order, timesteps and noise), with the :func:`t_interval` of their mean:
    ``{"mean", "low", "high", "seeds", "per_seed"}``."""
    seeds = sorted(set(values) & set(others))
    differences = [float(values[s]) - float(others[s]) for s in seeds]
    mean, low, high = t_interval(differences, confidence)
    return {"mean": mean, "low": low, "high": high, "seeds": seeds, "per_seed": differences}


def pairwise_outcomes(scores: np.ndarray, tolerance: float = 0.0) -> np.ndarray:
    """``[M, M, N]``: ``outcomes[a, b, n]`` = 1 if model ``a`` beats ``b`` on sample ``n`` by more than
    ``tolerance``, 0 if it loses by more, 1/2 otherwise; ``outcomes[a, b] + outcomes[b, a] = 1``."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [models, samples], got shape {scores.shape}")
    difference = scores[:, None, :] - scores[None, :, :]
    return (difference > tolerance) + 0.5 * (np.abs(difference) <= tolerance)


def win_matrix(scores: np.ndarray, tolerance: float = 0.0) -> np.ndarray:
    """``[M, M]``: ``rates[a, b]``, the fraction of samples on which ``a`` beats ``b`` (ties half); the
    diagonal is 1/2."""
    return pairwise_outcomes(scores, tolerance).mean(axis=2)


def bootstrap_counts(num_samples: int, num_resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """``[R, N]``: how often each sample is drawn in each of ``R`` resamples of ``N`` with replacement
    (numpy ``default_rng(seed)``). Every model is resampled with the same counts: the bootstrap is
    paired, a resample keeps each ``(prompt, seed)`` with all models' pictures of it."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num_samples, size=(num_resamples, num_samples))
    counts = np.zeros((num_resamples, num_samples))
    np.add.at(counts, (np.arange(num_resamples)[:, None], draws), 1.0)
    return counts


def percentile_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The ``(1 -+ confidence) / 2`` quantiles over the first axis (the resamples), numpy's linear interpolation."""
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha], axis=0)
    return low, high


def bootstrap_win_matrix(scores: np.ndarray, confidence: float = 0.95, num_resamples: int = 2000, seed: int = 0,
                         counts: np.ndarray | None = None, tolerance: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rates, low, high)``, each ``[M, M]``: the win rates of :func:`win_matrix` (scores within
    ``tolerance`` tie) and their paired percentile-bootstrap intervals (resampling samples,
    :func:`bootstrap_counts`)."""
    outcomes = pairwise_outcomes(scores, tolerance)
    counts = bootstrap_counts(outcomes.shape[2], num_resamples, seed) if counts is None else counts
    resampled = np.einsum("abn,rn->rab", outcomes, counts) / outcomes.shape[2]
    low, high = percentile_interval(resampled, confidence)
    return outcomes.mean(axis=2), low, high


def bradley_terry(wins: np.ndarray, prior: float = 0.0, tolerance: float = 1e-10, max_iterations: int = 100000) -> np.ndarray:
    """Bradley-Terry log-strengths ``theta`` (mean 0) from ``wins[a, b]``, how often ``a`` beat ``b`` (ties
    count half to each), so that ``P(a beats b) = 1 / (1 + exp(theta_b - theta_a))``.

    The maximum-likelihood fit by Hunter's (2004) MM iteration ``p_a <- W_a / sum_b n_ab / (p_a + p_b)``
    (``W_a`` = a's wins, ``n_ab = wins[a, b] + wins[b, a]``). ``prior`` adds that many virtual wins to
    every ordered pair (``prior = 0.5``: one virtual tie per pair), which keeps the fit finite when a
    model wins or loses every comparison. ``wins`` may be ``[..., M, M]``: a batch of fits.
    """
    wins = np.asarray(wins, dtype=np.float64)
    size = wins.shape[-1]
    wins = wins + prior * (1.0 - np.eye(size))
    games = wins + np.swapaxes(wins, -1, -2)
    won = wins.sum(axis=-1)
    if np.any(won <= 0):
        raise ValueError("a model that never wins has log-strength -inf; pass prior > 0")
    strength = np.ones(wins.shape[:-1])
    for _ in range(max_iterations):
        denominator = (games / (strength[..., :, None] + strength[..., None, :])).sum(axis=-1)
        updated = won / denominator
        updated = updated / np.exp(np.log(updated).mean(axis=-1, keepdims=True))  # geometric mean 1
        change = np.max(np.abs(np.log(updated) - np.log(strength)))
        strength = updated
        if change < tolerance:
            break
    return np.log(strength)


def bootstrap_bradley_terry(scores: np.ndarray, confidence: float = 0.95, num_resamples: int = 2000, seed: int = 0,
                            prior: float = 0.5, counts: np.ndarray | None = None,
                            tolerance: float = 0.0) -> dict[str, np.ndarray]:
    """The Bradley-Terry ranking of ``scores`` ``[M, N]`` with paired-bootstrap intervals.

    Each sample gives every pair of models one outcome (:func:`pairwise_outcomes` with ``tolerance``); the fit is
    :func:`bradley_terry` with ``prior``. Returns ``strength`` (``[M]``, log-strength, mean 0), its
    percentile interval ``low``/``high``, ``rank`` (1 = strongest) and ``rank_low``/``rank_high``:
    the ``(1 -+ confidence) / 2`` quantiles of each model's rank over the resamples.
    """
    outcomes = pairwise_outcomes(scores, tolerance)
    counts = bootstrap_counts(outcomes.shape[2], num_resamples, seed) if counts is None else counts
    strength = bradley_terry(outcomes.sum(axis=2), prior)
    resampled = bradley_terry(np.einsum("abn,rn->rab", outcomes, counts), prior)
    low, high = percentile_interval(resampled, confidence)
    ranks = ranks_of(resampled)
    alpha = (1.0 - confidence) / 2.0
    return {"strength": strength, "low": low, "high": high, "rank": ranks_of(strength),
            "rank_low": np.quantile(ranks, alpha, axis=0, method="lower"),
            "rank_high": np.quantile(ranks, 1.0 - alpha, axis=0, method="higher")}


def ranks_of(strength: np.ndarray) -> np.ndarray:
    """1 for the largest value along the last axis, 2 for the next, ...; ties share the better rank."""
    strength = np.asarray(strength, dtype=np.float64)
    return (strength[..., None, :] > strength[..., :, None]).sum(axis=-1) + 1
