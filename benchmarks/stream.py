"""Stream throughput: `SoftLabelStream.batches(plan)` next to two baselines over the same rows.

The store is a dense fp16 store of 1,000 classes (a cheap linear teacher writes it), the width at
which the stream's bandwidth starts to matter. The stream delivers float32 logits and uint64 sample
hashes in plan order (shuffled blocks, shuffled rows inside a window), batch by batch, with no
training attached. Its baselines:

- `np.load`: exactly those decoded arrays from .npy files in the page cache, the fastest any reader
  of these bytes can be (no decompression at all);
- `zstd`: `numcodecs.Zstd().decode` of the store's own compressed chunks (the zstd frames read out
  of its shard files beforehand, crc32c stripped), one after another on one thread: the one cost a
  reader of a compressed store cannot avoid;
- `zstd-pool`: the same frames decoded by a thread pool of `os.cpu_count()` threads, measured in
  the same run (numcodecs releases the GIL while it decodes). The stream decodes on all cores
  (Dask's threads, zarrs' where installed), so it is held to this: what the machine actually gives
  on all cores, not one thread's rate times the core count (two threads here decode only
  1.1-1.35x faster than one).

Every case covers the same rows, so the ratio of two times is the ratio of two throughputs.

Each stream runs as a user's own loop gets it (`SoftLabelStream`'s default: batches gathered on an
assembler thread of its own, two runs of four batches ahead) and, in the `-inline` cases, as `softcache train` runs it
(`assemble_ahead=0`: gathered on the thread that iterates, which in training is the batch process's
own, already off the training thread). On two cores the assembler thread is one thread more than
the cores beside the reader's two decoding threads. Every case decodes on the process's default
threads, one per core, as a user's own loop does: a `softcache train` run gives its reads only
the cores its student leaves (`softcache.runtime.threads.batch_maker_read_threads`, one here),
so "as train runs it" is the assembly as train runs it, on all the machine's cores.

Each stream is timed two ways. `stream*` is one epoch from a standing start, as every benchmark
round calls it: the first batch waits for the first shuffle window's blocks, and the last window's
gathering has no reading left to hide behind. `stream*-epochs` is what a training run sees after
its first epoch: `EPOCHS` epochs in a row, each passing the next one's plan as `then` (as the
trainer does), so the next epoch's first blocks are read while this one's last batches are
gathered; its time is per epoch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from numcodecs import Zstd

from benchmarks.build import BuildWorkload, fresh_store
from benchmarks.harness import Figure, median, ratio_figure, timed
from softcache.store import LOGITS, SAMPLE_HASH, LogitStore
from softcache.store.location import local_path
from softcache.store.shard_files import chunk_frames, shard_layout
from softcache.trainer.plan import EpochPlan
from softcache.trainer.stream import SoftLabelStream, plan_from_state

BATCH_SIZE = 256
# Epochs in a row of the `-epochs` cases (the first starts cold).
EPOCHS = 4
# Stream throughput over zstd decoding of the same frames on every core: the stored dtypes (the
# GPU path) and float32 (the CPU path, which also widens every value).
DECODE_GOAL = 0.70
DECODE_GOAL_FLOAT32 = 0.50


def stored_frames(store: LogitStore, name: str) -> list[bytes]:
    """The zstd frames of every inner chunk of array `name`, as its shard files hold them.

    Reads the shard files of a local store (`softcache.store.shard_files.chunk_frames`: each
    file's index checked, each chunk's trailing crc32c dropped). Only for the layout softcache
    writes: sharded bytes / zstd / crc32c chunks, the index at the end.

    Returns:
        One `bytes` per written chunk, in shard and chunk order.
    """
    layout = shard_layout(store.array(name))
    if layout is None:
        raise ValueError(f"{name}: expected sharded bytes/zstd/crc32c chunks, index at the end")
    root = local_path(store.location)
    return [f for shard in range(store.meta.num_shards) for f in chunk_frames(root, layout, shard)]


class StreamBench:
    """Cases `stream`, `np.load` and `zstd` over one dense store."""

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
        # The GPU path: the store's dtypes, widened on the device after the copy.
        self.stream_stored = SoftLabelStream(self.store, values="stored")
        # As `softcache train` runs them: gathered on the iterating thread.
        self.stream_inline = SoftLabelStream(self.store, assemble_ahead=0)
        self.stream_stored_inline = SoftLabelStream(self.store, values="stored", assemble_ahead=0)
        self.nbytes_stored = rows[LOGITS].nbytes + rows[SAMPLE_HASH].nbytes
        self.zstd = Zstd()
        self.frames = [f for name in (LOGITS, SAMPLE_HASH) for f in stored_frames(self.store, name)]
        self.stored_bytes = sum(len(f) for f in self.frames)
        self.decoded_bytes = sum(len(self.zstd.decode(f)) for f in self.frames)
        self.cpus = os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(max_workers=self.cpus, thread_name_prefix="bench-zstd")

    def _read_stream(self, stream: SoftLabelStream, nbytes: int) -> None:
        self._consume(stream.batches(self.plan), nbytes)

    def _read_epochs(self, stream: SoftLabelStream, nbytes: int) -> None:
        """`EPOCHS` epochs in a row, each reading the next one's first blocks ahead."""
        plan = plan_from_state(self.plan.state_dict())
        for epoch in range(EPOCHS):
            plan.set_epoch(epoch)
            then = None
            if epoch + 1 < EPOCHS:
                then = plan_from_state(plan.state_dict())
                then.set_epoch(epoch + 1)
            self._consume(stream.batches(plan, then=then), nbytes)

    @staticmethod
    def _consume(batches: Iterator[Any], nbytes: int) -> None:
        delivered = 0
        for soft in batches:
            assert soft.logits is not None
            delivered += soft.logits.numel() * soft.logits.element_size() + soft.sample_hash.nbytes
        assert delivered == nbytes, (delivered, nbytes)

    def _read_npy(self) -> None:
        for path in self.files.values():
            np.load(path)

    def _decode(self) -> None:
        for frame in self.frames:
            self.zstd.decode(frame)

    def _decode_pool(self) -> None:
        list(self.pool.map(self.zstd.decode, self.frames))

    def cases(self) -> dict[str, Callable[[], float]]:
        return {
            "stream": lambda: timed(lambda: self._read_stream(self.stream, self.nbytes)),
            "stream-stored": lambda: timed(
                lambda: self._read_stream(self.stream_stored, self.nbytes_stored)
            ),
            "stream-epochs": lambda: (
                timed(lambda: self._read_epochs(self.stream, self.nbytes)) / EPOCHS
            ),
            "stream-stored-epochs": lambda: (
                timed(lambda: self._read_epochs(self.stream_stored, self.nbytes_stored)) / EPOCHS
            ),
            "stream-inline": lambda: timed(
                lambda: self._read_stream(self.stream_inline, self.nbytes)
            ),
            "stream-stored-inline": lambda: timed(
                lambda: self._read_stream(self.stream_stored_inline, self.nbytes_stored)
            ),
            "stream-stored-inline-epochs": lambda: (
                timed(lambda: self._read_epochs(self.stream_stored_inline, self.nbytes_stored))
                / EPOCHS
            ),
            "np.load": lambda: timed(self._read_npy),
            "zstd": lambda: timed(self._decode),
            "zstd-pool": lambda: timed(self._decode_pool),
        }

    def figures(self, samples: dict[str, list[float]]) -> list[Figure]:
        meta = self.store.meta
        shape = f"N={meta.num_samples}, C={meta.num_classes}, shard {meta.shard_rows} rows"
        rows = meta.num_samples / 1e3
        zstd, pool = median(samples["zstd"]), median(samples["zstd-pool"])
        baseline = (
            f"zstd on {self.cpus} threads {rows / pool:,.0f}k rows/s "
            f"({self.decoded_bytes / 1e6 / pool:,.0f} MB/s decoded from "
            f"{self.stored_bytes / 1e6:.0f} MB of {len(self.frames)} frames; "
            f"{zstd / pool:.2f}x one thread's {rows / zstd:,.0f}k rows/s)"
        )
        figures = []
        for case, label, nbytes in (
            ("stream", "float32 (CPU path)", self.nbytes),
            ("stream-stored", "fp16 as stored (GPU path)", self.nbytes_stored),
            ("stream-epochs", f"float32 (CPU path), {EPOCHS} epochs in a row", self.nbytes),
            (
                "stream-stored-epochs",
                f"fp16 as stored (GPU path), {EPOCHS} epochs in a row",
                self.nbytes_stored,
            ),
            ("stream-inline", "float32 (CPU path), as train runs it", self.nbytes),
            (
                "stream-stored-inline",
                "fp16 as stored (GPU path), as train runs it",
                self.nbytes_stored,
            ),
            (
                "stream-stored-inline-epochs",
                f"fp16 as stored (GPU path), as train runs it, {EPOCHS} epochs in a row",
                self.nbytes_stored,
            ),
        ):
            mb, t = nbytes / 1e6, median(samples[case])
            if not case.endswith(("-epochs", "-inline")):
                figures.append(
                    ratio_figure(
                        f"stream {label} / np.load",
                        samples,
                        "np.load",
                        case,
                        goal=None,
                        note=(
                            f"stream {mb / t:,.0f} MB/s ({mb:.0f} MB delivered), np.load of the "
                            f"float32 arrays {self.nbytes / 1e6 / median(samples['np.load']):,.0f} "
                            f"MB/s; {shape}, batch {BATCH_SIZE}"
                        ),
                    )
                )
            figures.append(
                ratio_figure(
                    f"stream {label} / zstd decode, all cores",
                    samples,
                    "zstd-pool",
                    case,
                    goal=DECODE_GOAL if "stored" in case else DECODE_GOAL_FLOAT32,
                    higher_is_better=True,
                    note=f"stream {rows / t:,.0f}k rows/s; {baseline}; {shape}, fp16 stored",
                )
            )
        return figures
