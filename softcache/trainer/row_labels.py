"""Row layout of the stream: per-sample (or per-view) soft labels of dense and top-k stores.

A plan block is one shard: `shard_samples` samples, all `views` rows of each. The stream reads a
shuffle window's shards at a time, every array's rows straight into the order the plan consumes
them (the chosen view's row of each sample, widened to float32 / int64 on the way, or in the
stored dtypes for a GPU student, see `SoftLabelStream`'s `values`), so that a batch is a slice of
that buffer (`RowBlocks`).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from softcache.errors import DatasetMismatchError
from softcache.losses.targets import for_batch
from softcache.store import (
    LOGITS,
    LSE,
    SAMPLE_HASH,
    TOPK_INDICES,
    TOPK_VALUES,
    VIEW_PARAMS,
    LogitStore,
    decode_values,
    take_rows,
)

if TYPE_CHECKING:
    from softcache.losses import TeacherTargets

# What a stream delivers: decoded float32 / int64, or the store's own dtypes.
VALUE_MODES = ("float32", "stored")

# The key of a read group's teacher targets beside its arrays (not an array of the store).
_TARGETS = "targets"

TargetMaker = Callable[["SoftLabels"], "TeacherTargets | None"]


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
        targets: the teacher's side of the KD loss at one temperature (`losses.TeacherTargets`,
            float32), made beside the step when `AlignedBatches` is given a `temperature`;
            `distillation_loss` at that temperature then runs only the student's side. Else None.
    """

    indices: np.ndarray
    sample_hash: np.ndarray
    logits: torch.Tensor | None = None
    topk_values: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    views: np.ndarray | None = None
    view_params: np.ndarray | None = None
    targets: TeacherTargets | None = None

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
            None if self.targets is None else self.targets.pin_memory(),
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
            None if self.targets is None else self.targets.to(device, non_blocking=non_blocking),
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


