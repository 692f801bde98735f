"""The soft-label stream: a store's soft labels, in epoch-plan order, read a bounded number ahead.

One engine for every layout: what differs between a row store and a token store (what a block is,
how a group of blocks is read and decoded, how a batch is taken from it) is a source object
(`row_labels.RowBlocks`, `token_labels.TokenBlocks`) the engine calls; reading ahead, the memory
bound, the epoch boundary and DDP are written once, here.

Reading random rows from a chunked store decompresses a whole chunk per row; computing a graph per
batch pays scheduling overhead per batch. Both are orders of magnitude slower than what the student
needs. So the stream works in three threads:

1. a reader reads whole storage blocks (shards) in `EpochPlan.block_order`, a shuffle window's
   blocks at a time (the window's first batch needs all of them), at most `prefetch_blocks`
   ahead. It knows the order in which the plan will consume the window's rows
   (`EpochPlan.row_runs`), and the source puts them in that order as they are read: a row
   store's chunks are decoded on every core and each chunk's rows (the chosen view's, widened
   where `values` asks) scattered straight to their places in one reused buffer per array
   (`LogitStore.read_gather`; zarr's codec pipeline, then a take, for stores that are not local
   directories), so a batch is a slice of that buffer; a token store's blocks are decoded
   whole. With a `distributed.Client` (or a scheduler address to the CLI) the blocks are read
   by Dask tasks on the cluster and put in order here;
2. an assembler takes each batch from the groups in memory (a slice, or the runs of two groups
   for a batch that straddles windows; tokens: a gather), at most `assemble_ahead` runs of
   `HANDOFF_RUN` batches ahead; with `assemble_ahead=0` the thread that iterates does it (the
   trainer's batch process, already off the training thread);
3. the training thread takes finished batches from a queue, a run at a time: the stream costs
   it a queue `get` per run.

Where the widening happens is a choice (`values`). For a CPU student the reader widens as it
places the rows, on every core (`float32`, the default). For a GPU student the stream hands over
the stored dtypes (`stored`: float16/bfloat16 values, uint16 class ids) and `SoftLabels.to(device)`
widens them after the copy: half the bytes cross to the device and the widening is free there.

A batch of soft labels is a view of the stream's buffers (no copy): a buffer is read into again
only once no batch, view or tensor of it is left (`row_labels._GroupBuffers`), so a caller may keep
batches as long as it likes, at the cost of fresh buffers. Memory is bounded by the prefetch window
plus the plan's shuffle window, whatever N is.

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
from typing import Any

import dask.array as da
import numpy as np
import torch

from softcache.errors import DatasetMismatchError
from softcache.store import LogitStore
from softcache.trainer.ahead import Ahead, put_unless_stopped
from softcache.trainer.plan import EpochPlan
from softcache.trainer.row_labels import VALUE_MODES, RowBlocks, SoftLabels, TargetMaker
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
        values: row stores: `float32` (values float32, class ids int64, widened as the reader
            places them) or `stored` (the store's dtypes: float16 / bfloat16 values, uint16 / int32
            ids, for `SoftLabels.to(device)` to widen on the device). Token stores always
            deliver `TokenCodec.decode`'s tensors.
        assemble_ahead: runs of `HANDOFF_RUN` batches taken ahead of the training loop, on a
            thread of their own: the training thread only takes finished batches from a queue,
            a run at a time (one thread wake-up per run: handing batches over one by one cost
            the stream benchmark a tenth of its time on two cores). 0: batches are taken on
            the thread that iterates, for a caller already off the training thread (the
            trainer's batch process): one thread and every handoff fewer.
        pin_memory: deliver row batches in pinned host memory (pinned on the assembler thread),
            for non-blocking copies to a GPU; ignored where CUDA is not available.
        targets: top-k row stores: makes the teacher's side of the loss for a read group's
            rows (`distill.store_teacher_targets(..., rows=True)`), made once per group on the
            reader's thread and sliced into each batch's `SoftLabels.targets` (see
            `row_labels.RowBlocks`); None, or a dense store: batches come without targets. Not
            for token stores.

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
        targets: TargetMaker | None = None,
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
        # (plan key, reader) of an epoch read ahead of its `batches` call.
        self._ahead: tuple[tuple[Any, ...], _BlockReader] | None = None
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
        if targets is not None and store.meta.tokens:
            raise ValueError(
                f"targets: {store.location} is a token store; only a row store's batches carry "
                "teacher targets (a token batch's loss takes its TokenLabels as they are)"
            )
        self.source: RowBlocks | TokenBlocks = (
            TokenBlocks(store)
            if store.meta.tokens
            else RowBlocks(store, view_policy=view_policy, values=values, targets=targets)
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
        reader = self._take_or_start(plan)
        batches = self._iterate(
            PlanSampler(plan, self.stop(plan)),
            plan.block_rows,
            (plan.seed, plan.epoch),
            reader,
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

    def _take_or_start(self, plan: EpochPlan) -> _BlockReader:
        """The reader already prefetching this plan's epoch, or a new one."""
        key = _plan_key(plan)
        with self._ahead_lock:  # the assembler thread of the previous epoch may be setting it
            ahead, self._ahead = self._ahead, None
        if ahead is not None:
            if ahead[0] == key:
                return ahead[1]
            ahead[1].close()
        return self._start(plan)

    def _iterate(
        self,
        batches: PlanSampler,
        rows: int,
        seed_epoch: tuple[int, int],
        reader: _BlockReader,
        then: EpochPlan | None,
    ) -> Iterator[SoftLabels | TokenLabels]:
        cache: dict[int, Any] = {}  # group -> its rows, as the source read them
        taken = np.zeros(len(reader.groups), dtype=np.int64)  # rows of each group consumed
        try:
            for batch in batches:
                block_ids = batch // rows
                groups = reader.group_of[block_ids]
                used, counts = _groups_used(groups)
                for g in used:
                    while int(g) not in cache:
                        got, data = reader.next()
                        cache[got] = data
                        if then is not None and reader.delivered_all:
                            with self._ahead_lock:
                                self._ahead = (_plan_key(then), self._start(then))
                            then = None
                parts = []
                for g, n in zip(used.tolist(), counts.tolist(), strict=True):
                    where = None if len(used) == 1 else np.flatnonzero(groups == g)
                    parts.append((cache[g], where, int(taken[g]), int(taken[g]) + n))
                    taken[g] += n
                out = self.source.take(batch, block_ids, parts, rows, seed_epoch)
                del parts
                for g in used.tolist():
                    if taken[g] == reader.group_rows[g]:
                        del cache[g]
                yield out.pin_memory() if self.pin_memory and isinstance(out, SoftLabels) else out
        finally:
            reader.close()

    def _start(self, plan: EpochPlan) -> _BlockReader:
        blocks = [int(b) for b in plan.block_order()]  # this rank's blocks only
        # Rows of each block the epoch consumes from its cursor to its stop: a block with none
        # (already consumed, or only rows past the stop) is never read.
        counts = plan.rows_per_block(self.stop(plan))
        todo = [b for b, n in zip(blocks, counts.tolist(), strict=True) if n > 0]
        # Read a window's blocks together: its first batch needs every one of them (rows are
        # shuffled across the window), and reading them at once overlaps their decoding.
        group = min(plan.window_blocks, self.prefetch_blocks)
        groups = [todo[i : i + group] for i in range(0, len(todo), group)]
        return _BlockReader(self, plan, groups, dict(zip(blocks, counts.tolist(), strict=True)))

    def _compute(
        self,
        blocks: list[int],
        block_rows: int,
        samples: np.ndarray | None = None,
        seed_epoch: tuple[int, int] = (0, 0),
    ) -> Any:
        """Read a group of blocks: each one contiguous row range of every per-row array.

        With a `distributed` client the reads are Dask tasks on the cluster. In this process
        every array of every block is read in one concurrent read, spread over every core (Dask's
        threaded scheduler would only add its overhead to reads already spread over every core).
        The source (`read_group`) puts what was read in the order the plan consumes `samples`
        (rows) or keeps it by block (tokens).

        Args:
            blocks: the group's block ids.
            block_rows: the plan's samples per block.
            samples: the group's plan rows, in the order they will be consumed; None: every
                sample of the blocks, block after block.
            seed_epoch: the plan's seed and epoch.
        """
        bounds = [self.source.rows(b, block_rows) for b in blocks]
        if samples is None:
            num_samples = self.store.meta.num_samples
            samples = np.concatenate(
                [np.arange(b * block_rows, min((b + 1) * block_rows, num_samples)) for b in blocks]
            )
        computed = None
        if self.client is not None:
            graph = [{n: d[r0:r1] for n, d in self._dask.items()} for r0, r1 in bounds]
            got = self.client.gather(self.client.compute(graph))
            computed = [{k: np.asarray(v) for k, v in r.items()} for r in got]
        return self.source.read_group(bounds, blocks, samples, block_rows, seed_epoch, computed)


