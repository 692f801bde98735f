"""The soft-label stream: a store's soft labels, in epoch-plan order, read a bounded number ahead.

One engine for every layout: what differs between a row store and a token store (what a block is,
how it is decoded, how a batch's rows are gathered) is a source object (`row_labels.RowBlocks`,
`token_labels.TokenBlocks`) the engine calls; reading ahead, the memory bound, the epoch boundary and
DDP are written once, here.

Reading random rows from a chunked store decompresses a whole chunk per row; computing a graph per
batch pays scheduling overhead per batch. Both are orders of magnitude slower than what the student
needs. So the stream works in three threads:

1. a reader reads whole storage blocks (shards) in `EpochPlan.block_order`, at most
   `prefetch_blocks` ahead, a shuffle window's blocks at a time (the window's first batch needs
   all of them): in this process one concurrent `LogitStore.read_many` of every array of those
   blocks, spread over every core (a local store's chunks decoded straight from its shard files
   by `softcache.store.shard_files`, otherwise by zarr's codec pipeline, zarrs where installed),
   a row store's group into one buffer per array that is reused once its blocks are consumed;
   or Dask tasks on a cluster when a `distributed.Client` is given (or a scheduler address to
   the CLI);
2. an assembler gathers each batch's rows from the blocks in memory and widens them (fp16 -> fp32,
   uint16 -> int64), at most `assemble_ahead` runs of `HANDOFF_RUN` batches ahead; with
   `assemble_ahead=0` the thread that iterates does it (the trainer's batch process, already
   off the training thread);
3. the training thread takes finished batches from a queue, a run at a time: the stream costs
   it a queue `get` per run.

Where the widening happens is a choice (`values`). For a CPU student the assembler widens
(`float32`, the default). For a GPU student the stream hands over the stored dtypes (`stored`:
float16/bfloat16 values, uint16 class ids) and `SoftLabels.to(device)` widens them after the copy:
half the bytes cross to the device and the widening is free there. Memory is bounded by the
prefetch window plus the plan's shuffle window, whatever N is.

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
from collections.abc import Iterator, Sequence
from typing import Any

import dask.array as da
import numpy as np
import torch

from softcache.errors import DatasetMismatchError
from softcache.store import LogitStore
from softcache.trainer.ahead import Ahead, put_unless_stopped
from softcache.trainer.plan import EpochPlan
from softcache.trainer.row_labels import VALUE_MODES, RowBlocks, SoftLabels
from softcache.trainer.token_labels import TokenBlocks, TokenLabels


def equal_steps(plan: EpochPlan) -> int:
    """Batches every rank takes in the plan's epoch: the fewest any rank has.

    Computed locally from the plan (`EpochPlan.batches_per_rank`), so all ranks agree without
    communicating; with one rank it is `len(plan)`. A rank with more batches drops its last ones
    (at most about a block of rows per rank and epoch; which rows changes every epoch).
    """
    return int(plan.batches_per_rank().min())


# Batches the stream's assembler thread hands over at a time.
HANDOFF_RUN = 4


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
        store: an open, complete store (rows or tokens).
        prefetch_blocks: blocks read ahead of the training loop (memory bound).
        client: a `distributed.Client` to read through (Dask tasks on its cluster); None reads
            in this process.
        equal_steps: stop each epoch after `equal_steps(plan)` batches, the same count on every
            DDP rank (False: all of this rank's batches). No difference with one rank.
        view_policy: for stores with views, which view of each sample an epoch uses: `cycle` or
            `random` (see `softcache.data.augment.choose_views`).
        values: row stores: `float32` (values float32, class ids int64, decoded on the reader
            thread) or `stored` (the store's dtypes: float16 / bfloat16 values, uint16 / int32
            ids, for `SoftLabels.to(device)` to widen on the device). Token stores always
            deliver `TokenCodec.decode`'s tensors.
        assemble_ahead: runs of `HANDOFF_RUN` batches gathered ahead of the training loop, on a
            thread of their own: the training thread only takes finished batches from a queue,
            a run at a time (one thread wake-up per run: handing batches over one by one cost
            the stream benchmark a tenth of its time on two cores). 0: batches are gathered on
            the thread that iterates, for a caller already off the training thread (the
            trainer's batch process): one thread and every handoff fewer.
        pin_memory: deliver row batches in pinned host memory (pinned on the assembler thread),
            for non-blocking copies to a GPU; ignored where CUDA is not available.

    A row store's plan runs over samples in blocks of one shard (`block_rows =
    store.meta.shard_samples`: a shard holds whole samples, all their views, and each batch row
    is the chosen view's row); it yields `SoftLabels`. A token store's plan runs over samples in
    blocks of any size (`token_labels.block_samples_for` picks one); it yields `TokenLabels`.
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
        assemble_ahead: int = 2,
        pin_memory: bool = False,
    ) -> None:
        if prefetch_blocks < 1:
            raise ValueError(f"prefetch_blocks must be >= 1, got {prefetch_blocks}")
        if assemble_ahead < 0:
            raise ValueError(f"assemble_ahead must be >= 0, got {assemble_ahead}")
        if values not in VALUE_MODES:
            raise ValueError(f"values must be one of {', '.join(VALUE_MODES)}, got {values!r}")
        self.values = values
        self.store = store
        self.prefetch_blocks = prefetch_blocks
        self.client = client
        self.equal_steps = equal_steps
        self.view_policy = view_policy
        # (plan key, reader, rows left per block) of an epoch read ahead of its `batches` call.
        self._ahead: tuple[tuple[Any, ...], _BlockReader, dict[int, int]] | None = None
        self._ahead_lock = threading.Lock()
        self.assemble_ahead = assemble_ahead
        # Pinned batches copy to a GPU asynchronously; only a CUDA build can pin.
        self.pin_memory = pin_memory and torch.cuda.is_available()
        # For a cluster: Dask chunks = shards, one task per (array, shard), never per row or batch.
        self._dask = {}
        if client is not None:
            for name in store.row_array_names:
                arr = store.array(name)
                self._dask[name] = da.from_zarr(arr, chunks=arr.shards)
        self.source: RowBlocks | TokenBlocks = (
            TokenBlocks(store)
            if store.meta.tokens
            else RowBlocks(store, view_policy=view_policy, values=values)
        )

    def _check_plan(self, plan: EpochPlan) -> None:
        self.source.check_block_rows(plan.block_rows)
        if plan.num_samples != self.store.meta.num_samples:
            raise DatasetMismatchError(
                f"the plan covers {plan.num_samples} samples but the store holds "
                f"{self.store.meta.num_samples}; the dataset is not the one the store was built "
                "from"
            )

    def stop(self, plan: EpochPlan) -> int:
        """The batch count at which this stream ends the plan's epoch (see `equal_steps`)."""
        return equal_steps(plan) if self.equal_steps else len(plan)

    def batches(
        self, plan: EpochPlan, *, then: EpochPlan | None = None
    ) -> Iterator[SoftLabels | TokenLabels]:
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
        if then is not None:
            self._check_plan(then)
        reader, remaining = self._take_or_start(plan)
        batches = self._iterate(
            PlanSampler(plan, self.stop(plan)),
            plan.block_rows,
            (plan.seed, plan.epoch),
            reader,
            remaining,
            then,
        )
        # Also stops the reader of an iterator whose batches go unread.
        if self.assemble_ahead == 0:
            weakref.finalize(batches, reader.close)
            return batches
        assembler = Ahead(_runs(batches, HANDOFF_RUN), depth=self.assemble_ahead)
        iterator = _flat(assembler.results())
        weakref.finalize(iterator, assembler.close)
        weakref.finalize(iterator, reader.close)
        return iterator

    def _take_or_start(self, plan: EpochPlan) -> tuple[_BlockReader, dict[int, int]]:
        """The reader already prefetching this plan's epoch, or a new one."""
        key = _plan_key(plan)
        with self._ahead_lock:  # the assembler thread of the previous epoch may be setting it
            ahead, self._ahead = self._ahead, None
        if ahead is not None:
            if ahead[0] == key:
                return ahead[1], ahead[2]
            ahead[1].close()
        return self._start(plan)

    def _iterate(
        self,
        batches: PlanSampler,
        rows: int,
        seed_epoch: tuple[int, int],
        reader: _BlockReader,
        remaining: dict[int, int],
        then: EpochPlan | None,
    ) -> Iterator[SoftLabels | TokenLabels]:
        cache: dict[int, Any] = {}
        try:
            for batch in batches:
                block_ids = batch // rows
                used, counts = np.unique(block_ids, return_counts=True)
                for b in used:
                    while int(b) not in cache:
                        got, data = reader.next()
                        cache[got] = data
                        if then is not None and reader.delivered_all:
                            with self._ahead_lock:
                                self._ahead = (_plan_key(then), *self._start(then))
                            then = None
                out = self.source.gather(batch, block_ids, cache, rows, seed_epoch)
                yield out.pin_memory() if self.pin_memory and isinstance(out, SoftLabels) else out
                for b, n in zip(used, counts, strict=True):
                    remaining[int(b)] -= int(n)
                    if remaining[int(b)] == 0:
                        del cache[int(b)]
        finally:
            reader.close()

    def _start(self, plan: EpochPlan) -> tuple[_BlockReader, dict[int, int]]:
        blocks = [int(b) for b in plan.block_order()]  # this rank's blocks only
        # Rows of each block still to be consumed this epoch: a block leaves memory at zero, and
        # one with none (already consumed, or only rows past the stop) is never read.
        counts = plan.rows_per_block(self.stop(plan))
        remaining = dict(zip(blocks, (int(n) for n in counts), strict=True))
        todo = [b for b in blocks if remaining[b] > 0]
        # Read a window's blocks together: its first batch needs every one of them (rows are
        # shuffled across the window), and reading them at once overlaps their decoding.
        group = min(plan.window_blocks, self.prefetch_blocks)
        return _BlockReader(self, todo, plan.block_rows, group), remaining

    def _compute(self, blocks: list[int], block_rows: int) -> list[Any]:
        """Read and decode `blocks`: each one contiguous row range of every per-row array.

        With a `distributed` client the reads are Dask tasks on the cluster. In this process every
        array of every block is read in one concurrent `LogitStore.read_many` (Dask's threaded
        scheduler would only add its overhead to reads already spread over every core), by the
        source's `read_group`: a row store's blocks land one after another in one buffer per
        array, so that a batch is gathered from them in one `take` per array.
        """
        bounds = [self.source.rows(b, block_rows) for b in blocks]
        results: Sequence[dict[str, np.ndarray]]
        if self.client is not None:
            graph = [{n: d[r0:r1] for n, d in self._dask.items()} for r0, r1 in bounds]
            computed = self.client.gather(self.client.compute(graph))
            results = [{k: np.asarray(v) for k, v in r.items()} for r in computed]
        else:
            results = self.source.read_group(bounds)
        return [self.source.decode(r) for r in results]


