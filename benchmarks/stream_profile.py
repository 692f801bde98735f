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
    rows = store.meta.shard_rows
    blocks = list(range(store.meta.num_shards))

    def shard_reads(names: tuple[str, ...]) -> None:
        for b in blocks:
            for name in names:
                store.read(name, slice(*store.shard_bounds(b)))

    def reads_with(env: dict[str, str]) -> Callable[[], None]:
        def read() -> None:
            os.environ.update(env)
            try:
                shard_reads(store.row_array_names)
            finally:
                for key in env:
                    del os.environ[key]

        return read

    raw = store.read(LOGITS)
    cache = dict(enumerate(stream._compute(blocks, rows)))
    wide = SoftLabelStream(store)
    wide_cache = dict(enumerate(wide._compute(blocks, rows)))

    def gather(s: SoftLabelStream, blocks_cache: dict) -> None:
        for batch in PlanSampler(bench.plan):
            s.source.gather(batch, batch // rows, blocks_cache, rows, (0, 0))

    pieces: dict[str, Callable[[], object]] = {
        "zstd decode of the frames, 1 thread": bench._decode,
        "zstd decode of the frames, all cores": bench._decode_pool,
        "shard reads, logits (from the shard files)": lambda: shard_reads((LOGITS,)),
        "shard reads, every array, one after another": lambda: shard_reads(store.row_array_names),
        "shard reads, every array, zarrs": reads_with({"SOFTCACHE_DIRECT_READS": "0"}),
        "the reader: a window's shards in one read": lambda: [
            stream._compute(blocks[i : i + bench.plan.window_blocks], rows)
            for i in range(0, len(blocks), bench.plan.window_blocks)
        ],
        "shard reads, every array, zarr-python": reads_with(
            {"SOFTCACHE_DIRECT_READS": "0", "SOFTCACHE_ZARRS": "0"}
        ),
        "all logits in one read": lambda: store.read(LOGITS),
        "fp16 -> fp32 widening (torch)": lambda: torch.from_numpy(raw).float(),
        "row gather, fp16 as stored (the assembler)": lambda: gather(stream, cache),
        "row gather + widening to float32": lambda: gather(wide, wide_cache),
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
