"""Token sequences for causal LMs: dataset items, padded batches, and the alignment convention.

**Items.** A sequence dataset is map-style; item ``i`` is ``(input_ids, labels)`` with
``input_ids`` ``(n_i,)`` integer token ids and ``labels`` ``(n_i,)`` (the target of each position,
``-100`` where there is none) or ``None``; or a dict with ``input_ids`` and optional ``labels``
and ``attention_mask``. An item's attention mask must be a prefix of ones (right padding): its
real tokens are the first ``sum(mask)``. Lengths may differ between items, and may be 0.

**Alignment.** The store keeps the real tokens only, in dataset order: sample ``i``'s rows are
``offsets[i]:offsets[i+1]`` and row ``offsets[i] + j`` holds the teacher's distribution at
position ``j`` of sample ``i``, that is, its prediction of the token *after* position ``j``
(``input_ids[j + 1]``, which is ``labels[j]`` when labels are the shifted inputs). A batch's rows
are its real tokens in row-major order: ``logits[attention_mask]`` of the right-padded batch.

**Models.** A causal LM maps ``input_ids`` ``(B, L)`` int64 (and, when its ``forward`` takes
one, ``attention_mask`` ``(B, L)``) to ``(B, L, V)`` logits, or to an object whose ``logits``
attribute holds them (Hugging Face `transformers` models).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from softcache.data.hashing import hash_rows
from softcache.data.labels import NO_LABEL
from softcache.errors import DatasetFormatError, TeacherOutputError
from softcache.runtime.progress import Progress

IGNORE_INDEX = NO_LABEL  # a position without a target (`softcache.data.labels`)


@dataclass(frozen=True)
class SequenceBatch:
    """A right-padded batch of sequences.

    Attributes:
        input_ids: ``(B, L)`` int64, padded with ``pad_id``.
        attention_mask: ``(B, L)`` bool, True at real tokens (a prefix of each row).
        labels: ``(B, L)`` int64 targets, ``IGNORE_INDEX`` at padding and where an item has none.
        lengths: ``(B,)`` int64 real tokens per row.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    lengths: Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SequenceBatch:
        return SequenceBatch(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.attention_mask.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.lengths,
        )

    def pin_memory(self) -> SequenceBatch:
        """A copy in pinned host memory (a DataLoader with ``pin_memory=True`` calls this)."""
        return SequenceBatch(
            self.input_ids.pin_memory(),
            self.attention_mask.pin_memory(),
            self.labels.pin_memory(),
            self.lengths,
        )


def item_tokens(item: Any, index: int | None = None) -> tuple[Tensor, Tensor | None]:
    """An item's real ``input_ids`` ``(n,)`` int64 and ``labels`` ``(n,)`` int64 (or None)."""
    where = "a dataset item" if index is None else f"dataset item {index}"
    mask = None
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise DatasetFormatError(f"{where} is a dict without 'input_ids'")
        ids, labels, mask = item["input_ids"], item.get("labels"), item.get("attention_mask")
    elif isinstance(item, Sequence) and len(item) == 2:
        ids, labels = item
    else:
        raise DatasetFormatError(
            f"{where} must be (input_ids, labels) or a dict with 'input_ids'; got "
            f"{type(item).__name__}"
        )
    ids = _long_1d(ids, where, "input_ids")
    if labels is not None:
        labels = _long_1d(labels, where, "labels")
        if labels.shape != ids.shape:
            raise DatasetFormatError(
                f"{where}: labels {tuple(labels.shape)} and input_ids {tuple(ids.shape)} differ"
            )
    if mask is not None:
        mask = torch.as_tensor(mask).bool().reshape(-1)
        n = int(mask.sum())
        if mask.shape != ids.shape or not bool(mask[:n].all()):
            raise DatasetFormatError(
                f"{where}: attention_mask must match input_ids and be ones then zeros (right "
                "padding); give unpadded items or pad on the right"
            )
        ids = ids[:n]
        labels = None if labels is None else labels[:n]
    return ids, labels


def collate_sequences(items: Sequence[Any], *, pad_id: int = 0) -> SequenceBatch:
    """Right-pad items (see the module docstring) into a `SequenceBatch`.

    A batch whose items are all empty gets one padding column, so ``L >= 1``.
    """
    parsed = [item_tokens(item) for item in items]
    lengths = torch.tensor([len(ids) for ids, _ in parsed], dtype=torch.int64)
    longest = max(int(lengths.max()) if len(parsed) else 0, 1)
    input_ids = torch.full((len(parsed), longest), pad_id, dtype=torch.int64)
    labels = torch.full((len(parsed), longest), IGNORE_INDEX, dtype=torch.int64)
    for row, (ids, lab) in enumerate(parsed):
        input_ids[row, : len(ids)] = ids
        if lab is not None:
            labels[row, : len(lab)] = lab
    mask = torch.arange(longest) < lengths.unsqueeze(1)
    return SequenceBatch(input_ids, mask, labels, lengths)


def scan(dataset: Any, *, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One pass over a sequence dataset's inputs (no model): lengths and hashes.

    Returns:
        ``(lengths, hashes)``: ``(N,)`` int64 real tokens per item and ``(N,)`` uint64 hashes
        of each item's real ``input_ids`` as int64 (`softcache.data.hashing.hash_rows`).
    """
    n = len(dataset)
    lengths = np.empty(n, dtype=np.int64)
    hashes = np.empty(n, dtype=np.uint64)
    bar = Progress(n, "scan", enabled=progress)
    for i in range(n):
        ids, _ = item_tokens(dataset[i], i)
        lengths[i] = len(ids)
        hashes[i] = hash_rows(ids.unsqueeze(0))[0]
        bar.update(1)
    bar.close()
    return lengths, hashes


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """CSR offsets ``(N + 1,)`` int64 of per-sample lengths ``(N,)``."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def causal_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``(B, L, V)`` logits of a causal LM (see the module docstring for what it may return)."""
    if _takes_attention_mask(model):
        out = model(input_ids, attention_mask=attention_mask.long())
    else:
        out = model(input_ids)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor) or logits.shape[:2] != input_ids.shape or logits.ndim != 3:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(out).__name__
        raise TeacherOutputError(
            f"a causal LM must return (B, L, V) = ({input_ids.shape[0]}, {input_ids.shape[1]}, V) "
            f"logits for input_ids {tuple(input_ids.shape)}; got {shape}"
        )
    return logits


def _takes_attention_mask(model: nn.Module) -> bool:
    # A DistributedDataParallel wrapper's forward takes (*inputs, **kwargs): ask the model inside.
    inner = getattr(model, "module", model)
    try:
        return "attention_mask" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def _long_1d(value: Any, where: str, name: str) -> Tensor:
    t = torch.as_tensor(value)
    # An empty sequence has no values to be of the wrong type: `[]` (a tokenizer's output for an
    # empty text) reads as float32, and is as empty as any integer tensor.
    wrong_type = t.dtype.is_floating_point or t.dtype == torch.bool
    if t.ndim != 1 or (wrong_type and t.numel() > 0):
        raise DatasetFormatError(
            f"{where}: {name} must be a 1-D integer sequence, got {t.dtype} {tuple(t.shape)}"
        )
    if t.numel() == 0:  # a fresh one: an empty numpy array's tensor has stride 0, which hash_rows
        return torch.zeros(0, dtype=torch.int64)  # cannot view as bytes
    return t.long()
