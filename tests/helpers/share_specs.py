"""Factories for the sharing tests (`verify`, `merge`, `info`, `ls`), named as
`tests.helpers.share_specs:NAME`.

They build on the synthetic data of `tests.helpers.specs`: the same inputs, so stores of them share
the dataset fingerprint with `specs:dataset` unless the order is changed on purpose.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from tests.helpers.specs import Linear, Synthetic, inputs, labels

SWAPPED = (17, 250)  # the two samples `swapped_dataset` exchanges (shards 0 and 3 at 64 rows)
SECOND_SEED = 7  # the weight seed of `second_teacher`


def swapped_dataset() -> Dataset:
    """`specs:dataset` with samples `SWAPPED` exchanged: same length and content, another order."""
    x, y = inputs(), labels()
    order = torch.arange(len(x))
    a, b = SWAPPED
    order[a], order[b] = b, a
    return Synthetic(x[order], y[order].tolist())


class _Scaled(nn.Module):
    """A seeded `Linear` whose logits are multiplied by `scale` (softer when below 1)."""

    def __init__(self, seed: int, scale: float) -> None:
        super().__init__()
        self.inner = Linear(seed=seed)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale


def second_teacher() -> nn.Module:
    """Another 10-class teacher: other weights, softer outputs than `specs:teacher`.

    It disagrees with `specs:teacher` on most samples, so an ensemble of the two is far from either.
    """
    return _Scaled(SECOND_SEED, 0.5).eval()
