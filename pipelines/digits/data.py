"""scikit-learn's digits (1,797 8x8 images, shipped inside the package) with a fixed split.

Items are `(image (1, 8, 8) float32 in [0, 1], label int)`. The split is a seeded permutation:
1,438 training and 359 test images, the same on every machine.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import Dataset

TEST_FRACTION = 0.2
SPLIT_SEED = 0


class Digits(Dataset):
    """One split of the digits as a map-style dataset of `(input, label)` items."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = torch.from_numpy(images)
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


@functools.cache
def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    n_test = round(len(labels) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


def train_set() -> Digits:
    """The 1,438 training images."""
    x, y, _, _ = _split()
    return Digits(x, y)


def test_set() -> Digits:
    """The 359 held-out test images."""
    _, _, x, y = _split()
    return Digits(x, y)
