"""Dask clusters for softcache: connect to one, or start one on this machine.

softcache scales out on `dask.distributed` rather than on a job system of its own: a build is a set of
tasks (ranges of whole shards) that any worker can run and that Dask reruns elsewhere when a worker
dies. This module only makes or reaches the cluster; what runs on it lives with the job (`build.py`).

On a multi-GPU node `--workers N` starts one worker per GPU. With `dask-cuda` installed its
`LocalCUDACluster` pins each worker to one device (through `CUDA_VISIBLE_DEVICES`); without it,
plain workers are numbered 0..N-1 and `worker_device` gives worker i the device `cuda:i % count`.
"""

from __future__ import annotations

import contextlib
import logging
import zlib
from collections.abc import Iterator
from typing import Any

import torch

from softcache.errors import ConfigError

# A task's error reaches the user once, as softcache's one-line message; the workers' own logs
# ("Compute Failed" with a traceback) would repeat it as noise.
_QUIET = logging.CRITICAL


def connect(address: str) -> Any:
    """A `distributed.Client` for the scheduler at `address` (``tcp://host:port``).

    Raises:
        ConfigError: the scheduler does not answer within 10 s.
    """
    from distributed import Client

    try:
        return Client(address, timeout="10s")
    except OSError as exc:
        raise ConfigError(
            f"cannot reach the Dask scheduler at {address}: {exc}; start one with "
            "`dask scheduler` (and workers with `dask worker ADDRESS`), or use --workers N for a "
            "cluster on this machine"
        ) from exc


@contextlib.contextmanager
def cluster_client(
    *, address: str | None = None, workers: int = 0, gpus: bool = False
) -> Iterator[Any]:
    """A client for an existing scheduler, or for a `LocalCluster` started (and stopped) here.

    Args:
        address: an existing scheduler; wins over `workers`.
        workers: processes of a local cluster, one thread each (a teacher uses its own threads).
        gpus: the job runs on CUDA: prefer `dask_cuda.LocalCUDACluster` when it is installed.

    Yields:
        The connected `distributed.Client`; closed (with the local cluster) on exit.
    """
    if address:
        client = connect(address)
        try:
            yield client
        finally:
            client.close()
        return
    if workers < 1:
        raise ConfigError(f"workers must be >= 1 for a local cluster, got {workers}")
    from distributed import Client, LocalCluster

    cluster: Any
    if gpus and _has_dask_cuda():
        from dask_cuda import LocalCUDACluster

        cluster = LocalCUDACluster(
            n_workers=workers, threads_per_worker=1, dashboard_address=None, silence_logs=_QUIET
        )
    else:
        # One process per worker: a teacher holds the GIL through its Python glue, so threads of
        # one process would serialise; processes also make "a worker died" a real, testable event.
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=_QUIET,
        )
    try:
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


def worker_device(device: torch.device) -> torch.device:
    """The device this Dask worker should use for a job configured with `device`.

    An explicit index (``cuda:1``) is honoured. A bare ``cuda`` is spread over the visible GPUs by
    worker name (LocalCluster names workers 0..N-1), so N workers on an N-GPU node use one GPU each;
    under dask-cuda each worker sees one GPU and gets ``cuda:0``.
    """
    if device.type != "cuda" or device.index is not None:
        return device
    count = torch.cuda.device_count()
    if count <= 1:
        return torch.device("cuda", 0)
    from distributed import get_worker

    try:
        name = get_worker().name
    except ValueError:  # not on a worker
        return torch.device("cuda", 0)
    index = int(name) if str(name).isdigit() else zlib.crc32(str(name).encode())
    return torch.device("cuda", index % count)


def _has_dask_cuda() -> bool:
    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        return False
    return True
