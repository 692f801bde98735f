"""Background shard writing: compression and I/O overlap the next forward passes.

The build loop fills one host buffer per shard; a full shard goes to a small thread pool that writes
it with a single `LogitStore.write_shard` call (zstd and crc32c release the GIL, so threads overlap
with the teacher). Exactly one task writes each shard, which is what Zarr sharding needs: every write to
a shard rewrites the whole shard file. The number of shards in flight is bounded, so host memory is
`(writer_threads + 1) * shard bytes` however large the dataset.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from softcache.errors import SoftcacheError
from softcache.store import LogitStore


class ShardWriter:
    """Write whole shards in background threads; re-raise the first failure in the caller.

    Use as a context manager: leaving it waits for every submitted shard, so a shard submitted is
    either fully written and recorded as done, or reported as failed.
    """

    def __init__(self, store: LogitStore, *, threads: int = 2) -> None:
        self._store = store
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="softcache-writer")
        self._slots = threading.BoundedSemaphore(threads + 1)
        self._futures: list[Future[None]] = []
        self.shards_written = 0

    def submit(self, shard: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Queue a shard for writing; blocks while too many shards are in flight."""
        self.raise_failures()
        self._slots.acquire()
        future = self._pool.submit(self._write, shard, arrays)
        self._futures.append(future)

    def _write(self, shard: int, arrays: Mapping[str, np.ndarray]) -> None:
        try:
            self._store.write_shard(shard, arrays)
            self.shards_written += 1
        except Exception as exc:
            # Storage failures (a full disk, an unreachable bucket) are the user's to fix, and the
            # shards already recorded are safe: say so instead of dumping a traceback.
            raise SoftcacheError(
                f"writing shard {shard} to {self._store.location} failed "
                f"({type(exc).__name__}: {exc}); the shards recorded so far are kept: fix the "
                "cause and run the same command again to resume"
            ) from exc
        finally:
            self._slots.release()

    def raise_failures(self) -> None:
        """Re-raise the first error of a finished write, if any."""
        pending = []
        for future in self._futures:
            if future.done():
                future.result()  # raises the writer's exception here, in the build thread
            else:
                pending.append(future)
        self._futures = pending

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Finish what was submitted even when the build failed: those shards are good work.
        self._pool.shutdown(wait=True)
        if exc_info[0] is None:
            for future in self._futures:
                future.result()
