"""The demo's reward, in plain words: *how sure a digit reader trained on real handwriting is that
the picture shows the digit the prompt asked for.*

The reader is a multinomial logistic regression (scikit-learn) on the 64 pixels of 8x8 digits,
fitted on a seeded half of ``load_digits`` (899 real digits); the other half is held out to check
it (about 97-98% accuracy there). ``reward(image, N)`` is the probability it gives to class ``N``:
near 1 for a clear, well-formed N; near 0 for a blob, a smear or another digit. Images at another
resolution are area-averaged down to 8x8 first.

:class:`DigitScorer` puts the same reader behind the :class:`sipo.rewards.Scorer` interface (registered
as ``digits-classifier``): images in ``[0, 1]``, prompts that name the digit (``"digit 3"``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sipo.demo.pretrain import load_digit_images
from sipo.errors import SipoError
from sipo.rewards.base import Scorer


class DigitReward:
    """``reward(images, labels) -> [B]``: the classifier's probability of the prompted digit."""

    def __init__(self, seed: int = 0, inverse_regularization: float = 1.0):
        from sklearn.linear_model import LogisticRegression

        images, labels = load_digit_images(8)
        order = np.random.default_rng(seed).permutation(images.shape[0])
        half = images.shape[0] // 2
        self.train_index, self.held_out_index = order[:half], order[half:]
        self._features = self.features(images)
        self._labels = labels.numpy()
        self.classifier = LogisticRegression(C=inverse_regularization, max_iter=5000)
        self.classifier.fit(self._features[self.train_index], self._labels[self.train_index])
        self.held_out_images = images[self.held_out_index]
        self.held_out_labels = labels[self.held_out_index]

    @staticmethod
    def features(images: Tensor) -> np.ndarray:
        """``[B, 1 or 3, H, W]`` in ``[-1, 1]`` -> ``[B, 64]`` in ``[0, 1]`` (8x8 grey, area-averaged)."""
        grey = images.detach().float().cpu()
        if grey.shape[1] != 1:
            grey = grey.mean(dim=1, keepdim=True)
        if grey.shape[-1] != 8 or grey.shape[-2] != 8:
            grey = F.adaptive_avg_pool2d(grey, 8)
        return ((grey.clamp(-1, 1) + 1.0) / 2.0).reshape(grey.shape[0], 64).numpy().astype(np.float64)

    def probabilities(self, images: Tensor) -> np.ndarray:
        """``[B, 10]`` class probabilities."""
        return self.classifier.predict_proba(self.features(images))

    def __call__(self, images: Tensor, labels: Tensor | list[int]) -> Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long).numpy()
        probabilities = self.probabilities(images)
        return torch.from_numpy(probabilities[np.arange(len(labels)), labels]).float()

    def held_out_accuracy(self) -> float:
        predicted = self.probabilities(self.held_out_images).argmax(axis=1)
        return float((predicted == self.held_out_labels.numpy()).mean())


class DigitScorer(Scorer):
    """The demo's reward as a :class:`~sipo.rewards.Scorer`: the probability of the digit the prompt names."""

    name = "digits-classifier"

    def __init__(self, reward: DigitReward, device="cpu"):
        self.reward, self.device = reward, torch.device(device)

    @classmethod
    def load(cls, source=None, device="cpu") -> "DigitScorer":
        """``source``: the classifier's seed as text (None: seed 0); it is refitted, there are no files."""
        try:
            seed = 0 if source is None else int(str(source))
        except ValueError:
            raise SipoError(f"the digits-classifier takes a seed, not {source!r}; pass --scorer-path digits-classifier=0") from None
        return cls(DigitReward(seed), device)

    @staticmethod
    def digit_of(prompt: str) -> int:
        digits = [c for c in prompt if c.isdigit()]
        if not digits:
            raise SipoError(f"prompt {prompt!r} names no digit; the digits-classifier scores prompts like 'digit 3'")
        return int(digits[0])

    def _score_images(self, images: Tensor, prompts: list[str]) -> Tensor:
        labels = [self.digit_of(p) for p in prompts]
        return self.reward(images * 2 - 1, labels)
