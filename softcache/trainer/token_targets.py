"""Random access by sample to a token store's decoded rows, through a bounded cache of shards.

`SoftLabelStream` reads a token store in the order of an epoch plan, blocks ahead, which is the
fast path when softcache owns the order. A framework that owns it (the Hugging Face `Trainer`'s
samplers, packing, any world size) asks for samples one at a time instead. Reading one sample's
rows from Zarr costs a whole shard read and decode each time (the glue the issue measured was 4x
slower than the CLI for that reason), so `TokenTargets` reads and decodes **whole shards** and
keeps the last ``cache_shards`` of them (LRU): a sampler that visits samples in any order within
a window of shards reads each shard about once per window; a uniformly random order over a store
far larger than the cache reads one shard per sample, at most ``cache_shards`` decoded at a time.

Each sample's input ids are checked against the store's hash and length (`check`): a reordered,
re-tokenised or different dataset fails at its first wrong sample, naming it.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from softcache.data.hashing import hash_rows
from softcache.errors import DatasetMismatchError, StoreFormatError
from softcache.store import LogitStore, StoreMeta
from softcache.trainer.token_labels import decode_with_bins


class TokenTargets:
    """A token store's decoded rows by sample index, hash-checked, with a shard cache.

    Opens the store lazily in each process (after a DataLoader forks or spawns its workers), and
    pickles without the open store.

    Args:
        store: a path or URL of a complete token store, or an open `LogitStore`.
        cache_shards: decoded shards kept in memory (per process); at least 1.
        storage_options: fsspec options for a URL.
    """

    def __init__(
        self,
        store: str | LogitStore,
        *,
        cache_shards: int = 8,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if cache_shards < 1:
            raise ValueError(f"cache_shards must be at least 1, got {cache_shards}")
        opened = store if isinstance(store, LogitStore) else None
        self.location = store.location if isinstance(store, LogitStore) else str(store)
        self.storage_options = dict(storage_options or {})
        self.cache_shards = cache_shards
        if opened is None:
            opened = LogitStore.open(self.location, storage_options=self.storage_options)
        if not opened.meta.tokens:
            raise StoreFormatError(
                f"store {self.location} has one row per sample; TokenTargets reads per-token "
                "stores (softcache build --lm); for a row store use softcache.AlignedBatches"
            )
        self.meta: StoreMeta = opened.meta
        self.offsets = opened.offsets()
        self.hashes = opened.sample_hashes()
        self._store: LogitStore | None = opened
        self._pid = os.getpid()
        self._cache: OrderedDict[int, dict[str, Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return self.meta.num_samples

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"], state["_cache"] = None, OrderedDict()
        return state

    def rows(self, index: int) -> dict[str, Tensor]:
        """Sample ``index``'s decoded rows: `TokenCodec.decode`'s fields, ``n_i`` rows each.

        Top-k stores: ``values`` (n, k) float32 log-probabilities, ``indices`` (n, k) int64,
        ``residual`` (n,) float32, and the teacher's bins ``probs`` (n, k + 1) and
        ``neg_entropy`` (n,) float32 (`decode_with_bins`); sampled stores: ``ids`` (n, D)
        int64, ``counts`` (n, D), ``entropy`` (n,) float32.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of a store of {len(self)} samples")
        r0, r1 = int(self.offsets[index]), int(self.offsets[index + 1])
        if r1 == r0:
            return {k: v[:0] for k, v in self._shard(0 if self.meta.num_rows else -1).items()}
        rows = self.meta.shard_rows
        parts = []
        for shard in range(r0 // rows, (r1 - 1) // rows + 1):
            s0 = shard * rows
            decoded = self._shard(shard)
            parts.append({k: v[max(r0 - s0, 0) : r1 - s0] for k, v in decoded.items()})
        if len(parts) == 1:
            return parts[0]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def check(self, index: int, input_ids: Tensor) -> None:
        """Raise `DatasetMismatchError` unless ``input_ids`` (n,) int64 (the sample's real tokens)
        are the ones the teacher saw for sample ``index`` (length and hash)."""
        stored = int(self.offsets[index + 1] - self.offsets[index])
        if len(input_ids) != stored:
            raise DatasetMismatchError(
                f"sample {index} has {len(input_ids)} tokens but store {self.location} holds "
                f"{stored} for it; use the tokenised dataset the store was built from, in the "
                "same order"
            )
        ids = input_ids.long().contiguous().reshape(1, -1)
        if int(hash_rows(ids)[0]) != int(self.hashes[index]):
            raise DatasetMismatchError(
                f"sample {index}'s input_ids differ from those store {self.location} was built "
                "from (hash mismatch); use the tokenised dataset the store was built from, in "
                "the same order, or rebuild the store"
            )

    def _shard(self, shard: int) -> dict[str, Tensor]:
        if shard < 0:  # a store without rows: an empty decode gives the fields' shapes
            return decode_with_bins(self._open().read_rows(0, 0), self.meta)
        cached = self._cache.get(shard)
        if cached is not None:
            self._cache.move_to_end(shard)
            return cached
        store = self._open()
        start, stop = store.shard_bounds(shard)
        decoded = decode_with_bins(store.read_rows(start, stop), self.meta)
        self._cache[shard] = decoded
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return decoded

    def _open(self) -> LogitStore:
        if self._store is None or self._pid != os.getpid():
            self._store = LogitStore.open(self.location, storage_options=self.storage_options)
            self._pid = os.getpid()
            self._cache.clear()
        return self._store


def concat_targets(targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Samples' decoded rows, concatenated in order: the rows of ``logits[attention_mask]`` of
    their right-padded batch (`softcache.data.sequences`)."""
    if not targets:
        raise ValueError("no samples to concatenate")
    return {k: torch.cat([t[k] for t in targets]) for k in targets[0]}
