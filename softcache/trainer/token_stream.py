"""Per-sample soft labels from a per-token store, streamed with Dask ahead of the training loop.

The training plan (`softcache.plan.EpochPlan`) runs over samples in blocks of consecutive samples.
A block's tokens are one contiguous range of rows (CSR), so reading a block is one slice per
array, computed by Dask from whole storage chunks (never per row or per batch). Blocks are read
in the plan's `block_order`, `prefetch_blocks` ahead, in a background thread; a batch then only
gathers its samples' rows from decoded blocks in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
from torch import Tensor

from softcache.store import LogitStore, decode_token_rows
from softcache.trainer.plan import EpochPlan

# Tokens per plan block, at least: the plan shuffles samples within windows of blocks, and
# windows of a few shards' tokens hold only a few hundred short sequences, often from one
# document: measured on the bundled byte LM (4,096 windows of 128 bytes), blocks of one 4,096-token
# shard (windows of 128 samples) cost the hard-label student 0.13 bits per byte against blocks
# of 512 samples. A block is one contiguous read, so a larger one costs memory only:
# 65,536 tokens of decoded top-128 rows are about 100 MB.
BLOCK_TOKENS = 65536


def block_samples_for(store: LogitStore, batch_size: int = 1) -> int:
    """Samples per plan block: at least ``BLOCK_TOKENS`` tokens or one shard, and a batch.

    At least a batch per block keeps every shuffle window wider than a batch.
    """
    meta = store.meta
    mean_tokens = max(meta.num_tokens / max(meta.num_samples, 1), 1.0)
    tokens = max(meta.shard_rows, BLOCK_TOKENS)
    return max(batch_size, min(round(tokens / mean_tokens), meta.num_samples), 1)


class TokenLabelStream:
    """Read a per-token store's soft labels block by block, following an epoch plan.

    Args:
        store: an open, complete store with ``layout = "tokens"``.
        block_samples: samples per plan block (the plan's ``block_rows``).
        prefetch_blocks: blocks read ahead of the one in use.
        client: a `distributed.Client` to compute on; None uses Dask's threaded scheduler.
    """

    def __init__(
        self,
        store: LogitStore,
        block_samples: int,
        *,
        prefetch_blocks: int = 4,
        client: Any | None = None,
    ) -> None:
        if not store.meta.tokens:
            raise ValueError(f"store {store.location} has one row per sample, not per token")
        self.store = store
        self.block_samples = block_samples
        self.prefetch_blocks = max(prefetch_blocks, 1)
        self.client = client
        self.offsets = store.offsets()
        self._arrays = {
            name: da.from_zarr(store.array(name), chunks=store.array(name).chunks)
            for name in store.row_array_names
        }
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="softcache-lm-read")
        self._order: list[int] = []
        self._position: dict[int, int] = {}
        self._futures: dict[int, Future[dict[str, Tensor]]] = {}
        self._window = 1

    def start_epoch(self, plan: EpochPlan) -> None:
        """Follow `plan`'s block order for the coming batches (drops what was read ahead)."""
        self._futures.clear()
        self._order = [int(b) for b in plan.block_order()]
        self._position = {b: p for p, b in enumerate(self._order)}
        self._window = plan.window_blocks

    def labels(self, samples: Sequence[int]) -> dict[str, Tensor]:
        """The decoded soft labels of ``samples``' tokens, concatenated in their order.

        Returns:
            `softcache.token_codec.TokenCodec.decode`'s tensors (CPU), one row per real token:
            sample ``samples[0]``'s tokens first, each sample's in position order.
        """
        if not self._order:
            raise RuntimeError("call start_epoch(plan) before labels()")
        ids = np.asarray(samples, dtype=np.int64)
        blocks = ids // self.block_samples
        unique_blocks = np.unique(blocks)
        positions = [self._position[int(b)] for b in unique_blocks]
        self._schedule(min(positions), max(positions))
        # One gather per (block, array) with index arrays built in numpy, not a slice per sample.
        lengths = self.offsets[ids + 1] - self.offsets[ids]
        local = self.offsets[ids] - self.offsets[blocks * self.block_samples]
        out_start = np.cumsum(lengths) - lengths
        out: dict[str, Tensor] = {}
        for block in unique_blocks:
            decoded = self._futures[self._position[int(block)]].result()
            mine = blocks == block
            src = torch.from_numpy(_ragged_arange(local[mine], lengths[mine]))
            dst = torch.from_numpy(_ragged_arange(out_start[mine], lengths[mine]))
            for name, tensor in decoded.items():
                if name not in out:
                    out[name] = tensor.new_empty((int(lengths.sum()), *tensor.shape[1:]))
                out[name][dst] = tensor.index_select(0, src)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _schedule(self, first: int, last: int) -> None:
        # A batch only reaches the current and the next window, so blocks before the current
        # window are done with.
        keep_from = (first // self._window) * self._window
        for p in [p for p in self._futures if p < keep_from]:
            del self._futures[p]
        for p in range(first, min(last + self.prefetch_blocks + 1, len(self._order))):
            if p not in self._futures:
                self._futures[p] = self._pool.submit(self._read, self._order[p])

    def _read(self, block: int) -> dict[str, Tensor]:
        num_samples = len(self.offsets) - 1
        s0 = block * self.block_samples
        s1 = min(s0 + self.block_samples, num_samples)
        r0, r1 = int(self.offsets[s0]), int(self.offsets[s1])
        graph = {name: arr[r0:r1] for name, arr in self._arrays.items()}
        if self.client is not None:
            rows = self.client.gather(self.client.compute(graph))
        else:
            (rows,) = dask.compute(graph, scheduler="threads")
        return decode_token_rows({k: np.asarray(v) for k, v in rows.items()}, self.store.meta)


def _ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])``, without the loop."""
    total = int(lengths.sum())
    segment_starts = np.cumsum(lengths) - lengths
    return np.repeat(starts - segment_starts, lengths) + np.arange(total, dtype=np.int64)
