"""Stream throughput: `SoftLabelStream.batches(plan)` next to a raw `np.load` of the same bytes.

The store is a dense fp16 store of 1,000 classes (a cheap linear teacher writes it), the width at
which the stream's bandwidth starts to matter. The stream delivers float32 logits and uint64 sample
hashes in plan order (shuffled blocks, shuffled rows inside a window), batch by batch, with no
training attached; the baseline loads exactly those decoded arrays from .npy files in the page
cache, which is the fastest any reader of these bytes can be. Both cases move the same bytes, so the
ratio of their times is the ratio of their throughputs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.build import BuildWorkload, fresh_store
from benchmarks.harness import Figure, median, ratio_figure, timed
from softcache.plan import EpochPlan
from softcache.store import LOGITS, SAMPLE_HASH, LogitStore
from softcache.stream import SoftLabelStream

BATCH_SIZE = 256


class StreamBench:
    """Cases `stream` and `np.load` over one dense store."""

    warmup = True

    def __init__(self, teacher: str, dataset: str, workdir: Path, shard_rows: int = 4096) -> None:
        workload = BuildWorkload("", teacher, dataset, batch_size=1024, shard_rows=shard_rows)
        self.store = LogitStore.open(fresh_store(workload, "dense", workdir / "stream.zarr"))
        rows = self.store.read_rows(0, self.store.meta.num_samples)
        self.files = {
            LOGITS: workdir / "logits.npy",
            SAMPLE_HASH: workdir / "sample_hash.npy",
        }
        np.save(self.files[LOGITS], self.store.decode_values(rows[LOGITS]))
        np.save(self.files[SAMPLE_HASH], rows[SAMPLE_HASH])
        self.nbytes = sum(np.load(path, mmap_mode="r").nbytes for path in self.files.values())
        self.plan = EpochPlan(
            num_samples=self.store.meta.num_samples,
            block_rows=self.store.meta.shard_rows,
            batch_size=BATCH_SIZE,
            seed=0,
        )
        self.stream = SoftLabelStream(self.store)

    def _read_stream(self) -> None:
        delivered = 0
        for soft in self.stream.batches(self.plan):
            assert soft.logits is not None
            delivered += soft.logits.numel() * soft.logits.element_size() + soft.sample_hash.nbytes
        assert delivered == self.nbytes, (delivered, self.nbytes)

    def _read_npy(self) -> None:
        for path in self.files.values():
            np.load(path)

    def cases(self) -> dict[str, Callable[[], float]]:
        return {
            "stream": lambda: timed(self._read_stream),
            "np.load": lambda: timed(self._read_npy),
        }

    def figures(self, samples: dict[str, list[float]]) -> list[Figure]:
        meta = self.store.meta
        mb = self.nbytes / 1e6
        note = (
            f"stream {mb / median(samples['stream']):,.0f} MB/s, np.load "
            f"{mb / median(samples['np.load']):,.0f} MB/s; N={meta.num_samples}, C={meta.num_classes}, "
            f"{mb:.0f} MB decoded, shard {meta.shard_rows} rows, batch {BATCH_SIZE}"
        )
        return [
            ratio_figure(
                "stream / np.load throughput", samples, "np.load", "stream", goal=None, note=note
            )
        ]
