"""Factories for the training tests: the digits data altered in the ways alignment must catch.

Each is a spec target (`tests.helpers.train_specs:NAME`); the digits teacher checkpoint must exist
(the `digits_stores` fixture trains it when missing).
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn
from torch.utils.data import Dataset

from pipelines.digits.data import train_set
from pipelines.digits.models import student

SWAPPED = (5, 700)
ALTERED = 3
TRUNCATED = 1000


class _View(Dataset):
    """A dataset seen through an index map, optionally with one sample's input altered."""

    def __init__(self, order: list[int], altered: int | None = None) -> None:
        self.base = train_set()
        self.order = order
        self.altered = altered

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.base[self.order[i]]
        if i == self.altered:
            x = x.clone()
            x[0, 0, 0] += 0.5
        return x, y


def swapped() -> Dataset:
    """The training set with samples 5 and 700 swapped."""
    order = list(range(len(train_set())))
    a, b = SWAPPED
    order[a], order[b] = order[b], order[a]
    return _View(order)


def truncated() -> Dataset:
    """The first 1,000 training samples only."""
    return _View(list(range(TRUNCATED)))


def altered() -> Dataset:
    """The training set with one pixel of sample 3 changed."""
    return _View(list(range(len(train_set()))), altered=ALTERED)


class _Slow(nn.Module):
    """The digits student, sleeping SOFTCACHE_TEST_STEP_SLEEP seconds per forward (for kill tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = student()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delay = float(os.environ.get("SOFTCACHE_TEST_STEP_SLEEP", "0"))
        if delay and self.training:
            time.sleep(delay)
        return self.net(x)


def slow_student() -> nn.Module:
    return _Slow()
