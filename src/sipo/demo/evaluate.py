"""Evaluation on fixed prompts and fixed initial noise: mean reward, and win rate against the base.

An :class:`EvalSet` is ``n_per_class`` prompts of each digit with one initial noise ``x_T`` each,
drawn once from a seed. Every model (base and fine-tunes) is sampled by deterministic DDIM from
that same noise, so a fine-tune's image ``i`` and the base's image ``i`` differ only by the
weights. A sample *wins* when its reward is higher than the base's on the same prompt and noise;
rewards within ``TIE_TOLERANCE`` of each other are a tie and count half.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sipo.demo.reward import DigitReward
from sipo.models.digits import DigitsAdapter

#: rewards (probabilities) closer than this are a tie: half a win
TIE_TOLERANCE = 0.01


@dataclass
class EvalSet:
    labels: Tensor  # [N] long
    noise: Tensor  # [N, 1, r, r]

    @classmethod
    def make(cls, n_per_class: int, resolution: int, seed: int) -> "EvalSet":
        generator = torch.Generator().manual_seed(seed)
        labels = torch.arange(10).repeat(n_per_class)
        noise = torch.randn((labels.shape[0], 1, resolution, resolution), generator=generator)
        return cls(labels, noise)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def sample_and_score(
    adapter: DigitsAdapter, reward: DigitReward, eval_set: EvalSet, num_inference_steps: int
) -> tuple[Tensor, Tensor]:
    """``(images [N, 1, r, r], rewards [N])`` of the adapter's current denoiser on the eval set."""
    images = adapter.sample_labels(eval_set.labels, noise=eval_set.noise, num_inference_steps=num_inference_steps)
    return images, reward(images, eval_set.labels)


def win_rate(rewards: Tensor, base_rewards: Tensor, tolerance: float = TIE_TOLERANCE) -> float:
    """Fraction of samples whose reward beats the base's on the same prompt and noise; ties count half.

    The same function as ``sipo eval`` (:func:`sipo.evaluate.win_rate`), with the demo's tie tolerance.
    """
    from sipo.evaluate import win_rate as shared_win_rate

    return shared_win_rate(rewards, base_rewards, tolerance)
