"""The w(t) profile of the demo (SPEC 3 and 6 in miniature): the step-wise importance weight of the
base model along the noising trajectories of a set of pairs, per timestep bucket.

For every pair and every one of ``num_buckets`` equal timestep buckets, one ``t`` is drawn inside
the bucket with its own ``eps`` and posterior noise, and :func:`sipo.preference.compute_pair_terms`
(the trainer's own per-pair step) gives ``log w`` of winner, loser and pair. Run once on the demo's
off-policy pairs and once on *on-policy* pairs (two samples of the base model itself), it shows
how much lower the weights of off-policy data are, and where in t.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sipo.analysis import bucket_bounds, draw_bucket_noise
from sipo.models.base import EncodedPairs
from sipo.models.digits import DigitsAdapter
from sipo.preference import compute_pair_terms


@dataclass
class WeightProfile:
    t_mid: np.ndarray  # [K] bucket centres
    log_w_pair: np.ndarray  # [K, N]
    log_w_winner: np.ndarray
    log_w_loser: np.ndarray

    def quantiles(self, q: float) -> np.ndarray:
        return np.nanquantile(self.log_w_pair, q, axis=1)

    def mean(self) -> np.ndarray:
        return np.nanmean(self.log_w_pair, axis=1)

    def masked_fraction(self, tau: float) -> np.ndarray:
        """Per bucket, the fraction of pairs a mask ``w >= tau`` drops (undefined weights count as masked)."""
        w = np.exp(self.log_w_pair)
        return 1.0 - np.nan_to_num(w >= tau, nan=0.0).mean(axis=1)


@torch.no_grad()
def weight_profile(
    adapter: DigitsAdapter,
    labels: torch.Tensor,
    winners: torch.Tensor,
    losers: torch.Tensor,
    num_buckets: int = 20,
    seed: int = 0,
    weight_norm: str = "mean",
    pair_weight: str = "product",
) -> WeightProfile:
    """``log w`` per bucket for pairs ``(winners, losers)`` ``[N, 1, r, r]`` in ``[-1, 1]`` of class ``labels``."""
    schedule = adapter.schedule
    T = schedule.num_train_timesteps
    generator = torch.Generator().manual_seed(seed)
    encoded = EncodedPairs(winners.float(), losers.float(), {"class_labels": labels.long()})
    rows = {"pair": [], "winner": [], "loser": []}
    t_mid = []
    for bucket in range(num_buckets):
        low, high = bucket_bounds(bucket, num_buckets, T)
        t_mid.append((low + high - 1) / 2)
        noise = draw_bucket_noise(winners.shape, T, bucket, num_buckets, generator)
        terms = compute_pair_terms(
            adapter, encoded, noise, beta=1.0,
            reference_predict=lambda x, t, c: adapter.predict(x, t, c),
            weight_norm=weight_norm, pair_weight=pair_weight,
        )
        rows["pair"].append(terms.log_w_pair.numpy())
        rows["winner"].append(terms.log_w_winner.numpy())
        rows["loser"].append(terms.log_w_loser.numpy())
    return WeightProfile(
        t_mid=np.array(t_mid),
        log_w_pair=np.stack(rows["pair"]),
        log_w_winner=np.stack(rows["winner"]),
        log_w_loser=np.stack(rows["loser"]),
    )
