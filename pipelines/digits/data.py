"""scikit-learn's digits (1,797 8x8 images, shipped inside the package) with a fixed split.

Items are `(image (1, 8, 8) float32 in [0, 1], label int)`. The split is a seeded permutation:
1,438 training and 359 test images, the same on every machine.

The scarce-label setting of the main job (`pipelines.digits.run`): a seeded 10 % of the training
images keep their labels (`labelled_set`, 144 images, at least one per class), and
`scarce_train_set` is all 1,438 training images with label -1 (none) on the other 90 %: what a
team has when labelling is expensive and images are not.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import Dataset

TEST_FRACTION = 0.2
SPLIT_SEED = 0
LABELLED_FRACTION = 0.1
LABELLED_SEED = 1


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


@functools.cache
def labelled_indices() -> np.ndarray:
    """The training images that keep their label: a seeded 10 %, ascending."""
    _, y, _, _ = _split()
    rng = np.random.default_rng(LABELLED_SEED)
    n = round(len(y) * LABELLED_FRACTION)
    while True:  # redraw until every class has a labelled image (the first draw does)
        chosen = np.sort(rng.choice(len(y), size=n, replace=False))
        if len(np.unique(y[chosen])) == 10:
            return chosen


def labelled_set() -> Digits:
    """The 144 labelled training images (what a hard-label student can learn from)."""
    x, y, _, _ = _split()
    idx = labelled_indices()
    return Digits(x[idx], y[idx])


def scarce_train_set() -> Digits:
    """All 1,438 training images; the 90 % outside `labelled_indices` have label -1."""
    x, y, _, _ = _split()
    hidden = np.full_like(y, -1)
    idx = labelled_indices()
    hidden[idx] = y[idx]
    return Digits(x, hidden)
