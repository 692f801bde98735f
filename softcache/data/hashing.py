"""Per-sample fingerprints: what makes a cache verifiable against the data it was built from.

Each sample's input, as the teacher saw it (after the dataset's transforms and collation), is hashed
to a uint64: blake2b-64 over its dtype, shape and bytes. A store keeps one hash per row; training
recomputes them on its own batches, so a permuted, truncated or altered dataset is caught at the first
wrong row instead of silently teaching the student garbage. Hashing runs in the DataLoader workers
(inside `collate_with_hashes`), off the training thread; blake2b runs at about 1 GB/s per core.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from softcache.data.fetch import Stacked
from softcache.data.labels import NO_LABEL
from softcache.errors import DatasetFormatError

MISSING_LABEL = NO_LABEL  # what collation gives for a None (or negative) label


def hash_rows(inputs: torch.Tensor) -> np.ndarray:
    """Hash each row of a batch.

    Args:
        inputs: (B, ...) tensor on the CPU, any dtype.

    Returns:
        (B,) uint64 hashes; equal rows of equal dtype and shape hash equal, across processes and runs.
    """
    # clone: `.contiguous()` keeps the zero strides of an empty tensor, which `view` refuses.
    batch = inputs.detach().cpu().clone(memory_format=torch.contiguous_format)
    header = f"{batch.dtype}|{tuple(batch.shape[1:])}|".encode()
    # Reinterpret as bytes so dtypes numpy lacks (bfloat16) hash too.
    raw = batch.reshape(batch.shape[0], -1).view(torch.uint8).numpy()
    out = np.empty(batch.shape[0], dtype=np.uint64)
    for i in range(batch.shape[0]):
        h = hashlib.blake2b(header, digest_size=8)
        h.update(raw[i].tobytes())
        out[i] = int.from_bytes(h.digest(), "little")
    return out


def fingerprint(hashes: np.ndarray, offsets: np.ndarray | None = None) -> str:
    """A dataset fingerprint: sha256 over the ordered per-sample hashes (hex string).

    A per-token store also passes its ``(N + 1,)`` offsets, so that a moved sample boundary
    changes the fingerprint even where every sample hash is intact.
    """
    digest = hashlib.sha256(np.ascontiguousarray(hashes, dtype="<u8").tobytes())
    if offsets is not None:
        digest.update(b"|offsets|" + np.ascontiguousarray(offsets, dtype="<i8").tobytes())
    return digest.hexdigest()


def collate_with_hashes(items: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Collate `(input, label)` items into (inputs, labels, hashes).

    Args:
        items: dataset items, each `(input, label)`; input a tensor or array, label an int, a 0-d
            tensor, `-1` or `None` (no label); or a batch fetched whole (`fetch.Stacked`).

    Returns:
        inputs (B, ...) tensor; labels (B,) int64, `MISSING_LABEL` for missing; hashes (B,) uint64.

    Raises:
        DatasetFormatError: an item is not an `(input, label)` pair of the expected kinds.
    """
    batch, labels = _stack(items)
    return batch, labels, hash_rows(batch)


def sampled_collate(
    stride: int,
) -> Callable[[Sequence[Any]], tuple[torch.Tensor, torch.Tensor, Any]]:
    """A collate function hashing every `stride`-th row of each batch (rows 0, stride, ...).

    `stride=1` is `collate_with_hashes`; `stride=0` hashes nothing (`collate_pairs`). The result
    is picklable, so DataLoader workers can run it.
    """
    if stride < 0:
        raise ValueError(f"stride must be >= 0, got {stride}")
    if stride == 0:
        return collate_pairs
    if stride == 1:
        return collate_with_hashes
    return functools.partial(_collate_strided, stride=stride)


def _collate_strided(
    items: Sequence[Any], stride: int
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    batch, labels = _stack(items)
    return batch, labels, hash_rows(batch[::stride])


def _stack(items: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(items, Stacked):  # fetched whole (`softcache.data.fetch`): already stacked
        return items.inputs, items.labels
    inputs = []
    labels = []
    for item in items:
        check_item(item)
        x, y = item
        inputs.append(torch.as_tensor(x))
        labels.append(MISSING_LABEL if y is None or int(y) < 0 else int(y))
    try:
        batch = torch.stack(inputs)
    except RuntimeError as exc:
        shapes = sorted({tuple(t.shape) for t in inputs})
        raise DatasetFormatError(
            f"dataset inputs in one batch have different shapes {shapes}; every input must have "
            "the same shape (pad or resize them in the dataset)"
        ) from exc
    return batch, torch.tensor(labels, dtype=torch.int64)


def collate_pairs(items: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Collate like `collate_with_hashes` but skip hashing (for runs that check nothing)."""
    inputs, labels = _stack(items)
    return inputs, labels, None


def check_item(item: Any, index: int | None = None) -> None:
    """Raise `DatasetFormatError` unless `item` is an `(input, label)` pair."""
    where = f"dataset item {index}" if index is not None else "a dataset item"
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise DatasetFormatError(
            f"{where} is a {type(item).__name__}, expected an (input, label) pair; "
            "wrap unlabelled data as (input, None)"
        )
    x, y = item
    if not isinstance(x, torch.Tensor | np.ndarray):
        raise DatasetFormatError(
            f"{where} has an input of type {type(x).__name__}, expected a tensor"
        )
    if y is not None and not _is_integer_label(y):
        raise DatasetFormatError(
            f"{where} has label {y!r}; expected an integer class, -1 or None for no label"
        )


def _is_integer_label(y: Any) -> bool:
    if isinstance(y, bool):
        return False
    if isinstance(y, int | np.integer):
        return True
    if isinstance(y, torch.Tensor):
        return y.ndim == 0 and not y.dtype.is_floating_point and not y.dtype.is_complex
    if isinstance(y, np.ndarray):
        return y.ndim == 0 and np.issubdtype(y.dtype, np.integer)
    return False