class RowBlocks:
    """How the stream reads a row store's blocks (one shard each) and takes batches from them.

    The stream reads a group of blocks at a time (a shuffle window's) and tells this source in
    which order the plan will consume their samples (`read_group`'s `samples`). Each array's
    rows are read straight into that order (the chosen view's row of each sample, widened where
    `values` is `float32`) in one buffer per array (`LogitStore.read_gather`: on a local store
    each chunk is decoded on every core and its rows scattered to their places, each written
    once). A batch is then the next run of those rows (`take`): a slice, no copy, where all its
    rows come from one group; two or more groups' runs (a batch straddling windows) are copied
    together.

    With `targets`, a top-k store's teacher side of the loss (`losses.TeacherTargets`) is made
    once for each read group, on the reader's thread, and each batch's are a slice of it (in the
    form `losses.for_batch` gives a batch): its ops run once per group of thousands of rows, not
    once per batch (for a batch of 64 rows, k = 5 of 100 classes: 26 against 120 µs on this
    machine, warm). Each row's targets depend on that row alone, so they are the ones the batch
    would have made, bit for bit. In the sparse form they are about half the group's own bytes.
    A dense store's batches come without: its targets would be a second float32 copy of the
    group's rows (the scaling benchmark's training run, 16,384-row groups of 100 classes, peaked
    116 MB higher at 10^5 samples with them), for 62 against 16 µs a batch.

    Args:
        store: an open, complete row store.
        view_policy: which view of each sample an epoch uses (`softcache.data.augment.choose_views`).
        values: `float32` or `stored` (see `SoftLabelStream`).
        targets: makes a top-k group's teacher targets from its rows' soft labels, in the
            sparse form (`losses.topk_rows`), or None; see above. None, or a dense store:
            batches come without targets.
    """

    def __init__(
        self,
        store: LogitStore,
        *,
        view_policy: str,
        values: str,
        targets: TargetMaker | None = None,
    ) -> None:
        self.store = store
        self.targets = targets
        self._names = store.row_array_names
        self.view_policy = view_policy
        self.values = values
        self.views = store.meta.views
        layout = store.row_layout()
        value_dtype = store.meta.value_dtype
        # Each array as delivered: its buffer dtype, and how its stored rows become that.
        self._delivered: dict[str, tuple[np.dtype, Callable[..., np.ndarray] | None]] = {}
        for name in self._names:
            dtype = layout[name][1]
            convert = None
            if values == "float32" and name in (LOGITS, TOPK_VALUES):
                dtype = np.dtype(np.float32)
                convert = partial(decode_values, value_dtype=value_dtype)
            elif values == "float32" and name == TOPK_INDICES:
                dtype = np.dtype(np.int64)
            self._delivered[name] = (np.dtype(dtype), convert)
        self._buffers = _GroupBuffers(
            {name: (layout[name][0], dtype) for name, (dtype, _) in self._delivered.items()}
        )

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

    def read_group(
        self,
        bounds: list[tuple[int, int]],
        blocks: list[int],
        samples: np.ndarray,
        block_rows: int,
        seed_epoch: tuple[int, int],
        computed: list[dict[str, np.ndarray]] | None = None,
    ) -> dict[str, np.ndarray]:
        """The rows of `samples`, in their order, out of the blocks `blocks`.

        Args:
            bounds: each block's store rows `[start, stop)` (`rows`).
            blocks: the block ids, in the order of `bounds`.
            samples: (S,) int64 plan rows (sample indices) inside those blocks, in the order
                the plan consumes them.
            block_rows: the plan's samples per block.
            seed_epoch: the plan's seed and epoch (which view each sample replays).
            computed: each block's arrays already read (by Dask tasks), in the order of
                `bounds`; None reads them from the store.

        Returns:
            Array name -> (S, ...) rows in the delivered dtypes, in one of the reused buffers;
            with `targets`, also the group's teacher targets (or None).
        """
        samples = np.asarray(samples, dtype=np.int64)
        block_ids = samples // block_rows
        lookup = np.full(max(blocks) + 1, -1, dtype=np.int64)
        lookup[blocks] = np.arange(len(blocks))
        which = lookup[np.minimum(block_ids, len(lookup) - 1)]
        if samples.size and (block_ids.max() >= len(lookup) or which.min() < 0):
            raise ValueError("samples outside the group's blocks")
        sizes = np.array([stop - start for start, stop in bounds], dtype=np.int64)
        firsts = np.cumsum(sizes) - sizes  # each block's first row in the group
        offsets = samples - block_ids * block_rows
        if self.store.meta.augmentation:  # the chosen view's row inside the shard
            offsets = offsets * self.views + self._views(samples, seed_epoch)
        positions = firsts[which] + offsets
        group = self._buffers.get(len(samples))
        if computed is None:
            self.store.read_gather(
                [(name, bounds, positions) for name in self._names],
                [group[name] for name in self._names],
                [self._delivered[name][1] for name in self._names],
            )
        else:
            for name in self._names:
                parts = [np.asarray(block[name]) for block in computed]
                take_rows(parts, positions, group[name], self._delivered[name][1])
        out: dict[str, Any] = group
        if self.targets is not None and self.store.meta.encoding == "topk":
            soft = SoftLabels(indices=samples, sample_hash=group[SAMPLE_HASH])
            self._fill_values(soft, group)
            out[_TARGETS] = self.targets(soft)
        return out

    def take(
        self,
        batch: np.ndarray,
        block_ids: np.ndarray,
        parts: list[tuple[dict[str, Any], np.ndarray | None, int, int]],
        block_rows: int,
        seed_epoch: tuple[int, int],
    ) -> SoftLabels:
        """A batch's soft labels: its rows' runs in the groups they were read in.

        Args:
            batch: (B,) int64 plan rows.
            block_ids: (B,) their blocks.
            parts: for each group the batch draws from, `(group, where, start, stop)`: the
                group's rows `start:stop` are the batch's rows `where` (None: all of them).
            block_rows: the plan's samples per block.
            seed_epoch: the plan's seed and epoch.
        """
        targets = None
        if len(parts) == 1 and parts[0][1] is None:
            group, _, start, stop = parts[0]
            cols = {name: group[name][start:stop] for name in self._names}
            whole = group.get(_TARGETS)
            if whole is not None:
                targets = for_batch(whole.rows(slice(start, stop)))
        else:
            if all(group.get(_TARGETS) is not None for group, *_ in parts):
                targets = for_batch(_joined_targets(parts, len(batch)))
            cols = {}
            for name in self._names:
                first = parts[0][0][name]
                col = np.empty((len(batch), *first.shape[1:]), dtype=first.dtype)
                for group, where, start, stop in parts:
                    col[where] = group[name][start:stop]
                cols[name] = col
        meta = self.store.meta
        views = self._views(batch, seed_epoch) if meta.augmentation else None
        out = SoftLabels(indices=batch, sample_hash=cols[SAMPLE_HASH], views=views)
        if VIEW_PARAMS in cols:
            out.view_params = cols[VIEW_PARAMS]
        self._fill_values(out, cols)
        out.targets = targets
        return out

    def _fill_values(self, out: SoftLabels, cols: dict[str, np.ndarray]) -> None:
        """Set `out`'s soft labels (dense logits, or top-k values, ids and normalisers)."""
        if self.store.meta.encoding == "dense":
            out.logits = self._values(cols[LOGITS])
        else:
            out.topk_values = self._values(cols[TOPK_VALUES])
            out.topk_indices = torch.from_numpy(cols[TOPK_INDICES])
            out.lse = torch.from_numpy(cols[LSE])

    def _views(self, samples: np.ndarray, seed_epoch: tuple[int, int]) -> np.ndarray:
        from softcache.data.augment import choose_views

        return choose_views(self.view_policy, self.views, samples, *seed_epoch)

    def _values(self, col: np.ndarray) -> torch.Tensor:
        """Values as delivered: float32, or the stored dtype (bfloat16 as torch's bfloat16, from
        its uint16 bits)."""
        if self.values == "stored" and self.store.meta.value_dtype == "bfloat16":
            return torch.from_numpy(col.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(col)


def _joined_targets(
    parts: list[tuple[dict[str, Any], np.ndarray | None, int, int]], rows: int
) -> TeacherTargets:
    """The targets of a batch drawn from several groups: each group's rows `start:stop` placed
    at the batch's rows `where` (see `RowBlocks.take`)."""
    first: TeacherTargets = parts[0][0][_TARGETS]

    def joined(name: str) -> torch.Tensor:
        like = getattr(first, name)
        out = like.new_empty((rows, *like.shape[1:]))
        for group, where, start, stop in parts:
            assert where is not None
            out[torch.from_numpy(where)] = getattr(group[_TARGETS], name)[start:stop]
        return out

    tensors = [f.name for f in fields(first) if isinstance(getattr(first, f.name), torch.Tensor)]
    changes: dict[str, Any] = {name: joined(name) for name in tensors}
    return replace(first, **changes)


class _GroupBuffers:
    """Read groups' buffers, handed out again once nothing refers to them any more.

    A window's group is tens of MB; fresh memory is paid for in page faults as it is first
    written, which cost the stream benchmark's reads a quarter of their time. A group is free
    again when no reference to its arrays or a view of them is left but this pool's (their
    reference counts: the stream's dict of the group and every batch sliced from it hold one),
    so a buffer still in use anywhere is not handed out.

    Args:
        layout: per-row shape and delivered dtype of every array.
        keep: groups kept for reuse, at most (about the groups a stream has in flight).
    """

    def __init__(self, layout: dict[str, tuple[tuple[int, ...], np.dtype]], keep: int = 4) -> None:
        self._layout = layout
        self._keep = keep
        self._groups: list[dict[str, np.ndarray]] = []
        self._lock = threading.Lock()

    def get(self, rows: int) -> dict[str, np.ndarray]:
        """A group of `rows` rows per array (uninitialised): a new dict of a free group's arrays
        of that size where there is one, else of new arrays. It is in use for as long as that
        dict, one of its arrays or a view of one is alive."""
        with self._lock:
            for group in self._groups:
                if len(next(iter(group.values()))) == rows and _unused(group):
                    return dict(group)
            group = {
                name: np.empty((rows, *shape), dtype)
                for name, (shape, dtype) in self._layout.items()
            }
            if len(self._groups) >= self._keep:
                self._groups.pop(0)
            self._groups.append(group)
            return dict(group)


def _unused(group: dict[str, np.ndarray]) -> bool:
    """Whether only the pool refers to `group`'s arrays (no other dict, array view or tensor)."""
    # An array's references when unused: its dict, the loop variable and getrefcount's argument.
    return all(sys.getrefcount(array) <= 3 for array in group.values())
