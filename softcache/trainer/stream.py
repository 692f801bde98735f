"""The soft-label stream: a store's rows, in epoch-plan order, read by Dask a bounded number ahead.

Reading random rows from a chunked store decompresses a whole chunk per row; computing a Dask graph
per batch pays scheduling overhead per batch. Both are orders of magnitude slower than what the
student needs. So the stream reads whole storage blocks (shards) in `EpochPlan.block_order`, a few
blocks per `dask.compute`, on a background thread that stays at most `prefetch_blocks` blocks ahead
of the training loop; decoding (float16 -> float32, uint16 -> int64) happens there too. The training
thread only gathers its batch's rows from blocks already in memory.

Where the decode happens is a choice (`values`). For a CPU student the reader thread decodes
(`float32`, the default), off the training thread. For a GPU student the stream hands over the
stored dtypes (`stored`: float16/bfloat16 values, uint16 class ids) and `SoftLabels.to(device)`
widens them after the copy: half the bytes cross to the device and the widening is free there,
where on this machine's CPU it costs as much as the zstd decode itself (65 MB of fp16 -> fp32 in
~60 ms, against ~50 ms to decompress them; see benchmarks/README.md, stream section). Memory is bounded by the
prefetch window plus the plan's shuffle window, whatever N is.

The threaded scheduler is the default; pass a `distributed.Client` (or a scheduler address to the
CLI) to read through a cluster.

Under DDP each rank streams its own plan (`EpochPlan(rank=..., world_size=...)`): it reads only the
blocks of its own rows, the next epoch's read-ahead included, so no block is read by two ranks. Ranks
hold whole blocks, so their batch counts can differ by up to a block's worth; with `equal_steps`
(the default) every rank stops after `equal_steps(plan)` batches, the fewest any rank has, and the
blocks holding only rows past that point are never read. With one process this changes nothing.
"""

from __future__ import annotations

import itertools
import queue
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
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
)
from softcache.trainer.plan import EpochPlan

# What `SoftLabelStream` delivers: decoded float32 / int64, or the store's own dtypes.
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
                `softcache.hashing.sampled_collate(stride)` (`collate_with_hashes` for stride 1).
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


def equal_steps(plan: EpochPlan) -> int:
    """Batches every rank takes in the plan's epoch: the fewest any rank has.

    Computed locally from the plan (`EpochPlan.batches_per_rank`), so all ranks agree without
    communicating; with one rank it is `len(plan)`. A rank with more batches drops its last ones
    (at most about a block of rows per rank and epoch; which rows changes every epoch).
    """
    return int(plan.batches_per_rank().min())


class PlanSampler:
    """A DataLoader batch sampler: an independent copy of `plan`, from its cursor to batch `stop`.

    Args:
        plan: the epoch plan, at the epoch and cursor to start from (it is not advanced).
        stop: the epoch's batch count to stop at (e.g. `equal_steps(plan)`); None: `len(plan)`.
    """

    def __init__(self, plan: EpochPlan, stop: int | None = None) -> None:
        self._plan = plan_from_state(plan.state_dict())
        self._start = plan.cursor
        self.stop = len(plan) if stop is None else min(stop, len(plan))

    def __len__(self) -> int:
        return max(self.stop - self._start, 0)

    def __iter__(self) -> Iterator[np.ndarray]:
        return itertools.islice(self._plan.batches(), max(self.stop - self._plan.cursor, 0))


