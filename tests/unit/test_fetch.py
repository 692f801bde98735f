"""Tests for softcache.data.fetch: batches fetched whole are the item-by-item ones, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from softcache.data.fetch import Stacked, batch_fetching
from softcache.data.hashing import MISSING_LABEL, collate_pairs, sampled_collate

INPUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int64, torch.bool]
LABEL_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]


@st.composite
def datasets_and_batches(draw: st.DrawFn) -> tuple[TensorDataset, list[int]]:
    """A TensorDataset of random inputs and labels (negatives among them), and a batch of its
    rows in any order, repeats allowed."""
    n = draw(st.integers(1, 40))
    shape = tuple(draw(st.lists(st.integers(1, 4), max_size=3)))
    seed = draw(st.integers(0, 2**31))
    gen = torch.Generator().manual_seed(seed)
    inputs = (torch.randn((n, *shape), generator=gen) * 50).to(draw(st.sampled_from(INPUT_DTYPES)))
    label_dtype = draw(st.sampled_from(LABEL_DTYPES))
    low = 0 if label_dtype == torch.uint8 else -3
    labels = torch.randint(low, 10, (n,), generator=gen).to(label_dtype)
    if draw(st.booleans()) and inputs.ndim >= 2:  # a non-contiguous view, as a transpose makes
        inputs = inputs.transpose(0, -1).contiguous().transpose(0, -1)
    rows = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=20))
    return TensorDataset(inputs, labels), rows


def _same(a: tuple, b: tuple) -> None:
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.is_contiguous() and y.is_contiguous()  # strides differ only on size-1 dims
            assert torch.equal(x, y)
        elif isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y)
        else:
            assert x is None and y is None


@settings(max_examples=150, deadline=None)
@given(datasets_and_batches(), st.sampled_from([0, 1, 2, 3]))
def test_a_batch_fetched_whole_is_the_stacked_items(case, stride) -> None:
    dataset, rows = case
    fetched = batch_fetching(dataset)
    batch = fetched.__getitems__(rows)
    assert isinstance(batch, Stacked) and len(batch) == len(rows)
    collate = sampled_collate(stride)
    _same(collate(batch), collate([dataset[i] for i in rows]))
    assert (batch.labels[batch.labels < 0] == MISSING_LABEL).all()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_dataloader_over_it_gives_the_same_batches(num_workers: int) -> None:
    gen = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(50, 3, 4, 4, generator=gen), torch.randint(-1, 5, (50,)))
    order = [np.random.default_rng(1).permutation(50)[i : i + 16] for i in range(0, 50, 16)]

    def batches(data: Dataset) -> list[tuple]:
        loader = DataLoader(
            data, batch_sampler=order, collate_fn=sampled_collate(2), num_workers=num_workers
        )
        return list(loader)

    fast, plain = batches(batch_fetching(dataset)), batches(dataset)
    assert len(fast) == len(plain) == 4
    for a, b in zip(fast, plain, strict=True):
        _same(a, b)


def test_a_subset_of_it_fetches_whole_too() -> None:
    dataset = TensorDataset(torch.arange(20.0).reshape(10, 2), torch.arange(10))
    subset = Subset(batch_fetching(dataset), [9, 3, 3, 0])
    got = collate_pairs(subset.__getitems__([0, 1, 3]))
    _same(got, collate_pairs([dataset[i] for i in (9, 3, 0)]))


class _Doubled(TensorDataset):
    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        x, y = super().__getitem__(index)
        return x * 2, y


@pytest.mark.parametrize(
    "dataset",
    [
        _Doubled(torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64)),  # a subclass: its items
        TensorDataset(torch.zeros(4, 2), torch.zeros(4), torch.zeros(4)),  # not a pair
        TensorDataset(torch.zeros(4, 2), torch.zeros(4)),  # float labels: refused item by item
        TensorDataset(torch.zeros(4, 2), torch.zeros(4, 1, dtype=torch.int64)),  # 2-D labels
        TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.bool)),  # bool labels
    ],
    ids=["subclass", "three-tensors", "float-labels", "2d-labels", "bool-labels"],
)
def test_other_datasets_are_fetched_item_by_item(dataset: Dataset) -> None:
    assert batch_fetching(dataset) is dataset
