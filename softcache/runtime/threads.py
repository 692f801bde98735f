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
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

# Environment variables by which a user (or torchrun) has already chosen the thread count.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


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