class SoftLabelStream:
    """Read a store's soft labels batch by batch, in the order of an epoch plan.

    Args:
        store: an open, complete store.
        prefetch_blocks: blocks read ahead of the training loop (memory bound).
        client: a `distributed.Client` to read through; None uses Dask's threaded scheduler.
        equal_steps: stop each epoch after `equal_steps(plan)` batches, the same count on every
            DDP rank (False: all of this rank's batches). No difference with one rank.
        view_policy: for stores with views, which view of each sample an epoch uses: `cycle` or
            `random` (see `softcache.augment.choose_views`).
        values: `float32` (values float32, class ids int64, decoded on the reader thread) or
            `stored` (the store's dtypes: float16 / bfloat16 values, uint16 / int32 ids, for
            `SoftLabels.to(device)` to widen on the device).

    With stored views the plan runs over samples (`block_rows = shard_rows // views`): a shard
    holds whole samples, all their views, and each batch row is the chosen view's row.
    """

    def __init__(
        self,
        store: LogitStore,
        *,
        prefetch_blocks: int = 4,
        client: Any | None = None,
        equal_steps: bool = True,
        view_policy: str = "cycle",
        values: str = "float32",
    ) -> None:
        if prefetch_blocks < 1:
            raise ValueError(f"prefetch_blocks must be >= 1, got {prefetch_blocks}")
        if values not in VALUE_MODES:
            raise ValueError(f"values must be one of {', '.join(VALUE_MODES)}, got {values!r}")
        self.values = values
        self.store = store
        self.prefetch_blocks = prefetch_blocks
        self.client = client
        self.equal_steps = equal_steps
        self.view_policy = view_policy
        self.views = store.meta.views
        # Samples per block: the plan's unit (a shard holds `views` rows per sample).
        self.block_samples = store.meta.shard_samples
        # (plan key, reader, rows left per block) of an epoch read ahead of its `batches` call.
        self._ahead: tuple[tuple[Any, ...], _BlockReader, dict[int, int]] | None = None
        names = store.row_array_names
        # Dask chunks = shards: one task per (array, shard), never per row or per batch.
        self._arrays = {
            name: da.from_zarr(store.array(name), chunks=store.array(name).shards) for name in names
        }

    def _check_plan(self, plan: EpochPlan) -> None:
        store = self.store
        if plan.block_rows != self.block_samples:
            per_view = f" / {self.views} views" if self.views > 1 else ""
            raise ValueError(
                f"the plan's block_rows ({plan.block_rows}) must equal the store's shard_rows "
                f"({store.meta.shard_rows}{per_view}): the stream reads whole shards"
            )
        if plan.num_samples != store.meta.num_samples:
            raise DatasetMismatchError(
                f"the plan covers {plan.num_samples} samples but the store holds "
                f"{store.meta.num_samples}; the dataset is not the one the store was built from"
            )

    def stop(self, plan: EpochPlan) -> int:
        """The batch count at which this stream ends the plan's epoch (see `equal_steps`)."""
        return equal_steps(plan) if self.equal_steps else len(plan)

    def batches(self, plan: EpochPlan, *, then: EpochPlan | None = None) -> Iterator[SoftLabels]:
        """The soft labels of the plan's remaining batches in its current epoch.

        The stream follows a private copy of the plan from its current cursor, so the same plan
        can drive the DataLoader of inputs; `plan` itself is not advanced. Reading starts at
        once, not at the first `next()`, so the first blocks load while the caller fetches its
        first batch of inputs.

        Args:
            plan: the epoch plan, at the epoch and cursor to read from.
            then: the plan of the epoch that will follow. Once this epoch's last block is read,
                the stream starts reading that epoch's first blocks, so the next epoch does not
                begin by waiting for them (at most `prefetch_blocks` more blocks in memory).
        """
        self._check_plan(plan)
        reader, remaining = self._take_or_start(plan)
        iterator = self._iterate(
            PlanSampler(plan, self.stop(plan)), (plan.seed, plan.epoch), reader, remaining, then
        )
        weakref.finalize(iterator, reader.close)  # also stops a reader whose batches go unread
        return iterator

    def _take_or_start(self, plan: EpochPlan) -> tuple[_BlockReader, dict[int, int]]:
        """The reader already prefetching this plan's epoch, or a new one."""
        key = _plan_key(plan)
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            if ahead[0] == key:
                return ahead[1], ahead[2]
            ahead[1].close()
        return self._start(plan)

    def _iterate(
        self,
        batches: PlanSampler,
        seed_epoch: tuple[int, int],
        reader: _BlockReader,
        remaining: dict[int, int],
        then: EpochPlan | None,
    ) -> Iterator[SoftLabels]:
        rows = self.block_samples
        cache: dict[int, dict[str, np.ndarray]] = {}
        try:
            for batch in batches:
                block_ids = batch // rows
                for b in np.unique(block_ids):
                    while int(b) not in cache:
                        got, data = reader.next()
                        cache[got] = data
                        if then is not None and reader.delivered_all:
                            self._ahead = (_plan_key(then), *self._start(then))
                            then = None
                yield self._gather(batch, block_ids, cache, rows, seed_epoch)
                for b, n in zip(*np.unique(block_ids, return_counts=True), strict=True):
                    remaining[int(b)] -= int(n)
                    if remaining[int(b)] == 0:
                        del cache[int(b)]
        finally:
            reader.close()

    def _start(self, plan: EpochPlan) -> tuple[_BlockReader, dict[int, int]]:
        blocks = [int(b) for b in plan.block_order()]  # this rank's blocks only
        # Rows of each block still to be consumed this epoch: a block leaves memory at zero, and
        # one with none (already consumed, or only rows past the stop) is never read.
        batches = PlanSampler(plan, self.stop(plan))
        remaining = _rows_left(batches, blocks, self.block_samples)
        return _BlockReader(self, [b for b in blocks if remaining[b] > 0]), remaining

    def _gather(
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
        for name in self._arrays:
            if unique.size == 1:
                cols[name] = cache[int(unique[0])][name][offsets]
                continue
            first = cache[int(unique[0])][name]
            col = np.empty((len(batch), *first.shape[1:]), dtype=first.dtype)
            for b in unique:
                mask = block_ids == b
                col[mask] = cache[int(b)][name][offsets[mask]]
            cols[name] = col
        meta = self.store.meta
        out = SoftLabels(indices=batch, sample_hash=cols[SAMPLE_HASH], views=views)
        if VIEW_PARAMS in cols:
            out.view_params = cols[VIEW_PARAMS]
        if meta.encoding == "dense":
            out.logits = self._values(cols[LOGITS])
        else:
            out.topk_values = self._values(cols[TOPK_VALUES])
            out.topk_indices = torch.from_numpy(cols[TOPK_INDICES])
            out.lse = torch.from_numpy(cols[LSE])
        return out

    def _decode(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Storage dtypes -> what `_gather` wraps as tensors (runs on the reader thread)."""
        if self.values == "stored":
            if self.store.meta.value_dtype == "bfloat16":  # uint16 bits, as torch's bfloat16
                for name in (LOGITS, TOPK_VALUES):
                    if name in data:
                        data[name] = data[name].view(np.int16)
            return data
        for name in (LOGITS, TOPK_VALUES):
            if name in data:
                data[name] = self.store.decode_values(data[name])
        if TOPK_INDICES in data:
            data[TOPK_INDICES] = data[TOPK_INDICES].astype(np.int64)
        return data

    def _values(self, col: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(col)
        if self.values == "stored" and self.store.meta.value_dtype == "bfloat16":
            return tensor.view(torch.bfloat16)
        return tensor

    def _compute(self, blocks: list[int]) -> list[dict[str, np.ndarray]]:
        graph = [{name: arr.blocks[b] for name, arr in self._arrays.items()} for b in blocks]
        if self.client is not None:
            return self.client.gather(self.client.compute(graph))
        (results,) = dask.compute(graph, scheduler="threads")
        return list(results)


class _BlockReader:
    """A background thread reading blocks in order, at most `prefetch_blocks` ahead."""

    _DONE = object()

    def __init__(self, stream: SoftLabelStream, blocks: list[int]) -> None:
        self._expected = len(blocks)
        self._delivered = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=stream.prefetch_blocks)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(stream, blocks), name="softcache-stream", daemon=True
        )
        self._thread.start()

    def _run(self, stream: SoftLabelStream, blocks: list[int]) -> None:
        try:
            # Read a few blocks per compute so Dask decodes them in parallel.
            group = max(1, min(stream.prefetch_blocks // 2, 4))
            for i in range(0, len(blocks), group):
                ids = blocks[i : i + group]
                for b, data in zip(ids, stream._compute(ids), strict=True):
                    if not self._put((b, stream._decode(data))):
                        return
            self._put(self._DONE)
        except BaseException as exc:
            self._put(exc)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> tuple[int, dict[str, np.ndarray]]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is self._DONE:  # pragma: no cover - the plan never asks for more than it listed
            raise RuntimeError("the stream ran out of blocks before the plan did")
        self._delivered += 1
        return item

    @property
    def delivered_all(self) -> bool:
        """Whether every block this reader was given has been handed out."""
        return self._delivered == self._expected

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _rows_left(batches: PlanSampler, blocks: list[int], rows: int) -> dict[int, int]:
    """Rows of each block that the remaining batches use."""
    counts: dict[int, int] = dict.fromkeys(blocks, 0)
    for batch in batches:
        ids, n = np.unique(batch // rows, return_counts=True)
        for b, c in zip(ids, n, strict=True):
            counts[int(b)] += int(c)
    return counts


def _plan_key(plan: EpochPlan) -> tuple[Any, ...]:
    return tuple(sorted(plan.state_dict().items()))


def plan_from_state(state: dict[str, Any]) -> EpochPlan:
    """A new, independent plan at the layout, epoch and cursor of `state`."""
    plan = EpochPlan(**{k: v for k, v in state.items() if k not in ("epoch", "cursor")})
    plan.load_state_dict(state)
    return plan
