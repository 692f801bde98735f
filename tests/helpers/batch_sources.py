"""Batch sources for the batch process's protocol tests.

`MarkedEpochs(directory)` is what `BatchProcess` runs in its child (a spec target's module, which
the child imports): each epoch's batches are `(epoch, index)` tensors, and the first thing its
`batches` does is create `directory/epoch-<epoch>`, so a test sees from the parent whether the
child began an epoch before it was asked for. `NumberedBatches` makes batches that say which they
are in every member (a tensor, a numpy array), for the tests of batches held past the next.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softcache.trainer.plan import EpochPlan


class MarkedEpochs:
    """`steps` batches per epoch, each `tensor([epoch, index, hash_stride])` (int64)."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def __call__(self) -> MarkedEpochs:  # the child builds its source by calling the factory
        return self

    def batches(
        self, plan: EpochPlan, steps: int, *, hash_stride: int, then: EpochPlan | None
    ) -> Iterator[torch.Tensor]:
        (self.directory / f"epoch-{plan.epoch}").touch()
        for index in range(plan.cursor, steps):
            yield torch.tensor([plan.epoch, index, hash_stride])


def marked(plan: EpochPlan, steps: int, hash_stride: int) -> list[list[int]]:
    """What `MarkedEpochs.batches` makes of an epoch, as lists."""
    return [[plan.epoch, i, hash_stride] for i in range(plan.cursor, steps)]


class NumberedBatches:
    """`steps` batches per epoch, batch n of epoch e: ``{"tensor": full((rows,), 1000 e + n),
    "array": the same as a numpy float64 array}``."""

    def __init__(self, rows: int = 256) -> None:
        self.rows = rows

    def __call__(self) -> NumberedBatches:
        return self

    def batches(
        self, plan: EpochPlan, steps: int, *, hash_stride: int, then: EpochPlan | None
    ) -> Iterator[dict[str, Any]]:
        for index in range(plan.cursor, steps):
            yield numbered(plan.epoch, index, self.rows)


def numbered(epoch: int, index: int, rows: int = 256) -> dict[str, Any]:
    """`NumberedBatches`' batch `index` of `epoch`."""
    value = 1000 * epoch + index
    return {
        "tensor": torch.full((rows,), value, dtype=torch.int64),
        "array": np.full(rows, value, dtype=np.float64),
    }
