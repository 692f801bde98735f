"""Token layout of the stream: per-token soft labels of a language model's store, by sample.

The training plan (`softcache.trainer.plan.EpochPlan`) runs over samples in blocks of consecutive
samples. A block's tokens are one contiguous range of rows (CSR `offsets`), so reading a block is
one slice per array, decoded from the whole shards it overlaps (never per row or per batch). The
reader thread decodes the block (`TokenCodec.decode`); the assembler (the stream's own thread, or
the trainer's batch thread) then gathers a batch's samples' rows, with one `index_select` per
(block, field).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from softcache.losses.tokens import teacher_bins
from softcache.store import LogitStore, StoreMeta, decode_token_rows

# Tokens per plan block, at least: the plan shuffles samples within windows of blocks, and
# windows of a few shards' tokens hold only a few hundred short sequences, often from one
# document: measured on the bundled byte LM (4,096 windows of 128 bytes), blocks of one 4,096-token
# shard (windows of 128 samples) cost the hard-label student 0.13 bits per byte against blocks
# of 512 samples. A block is one contiguous read, so a larger one costs memory only:
# 65,536 tokens of decoded top-128 rows are about 100 MB.
BLOCK_TOKENS = 65536


def block_samples_for(store: LogitStore, batch_size: int = 1, world_size: int = 1) -> int:
    """Samples per plan block: at least ``BLOCK_TOKENS`` tokens or one shard, and a batch.

    At least a batch per block keeps every shuffle window wider than a batch. Under DDP each rank
    takes whole blocks, so a block holds at most ``num_samples / world_size`` samples: every rank
    gets one (a small store is otherwise one block).
    """
    meta = store.meta
    mean_tokens = max(meta.num_tokens / max(meta.num_samples, 1), 1.0)
    tokens = max(meta.shard_rows, BLOCK_TOKENS)
    samples = min(round(tokens / mean_tokens), meta.num_samples)
    if world_size > 1:
        samples = min(samples, meta.num_samples // world_size)
    return max(batch_size, samples, 1)


@dataclass
class TokenLabels:
    """One batch of per-token soft labels, aligned with the plan's batch of samples.

    Attributes:
        indices: (B,) int64 dataset indices of the samples.
        lengths: (B,) int64 tokens of each sample; the rows below hold sample ``indices[0]``'s
            tokens first, each sample's in position order (``sum(lengths)`` rows in all).
        fields: `TokenCodec.decode`'s tensors, one row per token: ``values`` (T, k) float32
            log-probabilities, ``indices`` (T, k) int64 and ``residual`` (T,) for top-k stores,
            with the teacher's bins ``probs`` (T, k + 1) and ``neg_entropy`` (T,), float32
            (`decode_with_bins`); ``ids`` (T, n) int64, ``counts`` (T, n) and ``entropy`` (T,)
            for sampled stores.
    """

    indices: np.ndarray
    lengths: np.ndarray
    fields: dict[str, Tensor]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TokenLabels:
        """A copy with the fields on `device`."""
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in self.fields.items()}
        return TokenLabels(self.indices, self.lengths, moved)


class TokenBlocks:
    """How the stream reads, decodes and gathers a token store's blocks of samples.

    Args:
        store: an open, complete store with ``layout = "tokens"``.
    """

    def __init__(self, store: LogitStore) -> None:
        if not store.meta.tokens:
            raise ValueError(f"store {store.location} has one row per sample, not per token")
        self.store = store
        self.offsets = store.offsets()

    def check_block_rows(self, block_rows: int) -> None:
        """Any block size reads: a block of samples is one contiguous token range."""

    def rows(self, block: int, block_rows: int) -> tuple[int, int]:
        """The store rows `[start, stop)` of block `block`: its samples' tokens."""
        num_samples = len(self.offsets) - 1
        s0 = block * block_rows
        s1 = min(s0 + block_rows, num_samples)
        return int(self.offsets[s0]), int(self.offsets[s1])

    def read_group(
        self,
        bounds: list[tuple[int, int]],
        blocks: list[int],
        samples: np.ndarray,
        block_rows: int,
        seed_epoch: tuple[int, int],
        computed: list[dict[str, np.ndarray]] | None = None,
    ) -> dict[int, dict[str, Tensor]]:
        """Blocks of store rows `bounds` (each `[start, stop)`), every per-token array of each,
        read in one concurrent `read_many` (or `computed` by Dask tasks) and decoded; by block.

        A token block is decoded whole (`TokenCodec.decode` makes new tensors anyway), so the
        order the plan consumes `samples` in is not needed here: `take` gathers each batch.
        """
        if computed is None:
            names = self.store.row_array_names
            arrays = iter(self.store.read_many((n, slice(*r)) for r in bounds for n in names))
            computed = [{n: next(arrays) for n in names} for _ in bounds]
        return {b: self.decode(data) for b, data in zip(blocks, computed, strict=True)}

    def decode(self, data: dict[str, np.ndarray]) -> dict[str, Tensor]:
        """Stored rows -> the loss's tensors, with the teacher's side of the loss (on the
        reader thread: `decode_with_bins`)."""
        return decode_with_bins({k: np.asarray(v) for k, v in data.items()}, self.store.meta)

    def take(
        self,
        batch: np.ndarray,
        block_ids: np.ndarray,
        parts: list[tuple[dict[int, dict[str, Tensor]], np.ndarray | None, int, int]],
        block_rows: int,
        seed_epoch: tuple[int, int],
    ) -> TokenLabels:
        """The batch's samples' rows, out of the groups it draws from (`parts`: each group's
        blocks first)."""
        blocks = {b: data for group, *_ in parts for b, data in group.items()}
        return self.gather(batch, block_ids, blocks, block_rows, seed_epoch)

    def gather(
        self,
        batch: np.ndarray,
        block_ids: np.ndarray,
        cache: dict[int, dict[str, Tensor]],
        rows: int,
        seed_epoch: tuple[int, int],
    ) -> TokenLabels:
        """The decoded rows of the batch's samples, concatenated in batch order."""
        ids = np.asarray(batch, dtype=np.int64)
        lengths = self.offsets[ids + 1] - self.offsets[ids]
        local = self.offsets[ids] - self.offsets[block_ids * rows]
        out_start = np.cumsum(lengths) - lengths
        out: dict[str, Tensor] = {}
        for block in np.unique(block_ids):
            decoded = cache[int(block)]
            mine = block_ids == block
            src = torch.from_numpy(_ragged_arange(local[mine], lengths[mine]))
            dst = torch.from_numpy(_ragged_arange(out_start[mine], lengths[mine]))
            for name, tensor in decoded.items():
                if name not in out:
                    out[name] = tensor.new_empty((int(lengths.sum()), *tensor.shape[1:]))
                out[name][dst] = tensor.index_select(0, src)
        return TokenLabels(indices=ids, lengths=lengths, fields=out)


def decode_with_bins(arrays: dict[str, np.ndarray], meta: StoreMeta) -> dict[str, Tensor]:
    """`decode_token_rows`' fields of a token store's rows, and for a top-k store the teacher's
    side of its loss: ``probs`` (T, k + 1) float32 and ``neg_entropy`` (T,) float32
    (`softcache.losses.tokens.teacher_bins`).

    The loss depends on them only through the store's rows, so computing them where the rows are
    decoded, once per block and off the training thread, takes a dozen small ops per step off the
    step (`token_kd_loss` uses them when they are there).
    """
    fields = decode_token_rows(arrays, meta)
    codec = meta.codec
    if codec.encoding == "topk":
        fields["probs"], fields["neg_entropy"] = teacher_bins(
            fields["values"], fields["residual"], has_tail=codec.width < codec.vocab_size
        )
    return fields


def _ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])``, without the loop."""
    total = int(lengths.sum())
    segment_starts = np.cumsum(lengths) - lengths
    return np.repeat(starts - segment_starts, lengths) + np.arange(total, dtype=np.int64)
