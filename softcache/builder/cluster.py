"""A build on a Dask cluster: shard ranges as tasks, the teacher loaded once per worker.

This process creates the store and sets `complete`; each worker loads the teacher and the dataset
once and keeps them for its next tasks, and every shard is written by exactly one task. A task whose
worker dies is rerun elsewhere by Dask; it recomputes the shards of its range not yet recorded, so
the finished store is the one a single process writes. Workers rebuild the teacher and the dataset
from the config, so both must be spec strings (objects do not travel).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from softcache.builder.teacher import load_teacher, state_dict_sha256
from softcache.config import BuildConfig
from softcache.errors import SoftcacheError
from softcache.runtime.cluster import cluster_client, worker_device
from softcache.runtime.devices import resolve_device
from softcache.runtime.progress import Progress
from softcache.store import LogitStore

# Several tasks per worker balance the load and bound what a lost worker costs; a task of a few
# shards keeps the per-task overhead (opening the store, one round trip) small beside the teacher.
_TASKS_PER_WORKER = 4
_MAX_SHARDS_PER_TASK = 8


def task_ranges(todo: Sequence[int], workers: int, shards_per_task: int = 0) -> list[list[int]]:
    """Split the shards to compute into tasks of consecutive shards.

    Args:
        todo: shard indices still to compute, ascending.
        workers: workers in the cluster (at least 1).
        shards_per_task: shards per task; 0 picks about four tasks per worker (so a slow or lost
            worker holds up little) and at most eight shards per task.

    Returns:
        Lists of shard indices; each shard is in exactly one list.
    """
    size = shards_per_task or max(
        1, min(_MAX_SHARDS_PER_TASK, -(-len(todo) // (max(workers, 1) * _TASKS_PER_WORKER)))
    )
    return [list(todo[i : i + size]) for i in range(0, len(todo), size)]


def run_on_cluster(
    client: Any | None,
    config: BuildConfig,
    store: LogitStore,
    todo: Sequence[int],
    bar: Progress,
    *,
    gpus: bool = False,
    task: Callable[[BuildConfig, Sequence[int], str], int],
) -> None:
    """Compute the shards `todo` as Dask tasks of whole shard ranges, updating `bar` by rows.

    `client` None connects to `config.dask_scheduler` or starts a LocalCluster of
    `config.workers` (one per GPU with `gpus`), closed when done. `task(config, shards,
    teacher_sha256)` runs on a worker, writes the shards of its range not yet recorded and
    returns their rows (each layout has its own).
    """
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(
                cluster_client(address=config.dask_scheduler, workers=config.workers, gpus=gpus)
            )
        _submit_shards(client, config, store, todo, bar, task)


def _submit_shards(
    client: Any,
    config: BuildConfig,
    store: LogitStore,
    todo: Sequence[int],
    bar: Progress,
    task: Callable[[BuildConfig, Sequence[int], str], int],
) -> None:
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    workers = max(1, len(client.scheduler_info().get("workers", {})))
    tasks = task_ranges(todo, workers, config.shards_per_task)
    teacher_sha = store.meta.teacher["state_dict_sha256"]
    run_id = os.urandom(4).hex()  # task keys must be unique across builds sharing a cluster
    futures = [
        client.submit(
            task,
            config,
            shards,
            teacher_sha,
            key=f"softcache-build-{shards[0]}-{run_id}",
        )
        for shards in tasks
    ]
    try:
        for future in as_completed(futures):
            bar.update(future.result())
    except KilledWorker as exc:
        # Dask reruns a task whose worker died; after `distributed.scheduler.allowed-failures`
        # deaths (3 by default) it gives up on it.
        raise SoftcacheError(
            f"Dask workers kept dying while running {exc.task!r} (out of memory? see the worker "
            "logs); the shards recorded so far are kept: run the same command again to resume"
        ) from exc
    finally:
        client.cancel(futures)


# What a worker keeps between tasks: the last (teacher, dataset) it loaded, by their identity.
_WORKER_CACHE: dict[tuple[str, str, str, str], tuple[nn.Module, Any]] = {}


def worker_inputs(
    config: BuildConfig, teacher_sha256: str, make_dataset: Callable[[BuildConfig], Any]
) -> tuple[nn.Module, Any, torch.device]:
    """On a Dask worker: the teacher (checked against `teacher_sha256`), the dataset and the
    device, loaded once per worker and kept for its next tasks."""
    device = worker_device(resolve_device(config.device))
    key = (config.teacher, teacher_sha256, config.dataset, str(device))
    if key not in _WORKER_CACHE:
        _WORKER_CACHE.clear()  # one teacher at a time: a worker's memory stays one model
        teacher = load_teacher(config.teacher, device)
        sha = state_dict_sha256(teacher)
        if sha != teacher_sha256:
            raise SoftcacheError(
                f"the teacher {config.teacher!r} loads with other weights on a Dask worker "
                f"(state dict sha256 {sha[:12]}...) than where the build started "
                f"({teacher_sha256[:12]}...); give every worker the same checkpoint"
            )
        _WORKER_CACHE[key] = (teacher, make_dataset(config))
    teacher, dataset = _WORKER_CACHE[key]
    return teacher, dataset, device
