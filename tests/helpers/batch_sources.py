"""A batch source for the batch process's protocol tests: it says, on disk, when each epoch starts.

`MarkedEpochs(directory)` is what `BatchProcess` runs in its child (a spec target's module, which
the child imports): each epoch's batches are `(epoch, index)` tensors, and the first thing its
`batches` does is create `directory/epoch-<epoch>`, so a test sees from the parent whether the
child began an epoch before it was asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
