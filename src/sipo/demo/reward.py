"""The demo's reward, in plain words: *how sure a digit reader trained on real handwriting is that
the picture shows the digit the prompt asked for.*

The reader is a multinomial logistic regression (scikit-learn) on the 64 pixels of 8x8 digits,
fitted on a seeded half of ``load_digits`` (899 real digits); the other half is held out to check
it (about 97-98% accuracy there). ``reward(image, N)`` is the probability it gives to class ``N``:
near 1 for a clear, well-formed N; near 0 for a blob, a smear or another digit. Images at another
resolution are area-averaged down to 8x8 first.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sipo.demo.pretrain import load_digit_images


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