class StreamClosedError(RuntimeError):
    """A batch was asked of a stream whose epoch was closed."""


# Seconds between checks, while waiting for a group, that the reader was not closed.
_CLOSED_POLL = 0.1


class _BlockReader:
    """A background thread reading groups of blocks in order, a bounded number ahead.

    It draws the epoch's rows in the order the batches will consume them from its own copy of
    the plan (`EpochPlan.row_runs`) and hands each group over read in that order.

    Attributes:
        groups: the groups of block ids, in reading order.
        group_of: block id -> its group's index (-1: not read this epoch).
        group_rows: rows the epoch consumes from each group.
    """

    _DONE = object()

    def __init__(
        self,
        stream: SoftLabelStream,
        plan: EpochPlan,
        groups: list[list[int]],
        rows_per_block: dict[int, int],
    ) -> None:
        self.groups = groups
        self.group_of = np.full(plan.num_blocks, -1, dtype=np.int64)
        for g, ids in enumerate(groups):
            self.group_of[ids] = g
        self.group_rows = [sum(rows_per_block[b] for b in ids) for ids in groups]
        self._delivered = 0
        # Groups, not blocks, go through the queue: as many as `prefetch_blocks` blocks make.
        group = max((len(ids) for ids in groups), default=1)
        depth = max(1, stream.prefetch_blocks // group)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(stream, plan_from_state(plan.state_dict()).row_runs(stream.stop(plan)),
                  plan.block_rows, (plan.seed, plan.epoch)),
            name="softcache-stream",
            daemon=True,
        )  # fmt: skip
        self._thread.start()

    def _run(
        self,
        stream: SoftLabelStream,
        runs: Iterator[np.ndarray],
        block_rows: int,
        seed_epoch: tuple[int, int],
    ) -> None:
        try:
            orders = _consumption_orders(runs, block_rows, self.group_of, self.group_rows)
            samples = next(orders, None)
            for g, ids in enumerate(self.groups):
                data = stream._compute(ids, block_rows, samples, seed_epoch)
                # The next group's order now, while the consumer still waits for this group:
                # beside its batches this Python would wait for the GIL.
                samples = next(orders, None)
                if not self._put((g, data)):
                    return
                del data
            self._put(self._DONE)
        except BaseException as exc:
            self._put(exc)

    def _put(self, item: Any) -> bool:
        return put_unless_stopped(self._queue, item, self._stop)

    def next(self) -> tuple[int, Any]:
        while True:
            try:
                item = self._queue.get(timeout=_CLOSED_POLL)
                break
            except queue.Empty:
                # Closed (the consumer's iterator was dropped before the assembler thread's):
                # no group is coming, and that thread must not wait for one forever.
                if self._stop.is_set():
                    raise StreamClosedError("the soft-label stream was closed") from None
        if isinstance(item, BaseException):
            raise item
        if item is self._DONE:  # pragma: no cover - the plan never asks for more than it listed
            raise RuntimeError("the stream ran out of blocks before the plan did")
        self._delivered += 1
        return item

    @property
    def delivered_all(self) -> bool:
        """Whether every group this reader was given has been handed out."""
        return self._delivered == len(self.groups)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _consumption_orders(
    runs: Iterator[np.ndarray],
    block_rows: int,
    group_of: np.ndarray,
    group_rows: list[int],
) -> Iterator[np.ndarray]:
    """Each group's plan rows in the order the batches consume them, group after group.

    Args:
        runs: the epoch's rows in consumption order (`EpochPlan.row_runs`), drawn only as far
            as the next group needs: rows of a later group wait for it.
        block_rows: the plan's rows per block.
        group_of: block id -> group.
        group_rows: rows the epoch consumes from each group.
    """
    pending: dict[int, list[np.ndarray]] = {}
    seen = np.zeros(len(group_rows), dtype=np.int64)
    for g, want in enumerate(group_rows):
        while seen[g] < want:
            run = next(runs)
            groups = group_of[run // block_rows]
            used, counts = _groups_used(groups)
            for h, n in zip(used.tolist(), counts.tolist(), strict=True):
                pending.setdefault(h, []).append(run if len(used) == 1 else run[groups == h])
                seen[h] += n
        parts = pending.pop(g, [])
        yield np.concatenate(parts) if len(parts) != 1 else parts[0]


def _groups_used(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(groups, return_counts=True)`, at the cost of a comparison for the usual batch,
    whose rows all come from one group (`unique` sorts: a tenth of the stream's own time)."""
    if groups.size and groups[0] == groups[-1] and (groups == groups[0]).all():
        return groups[:1], np.array([groups.size])
    return np.unique(groups, return_counts=True)


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
