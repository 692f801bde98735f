"""How many CPU threads a student's ops get while its batches are made beside it.

Torch gives a process's ops one intra-op thread per core. A trainer that makes its batches
concurrently (the batch process, the batch thread, DataLoader workers) then asks for more
threads than the machine has cores: whenever the batch maker runs, one of the student's threads
is descheduled, and a parallel op (a matrix product, a convolution) waits at its end for the
straggler. On this project's 2-core machine a small student's hard-label epochs took 1.2-1.3x
as long at torch's default as at one thread, and its offline epochs 1.3-1.5x, since their batch
maker has more to do (benchmarks/README.md, eleventh pass). So a CPU student gets the usable
cores less one per batch maker, unless the user said otherwise: an explicit count, or an
``OMP_NUM_THREADS`` in the environment (torchrun sets it to 1 for several ranks per machine).
A student whose long steps use every core well (the benchmark's CNN) can lose by it: it takes
an explicit count.

The same holds the other way round for the batch maker's reads. A local store's chunks are
decoded on a pool of threads, by default one per core (`read_threads`); inside a batch maker
that already shares the machine with the student's threads, a read group's decode then runs on
the student's core too, and the step waits for it. So while a run trains, its reads decode on
the cores the student leaves (`batch_maker_read_threads`, at least one). On this machine the
fast student's offline epochs over hard epochs went from 1.024 / 1.035 (dense / top-k) to
1.006 / 1.017 (40 rounds side by side, benchmarks/README.md, eighteenth pass).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

# Environment variables by which a user (or torchrun) has already chosen the thread count.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# The user's number of decoding threads per process, over every default.
READ_THREADS_ENV = "SOFTCACHE_READ_THREADS"
# This process's decoding threads as a run set them (`reading_threads`), under the user's.
_read_threads: int | None = None


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity masks
        return os.cpu_count() or 1


def local_ranks() -> int:
    """Training processes on this machine: torchrun's ``LOCAL_WORLD_SIZE`` (1 if unset or not a
    positive number)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def student_threads(
    requested: int, *, cpu_student: bool, batch_makers: int, local_ranks: int = 1
) -> int | None:
    """The intra-op thread count to train with, or None to leave torch's as it is.

    Args:
        requested: the user's count (``TrainConfig.threads``), or 0 for the automatic choice.
        cpu_student: the student's ops run on the CPU (on a GPU the CPU threads do little).
        batch_makers: processes or threads making batches beside the training thread, each
            busy for part of every step (the batch process or thread, DataLoader workers).
        local_ranks: training processes on this machine (torchrun's ``LOCAL_WORLD_SIZE``).

    Returns:
        ``requested`` if positive; else, for a CPU student with batch makers and no thread
        count in the environment, the usable cores shared among the local ranks less one per
        batch maker, at least 1 and never more than torch's current count; else None.
    """
    if requested > 0:
        return requested
    if not cpu_student or batch_makers <= 0 or any(os.environ.get(k) for k in THREAD_ENV):
        return None
    cores = usable_cores() // max(1, local_ranks)
    return max(1, min(torch.get_num_threads(), cores - batch_makers))


@contextlib.contextmanager
def intra_op_threads(count: int | None) -> Iterator[int]:
    """Run the block with `count` intra-op threads (None: as they are); restore them after.

    Yields:
        The thread count the block runs with.
    """
    before = torch.get_num_threads()
    if count is None or count == before:
        yield before
        return
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(before)


def read_threads() -> int:
    """Decoding threads for this process's store reads (`softcache.store.shard_files`).

    The user's `SOFTCACHE_READ_THREADS` where set; else the count a training run set for its
    reads (`reading_threads`, `set_read_threads`); else the CPUs this process may run on,
    shared out among the processes `torchrun` started on this machine (each epoch starts with
    a read on every rank).

    Raises:
        ValueError: `SOFTCACHE_READ_THREADS` is not a whole number >= 1.
    """
    chosen = os.environ.get(READ_THREADS_ENV, "").strip()
    if chosen:
        if not chosen.isdigit() or int(chosen) < 1:
            raise ValueError(
                f"{READ_THREADS_ENV}={chosen!r}: give a number of decoding threads >= 1, or "
                "unset it"
            )
        return int(chosen)
    if _read_threads is not None:
        return _read_threads
    return max(1, usable_cores() // local_ranks())


def set_read_threads(count: int | None) -> int | None:
    """Set this process's decoding threads for the stores it opens from now on (None: the
    default); `SOFTCACHE_READ_THREADS` still wins. Returns the count set before.

    A training run's batch process calls it once, with its parent's count: it is the run's
    batch maker for the rest of its life.
    """
    global _read_threads
    if count is not None and count < 1:
        raise ValueError(f"decoding threads must be at least 1, got {count}")
    before, _read_threads = _read_threads, count
    return before


@contextlib.contextmanager
def reading_threads(count: int | None) -> Iterator[int]:
    """Open stores in the block with `count` decoding threads (None: as they are); restore the
    setting after. A store's reader keeps the count it was opened with.

    Yields:
        The decoding threads stores opened in the block get (`read_threads()`).
    """
    before = set_read_threads(count) if count is not None else _read_threads
    try:
        yield read_threads()
    finally:
        set_read_threads(before)


def batch_maker_read_threads(
    student: int, *, cpu_student: bool, workers: int, local_ranks: int = 1
) -> int:
    """Decoding threads for a training run's reads: the cores its student and workers leave.

    Args:
        student: the student's intra-op threads (`torch.get_num_threads()` as it trains).
        cpu_student: the student's ops run on the CPU; a GPU student's training thread takes
            one core whatever its intra-op count.
        workers: DataLoader worker processes (`num_workers`), a core each.
        local_ranks: training processes on this machine (torchrun's ``LOCAL_WORLD_SIZE``).

    Returns:
        The usable cores shared among the local ranks, less the student's and the workers',
        at least 1.
    """
    cores = usable_cores() // max(1, local_ranks)
    taken = (student if cpu_student else 1) + workers
    return max(1, cores - taken)
