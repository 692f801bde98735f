"""Work ahead of the training thread: an iterator run on a background thread, a bounded queue away.

A training step on a GPU takes milliseconds, and every millisecond the loader spends on the training
thread adds to it: collating inputs, hashing them for the alignment check, replaying views, gathering
a batch's soft labels out of decoded blocks, widening fp16 to fp32. `Ahead` moves all of that
beside the step, which then only takes finished batches from a queue (the GIL is released by the
numpy, torch, hashlib and zstd calls that do the work, so the two threads overlap on two cores).
The stream uses it to gather batches; the training loop, to produce whole batches (inputs and soft
labels) for every layout and mode.

Determinism is kept: the background thread does exactly what the consumer would have done, in the
same order, and nothing it runs draws from torch's global RNG.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from typing import Any


def put_unless_stopped(q: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    """Put `item` on a bounded queue, waiting for room until `stop` is set.

    Returns:
        True once the item is queued; False if `stop` was set first (the consumer is gone).
    """
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


class Ahead:
    """Run an iterator on a background thread, at most `depth` items ahead of its consumer.

    Errors reach the consumer at the item where they happened; closing (or abandoning) the
    consumer's iterator stops the thread, which closes the source iterator (running its
    `finally`).
    """

    _DONE = object()

    def __init__(self, batches: Iterator[Any], *, depth: int, name: str = "ahead") -> None:
        self._batches = batches
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"softcache-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for batch in self._batches:
                if not self._put(batch):
                    return
            self._put(self._DONE)
        except BaseException as exc:
            self._put(exc)
        finally:
            close = getattr(self._batches, "close", None)
            if close is not None:  # a generator: run its `finally` (the stream's reader stops)
                close()

    def _put(self, item: Any) -> bool:
        return put_unless_stopped(self._queue, item, self._stop)

    def results(self) -> Generator[Any, None, None]:
        """The batches, in order, as the training loop takes them."""
        try:
            while True:
                item = self._queue.get()
                if item is self._DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
