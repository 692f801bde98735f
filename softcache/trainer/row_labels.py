"""Row layout of the stream: per-sample (or per-view) soft labels of dense and top-k stores.

A plan block is one shard: `shard_samples` samples, all `views` rows of each. The stream reads a
shard's rows of every array (a shuffle window's shards into one reused buffer per array,
`RowBlocks.read_group`); this source gathers a batch's rows (the chosen view's, with views) into
`SoftLabels`, widening them to float32 / int64 on the way (or handing over the stored dtypes for a
GPU student, see `SoftLabelStream`'s `values`).
"""

from __future__ import annotations

import sys
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from softcache.errors import DatasetMismatchError
from softcache.store import (
    LOGITS,
    LSE,
    SAMPLE_HASH,
    TOPK_INDICES,
    TOPK_VALUES,
    VIEW_PARAMS,
    LogitStore,
    decode_values,
)

# What a stream delivers: decoded float32 / int64, or the store's own dtypes.
VALUE_MODES = ("float32", "stored")


@dataclass
class SoftLabels:
    """One batch of soft labels, aligned with the plan's batch of row indices.

    Attributes:
        indices: (B,) int64 dataset indices of the rows.
        sample_hash: (B,) uint64 hashes of the inputs the teacher saw.
        logits: (B, C) float32 teacher logits (`dense` stores), else None.
        topk_values: (B, k) float32 kept teacher logits, descending (`topk` stores), else None.
        topk_indices: (B, k) int64 class ids of `topk_values`, else None.
            (From a stream with `values="stored"` these three hold the store's dtypes until
            `to(device)` widens them.)
        lse: (B, len(temperatures)) float32 full-row log-sum-exp per stored temperature, else None.
        views: (B,) int64 view of each sample these labels belong to (stores with views), else
            None.
        view_params: (B, P) float64 parameters that recreate each row's view from the sample
            (stores with views), else None: apply them to the inputs before the student sees them.
    """

    indices: np.ndarray
    sample_hash: np.ndarray
    logits: torch.Tensor | None = None
    topk_values: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    views: np.ndarray | None = None
    view_params: np.ndarray | None = None

    def pin_memory(self) -> SoftLabels:
        """A copy with the tensors in pinned host memory, so `to(cuda, non_blocking=True)` copies
        asynchronously (the assembling thread pins when the stream is told to)."""

        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return SoftLabels(
            self.indices,
            self.sample_hash,
            pin(self.logits),
            pin(self.topk_values),
            pin(self.topk_indices),
            pin(self.lse),
            self.views,
            self.view_params,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SoftLabels:
        """A copy with the tensors on `device`, as the losses take them.

        Values and `lse` become float32 and class ids int64 on the device, whatever dtype the
        stream delivered (see `SoftLabelStream`'s `values`): a stored-dtype batch is copied in
        its small dtype and widened where it lands.
        """

        def move(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
            if t is None:
                return None
            return t.to(device, non_blocking=non_blocking).to(dtype)

        return SoftLabels(
            self.indices,
            self.sample_hash,
            move(self.logits, torch.float32),
            move(self.topk_values, torch.float32),
            move(self.topk_indices, torch.int64),
            move(self.lse, torch.float32),
            self.views,
            self.view_params,
        )

    def check_alignment(self, input_hashes: np.ndarray, stride: int = 1) -> None:
        """Raise unless the batch's inputs hash to what the teacher saw.

        Args:
            input_hashes: uint64 hashes of rows 0, stride, 2 * stride, ... of the batch, from
                `softcache.data.hashing.sampled_collate(stride)` (`collate_with_hashes` for stride 1).
            stride: which rows were hashed.

        Raises:
            DatasetMismatchError: naming the first mismatching dataset index.
        """
        expected = self.sample_hash[::stride]
        indices = self.indices[::stride]
        if len(input_hashes) != len(expected) or not np.array_equal(input_hashes, expected):
            bad = np.flatnonzero(input_hashes[: len(expected)] != expected[: len(input_hashes)])
            first = int(indices[bad[0]]) if bad.size else int(indices[0])
            raise DatasetMismatchError(
                f"dataset sample {first} does not match the store: its input hashes differ from "
                "what the teacher saw when the store was built (the dataset was reordered, "
                "changed, or is not the one the store was built from); rebuild the store from "
                "this dataset or use the dataset it was built from"
            )


class GroupBlock(dict):
    """One block's arrays (`name -> rows`), views into the buffers of the read group it came in.

    The stream reads a shuffle window's blocks in one group, into one buffer per array
    (`group`), block after block (this one from row `start`). A batch whose rows all come from
    one group is then gathered with one `take` per array, where a batch spread over a window's
    blocks would otherwise take each block's rows and scatter them in place.
    """

    def __init__(
        self, arrays: dict[str, np.ndarray], group: dict[str, np.ndarray], start: int
    ) -> None:
        super().__init__(arrays)
        self.group = group
        self.start = start


class RowBlocks:
    """How the stream reads, decodes and gathers a row store's blocks (one shard each).

    Args:
        store: an open, complete row store.
        view_policy: which view of each sample an epoch uses (`softcache.data.augment.choose_views`).
        values: `float32` or `stored` (see `SoftLabelStream`).
    """

    def __init__(self, store: LogitStore, *, view_policy: str, values: str) -> None:
        self.store = store
        self._names = store.row_array_names
        self.view_policy = view_policy
        self.values = values
        self.views = store.meta.views
        self._buffers = _GroupBuffers(store.row_layout(), self._names)

    def check_block_rows(self, block_rows: int) -> None:
        """A plan over this store must take whole shards as its blocks."""
        meta = self.store.meta
        if block_rows != meta.shard_samples:
            per_view = f" / {self.views} views" if self.views > 1 else ""
            raise ValueError(
                f"the plan's block_rows ({block_rows}) must equal the store's shard_rows "
                f"({meta.shard_rows}{per_view}): the stream reads whole shards"
            )

    def rows(self, block: int, block_rows: int) -> tuple[int, int]:
        """The store rows `[start, stop)` of block `block`: shard `block`, every view."""
        return self.store.shard_bounds(block)

    def gather(
        self,
        batch: np.ndarray,
        block_ids: np.ndarray,
        cache: dict[int, dict[str, np.ndarray]],
        rows: int,
        seed_epoch: tuple[int, int],
    ) -> SoftLabels:
        offsets = batch - block_ids * rows
        views = None
        if self.store.meta.augmentation:
            from softcache.data.augment import choose_views

            views = choose_views(self.view_policy, self.views, batch, *seed_epoch)
            offsets = offsets * self.views + views  # the chosen view's row inside the shard
        unique = np.unique(block_ids)
        cols: dict[str, np.ndarray] = {}
        blocks = [cache[int(b)] for b in unique]
        if unique.size == 1:
            cols = {name: blocks[0][name][offsets] for name in self._names}
        elif (group := _one_group(blocks)) is not None:
            buffers, starts = group
            # Each batch row's row in the group's buffers, through its block's first row there.
            rows_in_group = starts[np.searchsorted(unique, block_ids)] + offsets
            cols = {name: np.take(buffers[name], rows_in_group, axis=0) for name in self._names}
        else:
            # Which batch rows come from which block, worked out once for every array.
            parts = []
            for b in unique:
                where = np.flatnonzero(block_ids == b)
                parts.append((cache[int(b)], where, offsets[where]))
            for name in self._names:
                first = parts[0][0][name]
                col = np.empty((len(batch), *first.shape[1:]), dtype=first.dtype)
                for block, where, rows_in_block in parts:
                    col[where] = block[name][rows_in_block]
                cols[name] = col
        meta = self.store.meta
        out = SoftLabels(indices=batch, sample_hash=cols[SAMPLE_HASH], views=views)
        if VIEW_PARAMS in cols:
            out.view_params = cols[VIEW_PARAMS]
        if meta.encoding == "dense":
            out.logits = self._values(cols[LOGITS])
        else:
            out.topk_values = self._values(cols[TOPK_VALUES])
            out.topk_indices = self._indices(cols[TOPK_INDICES])
            out.lse = torch.from_numpy(cols[LSE])
        return out

    def read_group(self, bounds: list[tuple[int, int]]) -> list[GroupBlock]:
        """Blocks of rows `bounds` read in one concurrent `read_many`, into one buffer per array.

        Args:
            bounds: each block's store rows `[start, stop)`.

        Returns:
            A `GroupBlock` per block, in the order of `bounds`.
        """
        blocks = self._buffers.blocks([stop - start for start, stop in bounds])
        requests = [(name, slice(*rows)) for rows in bounds for name in self._names]
        self.store.read_many(
            requests, out=[block[name] for block in blocks for name in self._names]
        )
        return blocks

    def decode(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What the reader thread does to a block after Dask decoded it: nothing.

        Widening (fp16 -> fp32, uint16 ids -> int64) happens per batch in `gather`, on the
        assembling thread, so the reader thread (zstd, zarrs) and the assembling thread (gather,
        widening) share the work on two cores rather than one doing both.
        """
        return data

    def _values(self, col: np.ndarray) -> torch.Tensor:
        """A batch's stored values as delivered: float32, or the stored dtype (bfloat16 as
        torch's bfloat16, from its uint16 bits)."""
        value_dtype = self.store.meta.value_dtype
        if self.values == "stored":
            if value_dtype == "bfloat16":
                return torch.from_numpy(col.view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(col)
        return torch.from_numpy(decode_values(col, value_dtype))

    def _indices(self, col: np.ndarray) -> torch.Tensor:
        """A batch's stored class ids: int64, or the stored dtype (uint16 / int32)."""
        if self.values == "stored":
            return torch.from_numpy(col)
        return torch.from_numpy(col.astype(np.int64))


def _one_group(
    blocks: list[dict[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
    """The read group's buffers and each block's first row in them (int64), if every block came
    in the same group; else None."""
    first = blocks[0]
    if not isinstance(first, GroupBlock):
        return None
    starts = []
    for block in blocks:
        if not isinstance(block, GroupBlock) or block.group is not first.group:
            return None
        starts.append(block.start)
    return first.group, np.array(starts, dtype=np.int64)


class _GroupBuffers:
    """Read groups' buffers, handed out again once nothing refers to them any more.

    A window's group is tens of MB; fresh memory is paid for in page faults as it is first
    written, which cost the stream benchmark's reads a quarter of their time. A group is free
    again when none of its `GroupBlock`s is alive (batches are gathered copies) and no other
    reference to its arrays or a view of them is left (their reference counts), so a buffer
    still in use anywhere is not handed out.

    Args:
        layout: per-row shape and dtype of every array (`LogitStore.row_layout`).
        names: the arrays a group holds.
        keep: groups kept for reuse, at most (about the groups a stream has in flight).
    """

    def __init__(
        self,
        layout: dict[str, tuple[tuple[int, ...], np.dtype]],
        names: tuple[str, ...],
        keep: int = 4,
    ) -> None:
        self._layout = {name: layout[name] for name in names}
        self._keep = keep
        # Each group's buffers, and the blocks made of them (weakly: alive while in use).
        self._groups: list[tuple[dict[str, np.ndarray], list[weakref.ref[GroupBlock]]]] = []
        self._lock = threading.Lock()

    def blocks(self, sizes: list[int]) -> list[GroupBlock]:
        """Blocks of `sizes` rows (uninitialised), one after another in one group's buffers.

        The group is reused where one of the same rows is free, and is in use from here on for
        as long as one of the blocks returned is alive.
        """
        rows = sum(sizes)
        with self._lock:
            for group, users in self._groups:
                if len(next(iter(group.values()))) == rows and _unused(group, users):
                    break
            else:
                group = {
                    name: np.empty((rows, *shape), dtype)
                    for name, (shape, dtype) in self._layout.items()
                }
                users = []
                if len(self._groups) >= self._keep:
                    self._groups.pop(0)
                self._groups.append((group, users))
            out, start = [], 0
            for size in sizes:
                views = {name: array[start : start + size] for name, array in group.items()}
                out.append(GroupBlock(views, group, start))
                start += size
            users[:] = [weakref.ref(block) for block in out]
            return out


def _unused(group: dict[str, np.ndarray], blocks: list[weakref.ref[GroupBlock]]) -> bool:
    """Whether no block of `group` is alive and only the pool refers to its arrays."""
    # An array's references when unused: its dict, the loop variable and getrefcount's argument.
    return all(block() is None for block in blocks) and all(
        sys.getrefcount(array) <= 3 for array in group.values()
    )
