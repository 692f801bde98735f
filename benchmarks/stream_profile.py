"""Where the stream's time goes: each piece of `SoftLabelStream` timed alone on the stream store.

`python -m benchmarks.stream_profile` builds the stream section's store (32,768 rows x 1,000
classes, fp16, 4,096-row shards) and prints the median of several timings of each piece, next to
the bare zstd decode of the same frames. benchmarks/README.md ("Where the time goes") reads them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.stream import EPOCHS, StreamBench
from softcache.store import LOGITS
from softcache.trainer.stream import SoftLabelStream, _consumption_orders


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="softcache-stream-profile-"))
    bench = StreamBench("benchmarks.models:teacher_wide", "benchmarks.models:vectors_full", workdir)
    store, stream = bench.store, bench.stream_stored
    rows = store.meta.shard_rows
    blocks = list(range(store.meta.num_shards))

    def shard_reads(names: tuple[str, ...]) -> None:
        for b in blocks:
            for name in names:
                store.read(name, slice(*store.shard_bounds(b)))

    def with_env(env: dict[str, str], fn: Callable[[], None]) -> None:
        os.environ.update(env)
        try:
            fn()
        finally:
            for key in env:
                del os.environ[key]

    def reads_with(env: dict[str, str]) -> Callable[[], None]:
        return lambda: with_env(env, lambda: shard_reads(store.row_array_names))

    raw = store.read(LOGITS)
    wide = SoftLabelStream(store)
    # The stream's read groups (a window's blocks) and the order the plan consumes their rows.
    plan = bench.plan
    order = [int(b) for b in plan.block_order()]
    windows = [order[i : i + plan.window_blocks] for i in range(0, len(order), plan.window_blocks)]
    group_of = np.full(plan.num_blocks, -1, dtype=np.int64)
    for g, ids in enumerate(windows):
        group_of[ids] = g
    counts = dict(zip(order, plan.rows_per_block().tolist(), strict=True))
    group_rows = [sum(counts[b] for b in ids) for ids in windows]
    orders = list(_consumption_orders(plan.row_runs(), rows, group_of, group_rows))

    def window_reads(s: SoftLabelStream) -> None:
        for ids, samples in zip(windows, orders, strict=True):
            s._compute(ids, rows, samples, (plan.seed, plan.epoch))

    pieces: dict[str, Callable[[], object]] = {
        "zstd decode of the frames, 1 thread": bench._decode,
        "zstd decode of the frames, all cores": bench._decode_pool,
        "shard reads, logits (from the shard files)": lambda: shard_reads((LOGITS,)),
        "shard reads, every array, one after another": lambda: shard_reads(store.row_array_names),
        "shard reads, every array, zarrs": reads_with({"SOFTCACHE_DIRECT_READS": "0"}),
        "the reader: a window's shards read in plan order": lambda: window_reads(stream),
        "the same, widened to float32": lambda: window_reads(wide),
        "the same, zarrs, then taken in plan order": lambda: with_env(
            {"SOFTCACHE_DIRECT_READS": "0"}, lambda: window_reads(stream)
        ),
        "shard reads, every array, zarr-python": reads_with(
            {"SOFTCACHE_DIRECT_READS": "0", "SOFTCACHE_ZARRS": "0"}
        ),
        "all logits in one read": lambda: store.read(LOGITS),
        "fp16 -> fp32 widening (torch)": lambda: torch.from_numpy(raw).float(),
        "whole stream, fp16 as stored": lambda: bench._read_stream(stream, bench.nbytes_stored),
        "whole stream, fp16 as stored, gathered inline (as train runs it)": lambda: (
            bench._read_stream(bench.stream_stored_inline, bench.nbytes_stored)
        ),
        "whole stream, float32": lambda: bench._read_stream(wide, bench.nbytes),
        "whole stream, fp16 as stored, per epoch of 4 in a row": lambda: bench._read_epochs(
            stream, bench.nbytes_stored
        ),
    }
    print(f"{'piece':<66} {'median ms':>10}")
    for name, fn in pieces.items():
        fn()  # warm-up
        per = EPOCHS if "in a row" in name else 1
        print(f"{name:<66} {median_seconds(fn, args.repeats) * 1e3 / per:>10.1f}")


if __name__ == "__main__":
    main()
