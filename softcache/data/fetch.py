"""Whole batches fetched from in-memory tensors: one index per batch, not a call per sample.

A DataLoader fetches a batch of a map-style dataset item by item (``dataset[i]`` for each row)
and its collate function checks and stacks the items: a Python call, two tensor views, a label
conversion and a check per sample. `batch_fetching(dataset)` gives a torch `TensorDataset` of
(inputs, labels) the DataLoader's batched fetch (`__getitems__`): one index of each tensor per
batch, which the collate functions of `softcache.data.hashing` take as it is (`Stacked`). The
batches are the item-by-item ones, bit for bit; any other dataset is returned unchanged. An
epoch of the fast student's top-5 batches in `benchmarks/train.py` (64 rows of 3x32x32, teacher
targets made, every 16th row hashed) took 63 ms of CPU so, against 75 ms item by item. Since
item-by-item collation converts a batch's labels in one call (`hashing._stack_uniform`), the
collated batches alone (DataLoader and collation, no store) take 31-32 against 42-43 ms.

Row layouts only: a token dataset's items are sequences, which its own collation pads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from softcache.data.labels import LABEL_DTYPES, with_no_label


@dataclass(frozen=True)
class Stacked:
    """A batch fetched whole, as the collate functions would stack its items.

    Attributes:
        inputs: ``(B, ...)`` the rows' inputs, contiguous, in the dataset's dtype.
        labels: ``(B,)`` int64 labels, `NO_LABEL` where a row's label is negative.
    """

    inputs: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


class _BatchFetched(Dataset):
    """A `TensorDataset` of (inputs, labels) whose batches are fetched with one index each."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return self.dataset[index]

    def __getitems__(self, indices: Sequence[int]) -> Stacked:
        inputs, labels = self.dataset.tensors
        rows = torch.as_tensor(indices, dtype=torch.int64)
        return Stacked(inputs[rows].contiguous(), with_no_label(labels[rows]))


def batch_fetching(dataset: Any) -> Any:
    """`dataset`, fetched a batch at a time where it is a CPU `TensorDataset` of (inputs, labels).

    Only the `TensorDataset` class itself qualifies (a subclass may change what an item is), with
    two tensors on the CPU and 1-D integer labels; anything else is returned as it is, and its
    items are fetched and checked one by one.

    Args:
        dataset: a map-style dataset.

    Returns:
        A dataset with the same items whose DataLoader batches arrive as `Stacked`, or `dataset`.
    """
    if type(dataset) is not TensorDataset or len(dataset.tensors) != 2:
        return dataset
    inputs, labels = dataset.tensors
    if inputs.device.type != "cpu" or labels.device.type != "cpu":
        return dataset
    if labels.ndim != 1 or labels.dtype not in LABEL_DTYPES:
        return dataset
    return _BatchFetched(dataset)


__all__ = ["Stacked", "batch_fetching"]
