"""Which codec pipeline decodes a store's chunks when softcache reads it.

zarr-python decodes chunks in Python (numcodecs' zstd, one chunk at a time per thread, the GIL
held between codecs). zarrs (`pip install 'softcache[fast]'`, a Rust codec pipeline for
zarr-python) decodes a shard's chunks in parallel without the GIL: measured here, shard reads
1.4x faster (0.81 -> 1.17 GB/s). It reads every array of every softcache store kind bit for bit as
zarr-python does (`tests/integration/test_read_pipeline.py`), and the stores stay plain Zarr v3,
readable by anyone.

A local store's sharded arrays are read by neither pipeline but straight from their shard files
(`softcache.store.shard_files`, faster still); zarrs reads the rest (per-sample arrays, stores in
object storage) and everything with `SOFTCACHE_DIRECT_READS=0`.

Only reads use it: a store opened for writing keeps zarr-python's pipeline, so a build writes the
bytes it always wrote (zstd from another library could compress differently). Where zarrs cannot
serve a store (a zip archive) it falls back to zarr-python's pipeline by itself. Set
`SOFTCACHE_ZARRS=0` to read with zarr-python alone.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Any

import zarr

ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"


@functools.cache
def zarrs_available() -> bool:
    """Whether the zarrs package imports here."""
    return importlib.util.find_spec("zarrs") is not None


def zarrs_enabled() -> bool:
    """Whether reads use zarrs: installed, and not switched off with `SOFTCACHE_ZARRS=0`."""
    return os.environ.get("SOFTCACHE_ZARRS", "1") != "0" and zarrs_available()


def read_pipeline() -> contextlib.AbstractContextManager[Any]:
    """A context in which arrays opened for reading bind the fastest codec pipeline here.

    zarr binds an array's codec pipeline when the array object is made, from `zarr.config`, so
    only arrays opened inside the context use it.
    """
    if not zarrs_enabled():
        return contextlib.nullcontext()
    return zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE})