class _BlockReader:
    """A background thread reading blocks in order, at most `prefetch_blocks` ahead."""

    _DONE = object()

    def __init__(
        self, stream: SoftLabelStream, blocks: list[int], block_rows: int, group: int
    ) -> None:
        self._expected = len(blocks)
        self._delivered = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=stream.prefetch_blocks)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(stream, blocks, block_rows, group),
            name="softcache-stream",
            daemon=True,
        )
        self._thread.start()

    def _run(self, stream: SoftLabelStream, blocks: list[int], block_rows: int, group: int) -> None:
        try:
            for i in range(0, len(blocks), group):
                ids = blocks[i : i + group]
                for b, data in zip(ids, stream._compute(ids, block_rows), strict=True):
                    if not self._put((b, data)):
                        return
            self._put(self._DONE)
        except BaseException as exc:
            self._put(exc)

    def _put(self, item: Any) -> bool:
        return put_unless_stopped(self._queue, item, self._stop)

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


def _runs(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """`items` in lists of `size` (the last may be shorter); an error comes after the items
    before it, so it still reaches the consumer at the item where it happened."""
    run: list[Any] = []
    try:
        for item in items:
            run.append(item)
            if len(run) == size:
                full, run = run, []
                yield full
    except Exception:  # not GeneratorExit: a closed generator yields nothing more
        if run:
            yield run
        raise
    if run:
        yield run


def _flat(runs: Iterator[list[Any]]) -> Iterator[Any]:
    for run in runs:
        yield from run


def _plan_key(plan: EpochPlan) -> tuple[Any, ...]:
    return tuple(sorted(plan.state_dict().items()))


def plan_from_state(state: dict[str, Any]) -> EpochPlan:
    """A new, independent plan at the layout, epoch and cursor of `state`."""
    plan = EpochPlan(**{k: v for k, v in state.items() if k not in ("epoch", "cursor")})
    plan.load_state_dict(state)
    return plan


__all__ = [
    "PlanSampler",
    "SoftLabelStream",
    "SoftLabels",
    "TokenLabels",
    "equal_steps",
    "plan_from_state",
]
