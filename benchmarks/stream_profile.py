"""Where the stream's time goes: each piece of `SoftLabelStream` timed alone on the stream store.

`python -m benchmarks.stream_profile` builds the stream section's store (32,768 rows x 1,000
classes, fp16, 4,096-row shards) and prints the median of several timings of each piece, next to
the bare zstd decode of the same frames. benchmarks/README.md ("Where the time goes") reads them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dask
import numpy as np
import torch

from benchmarks.stream import StreamBench
from softcache.store import LOGITS
from softcache.trainer.stream import PlanSampler, SoftLabelStream


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
    shards = range(store.meta.num_shards)
    blocks = list(shards)

    def zarr_serial() -> None:
        for s in shards:
            store.read(LOGITS, slice(*store.shard_bounds(s)))

    def dask_threads() -> None:
        for i in range(0, len(blocks), 2):  # the reader's groups of prefetch_blocks // 2
            stream._compute(blocks[i : i + 2])

    def dask_sync() -> None:
        for b in blocks:
            graph = [{name: arr.blocks[b] for name, arr in stream._arrays.items()}]
            dask.compute(graph, scheduler="sync")

    def direct() -> None:
        for b in blocks:
            for name in stream._arrays:
                store.read(name, slice(*store.shard_bounds(b)))

    raw = store.read(LOGITS)
    decoded = [stream._decode(dict(d)) for d in stream._compute(blocks)]
    cache = dict(enumerate(decoded))
    wide = SoftLabelStream(store)
    wide_cache = dict(enumerate(wide._decode(dict(d)) for d in wide._compute(blocks)))

    def gather(s: SoftLabelStream, blocks_cache: dict) -> None:
        rows = store.meta.shard_rows
        for batch in PlanSampler(bench.plan):
            s._gather(batch, batch // rows, blocks_cache, rows, (0, 0))

    pieces: dict[str, Callable[[], object]] = {
        "zstd decode of the frames, 1 thread": bench._decode,
        "zarr: shards one by one, logits": zarr_serial,
        "zarr: all logits in one read": lambda: store.read(LOGITS),
        "stream reads: dask threads (as the reader)": dask_threads,
        "stream reads: dask sync scheduler": dask_sync,
        "stream reads: zarr called directly": direct,
        "fp16 -> fp32 widening (numpy)": lambda: store.decode_values(raw),
        "fp16 -> fp32 widening (torch)": lambda: torch.from_numpy(raw).float(),
        "row gather, fp16 rows": lambda: gather(stream, cache),
        "row gather, float32 rows": lambda: gather(wide, wide_cache),
        "whole stream, fp16 as stored": lambda: bench._read_stream(stream, bench.nbytes_stored),
        "whole stream, float32": lambda: bench._read_stream(wide, bench.nbytes),
    }
    print(f"{'piece':<46} {'median ms':>10}")
    for name, fn in pieces.items():
        fn()  # warm-up
        print(f"{name:<46} {median_seconds(fn, args.repeats) * 1e3:>10.1f}")


if __name__ == "__main__":
    main()
