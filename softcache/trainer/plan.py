"""The epoch plan: the one place that decides which rows a training step sees, and in what order.

Inputs (through a DataLoader with ``batch_sampler=plan``) and soft labels (through the store's
stream) both follow the same plan, so they are aligned by construction, and a run resumes mid-epoch
from ``(seed, epoch, cursor)`` alone.

Why blocks and windows rather than a global shuffle: the store is chunked, and the unit a reader can
fetch cheaply is a whole storage block (a shard, typically thousands of rows). Reading shards
sequentially streams at disk or network bandwidth; reading rows in a random order touches a
different shard for almost every row and decompresses all of it to use one row, which is orders of
magnitude slower. So the plan shuffles at two levels:

1. Each epoch, a permutation of *all* storage blocks, from ``np.random.default_rng([seed, epoch])``
   (identical on every rank). Rank ``r`` of ``world_size`` takes ``perm[r::world_size]``: ranks are
   disjoint and together cover every row once.
2. A rank's blocks are grouped into consecutive windows of ``window_blocks`` blocks, and the rows
   inside each window are shuffled (``np.random.default_rng([seed, epoch, rank, window])``).

Batches are consecutive ``batch_size`` slices of the concatenated windows (a batch may straddle two
windows). A streaming reader therefore only ever needs the blocks of the current window and the
next, loaded in `EpochPlan.block_order` order: memory stays bounded at about
``2 * window_blocks * block_rows`` rows however large the store. The trade-off is randomness: rows
within a batch come from at most two windows rather than from the whole dataset, and a larger
``window_blocks`` buys more mixing for more memory.

The one exception to "current or next window" is the short final storage block (when
``num_samples`` is not a multiple of ``block_rows``): the window that holds it is shorter, and a
batch larger than that window can reach one window further.

Note on DDP: ranks hold whole blocks, so their row counts (and `len`) can differ by up to one
block; `EpochPlan.batches_per_rank` lets every rank compute the smallest count without
communicating, so a training loop can stop all ranks at the same step.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

import numpy as np

from softcache.errors import ConfigError

__all__ = ["EpochPlan"]

_LAYOUT_KEYS = (
    "num_samples",
    "block_rows",
    "batch_size",
    "seed",
    "window_blocks",
    "rank",
    "world_size",
    "drop_last",
)


class EpochPlan:
    """A seeded, resumable, rank-aware order of row indices for one epoch at a time.

    Usable directly (``for rows in plan: ...``) or as a DataLoader batch sampler
    (``DataLoader(dataset, batch_sampler=plan)``). Call `set_epoch` at the start of each epoch, as
    with ``DistributedSampler``; iterating an exhausted epoch yields nothing.

    The cursor counts the batches this plan has *handed out*. A DataLoader with worker processes
    draws batches ahead of the training step, so when checkpointing through a DataLoader save the
    number of steps the model actually took: ``state = plan.state_dict(); state["cursor"] = steps``.

    Args:
        num_samples: rows in the store (``N >= 0``).
        block_rows: rows per storage block (the store's shard length along the sample axis).
        batch_size: rows per batch; at most ``window_blocks * block_rows``.
        seed: base seed (``>= 0``), the same on every rank.
        epoch: the epoch to start in (``>= 0``).
        window_blocks: blocks per shuffle window.
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: number of ranks sharing the epoch.
        drop_last: drop this rank's final short batch.

    Raises:
        ValueError: if an argument is out of range; the message says which and what to do.
    """

    def __init__(
        self,
        *,
        num_samples: int,
        block_rows: int,
        batch_size: int,
        seed: int = 0,
        epoch: int = 0,
        window_blocks: int = 4,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        self.num_samples = _check_int("num_samples", num_samples, 0, "the store's row count")
        self.block_rows = _check_int("block_rows", block_rows, 1, "the store's shard length")
        self.batch_size = _check_int("batch_size", batch_size, 1, "rows per training step")
        self.seed = _check_int("seed", seed, 0, "any non-negative integer")
        self.window_blocks = _check_int("window_blocks", window_blocks, 1, "e.g. 4")
        self.world_size = _check_int("world_size", world_size, 1, "the number of ranks")
        self.rank = _check_int("rank", rank, 0, "this process's rank")
        if self.rank >= self.world_size:
            raise ValueError(
                f"rank must be in [0, world_size={self.world_size}), got {self.rank}; "
                "pass the process's rank and the total number of ranks"
            )
        if not isinstance(drop_last, (bool, np.bool_)):
            raise ValueError(f"drop_last must be a bool, got {drop_last!r}")
        self.drop_last = bool(drop_last)
        window_rows = self.window_blocks * self.block_rows
        if self.batch_size > window_rows:
            raise ValueError(
                f"batch_size={self.batch_size} exceeds a shuffle window of window_blocks="
                f"{self.window_blocks} x block_rows={self.block_rows} = {window_rows} rows, so a "
                "batch would span many windows; raise window_blocks to at least "
                f"{-(-self.batch_size // self.block_rows)} or lower batch_size"
            )
        self.num_blocks = -(-self.num_samples // self.block_rows)
        self._epoch = _check_int("epoch", epoch, 0, "the epoch number")
        self._cursor = 0
        self._generation = 0  # bumped by set_epoch / load_state_dict to stop stale iterators
        self._layout_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    @property
    def epoch(self) -> int:
        """The current epoch."""
        return self._epoch

    @property
    def cursor(self) -> int:
        """Batches of this epoch already handed out (the next batch's index)."""
        return self._cursor

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` (``>= 0``) and rewind the cursor to its first batch."""
        self._epoch = _check_int("epoch", epoch, 0, "the epoch number")
        self._cursor = 0
        self._generation += 1

    def block_order(self) -> np.ndarray:
        """This rank's storage block ids for the epoch, in the order their rows are first needed.

        Returns:
            ``(num_rank_blocks,)`` int64; block ``b`` holds rows
            ``[b * block_rows, min((b + 1) * block_rows, num_samples))``.
        """
        return self._layout()[0]

    def num_rows(self) -> int:
        """Rows this rank sees this epoch (before ``drop_last``)."""
        window_ends = self._layout()[2]
        return int(window_ends[-1]) if window_ends.size else 0

    def __len__(self) -> int:
        """Batches in this rank's epoch, counted from the start (not the ones remaining)."""
        return self._num_batches(self.num_rows())

    def batches_per_rank(self) -> np.ndarray:
        """``len()`` of every rank for this epoch, computed locally (no communication).

        Returns:
            ``(world_size,)`` int64. Under DDP, stopping every rank after ``min()`` of these
            batches keeps collective operations in step.
        """
        lengths = self._block_lengths(self._permutation())
        rows = np.array([lengths[r :: self.world_size].sum() for r in range(self.world_size)])
        if self.drop_last:
            return rows // self.batch_size
        return -(-rows // self.batch_size)

    def batches(self) -> Iterator[np.ndarray]:
        """Yield this rank's remaining batches of the epoch, from the cursor on.

        The cursor advances as each batch is yielded, so breaking out of the loop leaves it at the
        number of batches handed out, and a later call continues from there. An iterator stops
        early if `set_epoch` or `load_state_dict` is called while it is live.

        Yields:
            ``(batch_size,)`` int64 row indices (the last batch may be shorter unless
            ``drop_last``).
        """
        generation = self._generation
        order, _, window_ends = self._layout()
        num_batches = len(self)
        total = self.num_rows()
        window_starts = window_ends - self._window_lengths(order)
        windows: dict[int, np.ndarray] = {}
        while self._cursor < num_batches and self._generation == generation:
            start = self._cursor * self.batch_size
            stop = min(start + self.batch_size, total)
            first = int(np.searchsorted(window_ends, start, side="right"))
            last = int(np.searchsorted(window_ends, stop - 1, side="right"))
            pieces = []
            for w in range(first, last + 1):
                if w not in windows:
                    windows[w] = self._window_rows(order, w)
                offset = int(window_starts[w])
                pieces.append(windows[w][max(start - offset, 0) : stop - offset])
            for w in [w for w in windows if w < last]:
                del windows[w]
            self._cursor += 1
            yield np.concatenate(pieces)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.batches()

    def row_runs(self, stop: int | None = None) -> Iterator[np.ndarray]:
        """This rank's rows from the cursor to batch `stop`, in the order its batches hold them.

        The concatenation of what `batches` would yield (without `stop`'s later batches), a
        window (or the part of one inside the range) at a time; the cursor does not move. A
        reader that places rows in the order they will be consumed draws them from here, a
        window for the cost of a batch.

        Args:
            stop: the batch count to stop at (None: `len(self)`).

        Yields:
            int64 row indices, one array per window.
        """
        order, _, window_ends = self._layout()
        num_batches = len(self) if stop is None else min(stop, len(self))
        start = self._cursor * self.batch_size
        end = min(num_batches * self.batch_size, self.num_rows())
        window_starts = window_ends - self._window_lengths(order)
        for w, (lo, hi) in enumerate(
            zip(window_starts.tolist(), window_ends.tolist(), strict=True)
        ):
            first, last = max(start, lo), min(end, hi)
            if first < last:
                yield self._window_rows(order, w)[first - lo : last - lo]

    def rows_per_block(self, stop: int | None = None) -> np.ndarray:
        """How many rows of each of this rank's blocks the batches from the cursor to `stop` use.

        Computed from the layout, not by drawing the batches: only a window cut by the cursor or
        by `stop` is shuffled to see which of its rows fall inside (a stream calls this at the
        start of every epoch, before its first read).

        Args:
            stop: the batch count to stop at (None: `len(self)`).

        Returns:
            ``(num_rank_blocks,)`` int64, aligned with `block_order`.
        """
        order, lengths, window_ends = self._layout()
        num_batches = len(self) if stop is None else min(stop, len(self))
        start = self._cursor * self.batch_size
        end = min(num_batches * self.batch_size, self.num_rows())
        counts = np.zeros(order.size, dtype=np.int64)
        window_starts = window_ends - self._window_lengths(order)
        for w, (lo, hi) in enumerate(zip(window_starts, window_ends, strict=True)):
            first, last = max(start, int(lo)), min(end, int(hi))
            if first >= last:
                continue
            blocks = slice(w * self.window_blocks, (w + 1) * self.window_blocks)
            if first == lo and last == hi:
                counts[blocks] = lengths[blocks]
                continue
            rows = self._window_rows(order, w)[first - int(lo) : last - int(lo)]
            used = np.bincount(rows // self.block_rows, minlength=self.num_blocks)
            counts[blocks] = used[order[blocks]]
        return counts

    def state_dict(self) -> dict[str, Any]:
        """The plan's layout and position, as plain JSON-able data."""
        state: dict[str, Any] = {key: getattr(self, key) for key in _LAYOUT_KEYS}
        state["epoch"] = self._epoch
        state["cursor"] = self._cursor
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the epoch and cursor of ``state``.

        Raises:
            ConfigError: (a ValueError) if ``state`` lacks a key, or its layout (rows, block and
                batch sizes, seed, window, ranks, ``drop_last``) differs from this plan's: resuming
                with another layout would silently feed the student different rows than the
                checkpoint expects.
        """
        missing = [key for key in (*_LAYOUT_KEYS, "epoch", "cursor") if key not in state]
        if missing:
            raise ConfigError(f"plan state is missing {missing}; pass a dict from state_dict()")
        changed = {
            key: (state[key], getattr(self, key))
            for key in _LAYOUT_KEYS
            if state[key] != getattr(self, key)
        }
        if changed:
            details = ", ".join(
                f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items()
            )
            raise ConfigError(
                f"cannot resume: the epoch plan's layout changed ({details}); resuming would "
                "misalign data with the checkpoint. Restore the saved settings, or start a new "
                "run instead of resuming"
            )
        epoch = _check_int("epoch", state["epoch"], 0, "a saved epoch")
        cursor = _check_int("cursor", state["cursor"], 0, "a saved batch count")
        self.set_epoch(epoch)
        if cursor > len(self):
            raise ConfigError(
                f"saved cursor {cursor} is past the end of epoch {epoch} ({len(self)} batches); "
                "the state does not belong to this plan"
            )
        self._cursor = cursor

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.state_dict().items())
        return f"EpochPlan({fields})"

    def _num_batches(self, rows: int) -> int:
        if self.drop_last:
            return rows // self.batch_size
        return -(-rows // self.batch_size)

    def _permutation(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self._epoch])
        return rng.permutation(self.num_blocks).astype(np.int64)

    def _layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(block order, block lengths, cumulative row count at the end of each window)."""
        if self._layout_cache is None or self._layout_cache[0] != self._epoch:
            order = self._permutation()[self.rank :: self.world_size]
            window_ends = np.cumsum(self._window_lengths(order))
            self._layout_cache = (self._epoch, order, window_ends)
        _, order, window_ends = self._layout_cache
        return order, self._block_lengths(order), window_ends

    def _block_lengths(self, blocks: np.ndarray) -> np.ndarray:
        return np.minimum(self.block_rows, self.num_samples - blocks * self.block_rows)

    def _window_lengths(self, order: np.ndarray) -> np.ndarray:
        lengths = self._block_lengths(order)
        if lengths.size == 0:
            return lengths
        return np.add.reduceat(lengths, np.arange(0, lengths.size, self.window_blocks))

    def _window_rows(self, order: np.ndarray, window: int) -> np.ndarray:
        """The shuffled rows of one window of this rank's blocks, int64."""
        blocks = order[window * self.window_blocks : (window + 1) * self.window_blocks]
        starts = blocks * self.block_rows
        lengths = self._block_lengths(blocks)
        # Concatenated aranges without a Python loop: each row is its block's start plus its offset.
        offsets = np.cumsum(lengths) - lengths
        rows = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - offsets, lengths)
        np.random.default_rng([self.seed, self._epoch, self.rank, window]).shuffle(rows)
        return rows


def _check_int(name: str, value: Any, minimum: int, hint: str) -> int:
    """``value`` as an int >= ``minimum``, or a ValueError naming the argument."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer ({hint}), got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum} ({hint}), got {number}")
    return number
