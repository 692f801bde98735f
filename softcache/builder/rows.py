"""`softcache build`: run the teacher over a dataset once and write its logits into a store.

The loop: a DataLoader feeds the device with shard-aligned batches (a batch never crosses a shard
boundary, so a resumed or distributed build feeds every row the same batch composition and produces the
same bits); the teacher runs under `inference_mode` (autocast on CUDA when asked); encoding (top-k,
log-sum-exp, dtype cast) runs on the device; results cross to the host through pinned buffers, one
batch behind the forward pass; full shards go to background writer threads.

Resume: shards are recorded in `shard_done` only after their data is written, so a build killed at any
moment (SIGKILL included) and started again with the same command skips the recorded shards, recomputes
the rest, and ends with the store an uninterrupted build writes. `complete` is set last.

Distributed (`workers` / `dask_scheduler`): the same loop runs inside Dask tasks, one task per range
of whole shards. This process creates the store and sets `complete`; each worker loads the teacher
and the dataset once and keeps them for its next tasks, and every shard is written by exactly one
task. A task whose worker dies is rerun elsewhere by Dask; it recomputes the shards of its range not
yet recorded, so the finished store is the one a single process writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from softcache._version import __version__
from softcache.config import BuildConfig
from softcache.data.hashing import check_item, collate_with_hashes, fingerprint
from softcache.errors import (
    ConfigError,
    DatasetFormatError,
    SoftcacheError,
    SpecError,
    TeacherOutputError,
)
from softcache.runtime.cluster import cluster_client, worker_device
from softcache.runtime.devices import autocast, resolve_device
from softcache.runtime.progress import Progress
from softcache.runtime.specs import instantiate
from softcache.store import (
    SAMPLE_HASH,
    SHARD_DONE,
    VIEW_PARAMS,
    LogitStore,
    StoreMeta,
)
from softcache.store.output import open_output
from softcache.store.row_codec import NONFINITE, OVERFLOW, copy_encoded, encode_batch
from softcache.store.writer import ShardWriter


@dataclass(frozen=True)
class BuildResult:
    """What a build did.

    Attributes:
        store: the store's location.
        num_samples: rows in the store.
        shards_total: shards in the store.
        shards_written: shards this run computed.
        shards_skipped: shards a previous run had already written.
        bytes_stored: bytes on disk, all arrays.
        seconds: wall time of this run's teacher loop and writes.
        samples_computed: rows this run pushed through the teacher.
    """

    store: str
    num_samples: int
    shards_total: int
    shards_written: int
    shards_skipped: int
    bytes_stored: int
    seconds: float
    samples_computed: int

    @property
    def bytes_per_sample(self) -> float:
        return self.bytes_stored / self.num_samples

    @property
    def samples_per_second(self) -> float:
        return self.samples_computed / self.seconds if self.seconds > 0 else float("nan")


def build(config: BuildConfig, *, progress: bool = True, client: Any | None = None) -> BuildResult:
    """Run the teacher over the dataset and write (or finish) the store.

    Args:
        config: the build configuration.
        progress: show a progress bar on stderr.
        client: a `distributed.Client` to run the build on (overrides `config.workers` and
            `config.dask_scheduler`); its workers must import softcache and the specs.

    Returns:
        A `BuildResult` summary.

    Raises:
        SoftcacheError: bad specs, teacher output, dataset items or output path; the message says
            which and what to do. Shards written before the error stay written.
    """
    device = resolve_device(config.device)
    dataset, num_samples, augmentation = teacher_inputs(config)
    teacher = load_teacher(config.teacher, device)
    num_classes = _probe_classes(teacher, dataset, device, config)
    if config.encoding == "topk" and config.top_k > num_classes:
        raise ConfigError(
            f"--top-k {config.top_k} exceeds the teacher's {num_classes} classes; "
            f"use --top-k {num_classes} or less (or --encoding dense)"
        )
    meta = StoreMeta(
        encoding=config.encoding,
        num_classes=num_classes,
        k=config.top_k if config.encoding == "topk" else None,
        num_samples=num_samples,
        value_dtype=config.dtype,
        temperatures=config.temperatures if config.encoding == "topk" else (),
        shard_rows=config.shard_rows,
        chunk_rows=config.effective_chunk_rows,
        teacher={
            "spec": config.teacher,
            "num_parameters": sum(p.numel() for p in teacher.parameters()),
            "state_dict_sha256": state_dict_sha256(teacher),
        },
        dataset={"spec": config.dataset, "num_samples": num_samples, "fingerprint": None},
        build_config={k: v for k, v in config.to_dict().items() if k != "overwrite"},
        softcache_version=__version__,
        views=config.views,
        augmentation=augmentation,
    )
    store = open_output(
        config.output,
        meta,
        overwrite=config.overwrite,
        compression_level=config.compression_level,
        storage_options=config.storage_options,
    )
    done = store.done_mask()
    todo = [s for s in range(meta.num_shards) if not done[s]]
    rows_done = store.rows_in(np.flatnonzero(done).tolist())

    t0 = time.perf_counter()
    bar = Progress(meta.num_rows, "build", enabled=progress, initial=rows_done)
    if client is not None or config.distributed:
        del teacher  # the workers load their own
        run_on_cluster(client, config, store, todo, bar, gpus=device.type == "cuda")
    else:
        with ShardWriter(store, threads=config.writer_threads) as writer:
            _run_teacher(teacher, dataset, store, todo, device, config, writer, bar)
    bar.close()
    seconds = time.perf_counter() - t0
    if not store.done_mask().all():  # pragma: no cover - a writer failure raises before this
        raise SoftcacheError("some shards were not recorded as written; run the command again")
    store.mark_complete(fingerprint(store.sample_hashes()))
    return BuildResult(
        store=store.location,
        num_samples=num_samples,
        shards_total=meta.num_shards,
        shards_written=len(todo),
        shards_skipped=meta.num_shards - len(todo),
        bytes_stored=store.nbytes_stored(),
        seconds=seconds,
        samples_computed=meta.num_rows - rows_done,
    )


class ShardBatches:
    """Index lists of shard-aligned batches (a batch never crosses a shard boundary), made lazily.

    A DataLoader `batch_sampler`. Lazy so that a build holds O(batch) indices, not O(N): at tens of
    millions of rows, a list of every batch's Python ints would cost gigabytes.

    Args:
        store: the store (for shard bounds).
        shards: the shards to cover, in order.
        batch_size: rows per batch (the last batch of each shard may be shorter).
    """

    def __init__(self, store: LogitStore, shards: Sequence[int], batch_size: int) -> None:
        self.bounds = [store.shard_bounds(s) for s in shards]
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start, stop in self.bounds:
            for b in range(start, stop, self.batch_size):
                yield list(range(b, min(b + self.batch_size, stop)))

    def __len__(self) -> int:
        return sum(-(-(stop - start) // self.batch_size) for start, stop in self.bounds)


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- on a Dask cluster --------------------------------------------------------------------------

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
    task: Callable[[BuildConfig, Sequence[int], str], int] | None = None,
) -> None:
    """Compute the shards `todo` as Dask tasks of whole shard ranges, updating `bar` by rows.

    `client` None connects to `config.dask_scheduler` or starts a LocalCluster of
    `config.workers` (one per GPU with `gpus`), closed when done. `task(config, shards,
    teacher_sha256)` runs on a worker, writes the shards of its range not yet recorded and
    returns their rows (default: the row build's).
    """
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(
                cluster_client(address=config.dask_scheduler, workers=config.workers, gpus=gpus)
            )
        _submit_shards(client, config, store, todo, bar, task or _shard_task)


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


def _shard_task(config: BuildConfig, shards: Sequence[int], teacher_sha256: str) -> int:
    """On a Dask worker: compute and write `shards` not yet recorded; return the rows written."""
    teacher, dataset, device = worker_inputs(config, teacher_sha256, lambda c: teacher_inputs(c)[0])
    store = LogitStore.open(
        config.output, mode="r+", require_complete=False, storage_options=config.storage_options
    )
    if len(dataset) != store.meta.num_rows:
        raise DatasetFormatError(
            f"dataset {config.dataset!r} has {len(dataset) // store.meta.views} samples on a Dask "
            f"worker but {store.meta.num_samples} where the build started; give every worker the "
            "same data"
        )
    # A rerun task (its first worker died) skips what that worker had already recorded.
    todo = [s for s in shards if not store.read(SHARD_DONE, slice(s, s + 1))[0]]
    with ShardWriter(store, threads=config.writer_threads) as writer:
        quiet = Progress(0, "", enabled=False)
        _run_teacher(teacher, dataset, store, todo, device, config, writer, quiet)
    return store.rows_in(shards)


# ---- the loop ----------------------------------------------------------------------------------


@dataclass
class _Pending:
    """A batch whose encoded results are on their way to the host."""

    shard: int
    offset: int
    indices: list[int]
    host: dict[str, torch.Tensor]
    hashes: np.ndarray
    event: Any


def _run_teacher(
    teacher: nn.Module,
    dataset: Any,
    store: LogitStore,
    todo: Sequence[int],
    device: torch.device,
    config: BuildConfig,
    writer: ShardWriter,
    bar: Progress,
) -> None:
    meta = store.meta
    cuda = device.type == "cuda"
    batches = ShardBatches(store, todo, config.batch_size)
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_with_hashes,
        num_workers=config.num_workers,
        pin_memory=cuda,
    )
    index_dtype = torch.int16 if meta.index_dtype == np.uint16 else torch.int32
    buffers: dict[int, dict[str, np.ndarray]] = {}
    filled: dict[int, int] = {}
    pending: _Pending | None = None

    def finish(p: _Pending) -> None:
        if p.event is not None:
            p.event.synchronize()
        _check_flags(p, store)
        if p.shard not in buffers:
            buffers[p.shard] = store.empty_shard(p.shard)
        buf = buffers[p.shard]
        n = len(p.indices)
        copy_encoded(p.host, buf, p.offset)
        buf[SAMPLE_HASH][p.offset : p.offset + n] = p.hashes
        if VIEW_PARAMS in buf:
            buf[VIEW_PARAMS][p.offset : p.offset + n] = dataset.params(p.indices)
        filled[p.shard] = filled.get(p.shard, 0) + n
        start, stop = store.shard_bounds(p.shard)
        if filled[p.shard] == stop - start:
            writer.submit(p.shard, buffers.pop(p.shard))
        bar.update(n)

    with torch.inference_mode():
        for indices, (inputs, _labels, hashes) in zip(batches, loader, strict=True):
            shard = indices[0] // meta.shard_rows
            offset = indices[0] - shard * meta.shard_rows
            x = inputs.to(device, non_blocking=cuda)
            with autocast(device, config.amp):
                try:
                    logits = teacher(x)
                except Exception as exc:
                    raise TeacherOutputError(
                        f"the teacher failed on the batch of samples {indices[0]}..{indices[-1]} "
                        f"(input shape {tuple(x.shape)}): {type(exc).__name__}: {exc}"
                    ) from exc
            _check_output(logits, len(indices), meta.num_classes, indices[0])
            encoded = encode_batch(
                logits,
                encoding=meta.encoding,
                value_dtype=meta.value_dtype,
                k=meta.k,
                temperatures=meta.temperatures,
                index_dtype=index_dtype,
            )
            host, event = _to_host(encoded, cuda)
            if pending is not None:
                finish(pending)  # overlaps the previous batch's copy with this forward pass
            pending = _Pending(shard, offset, indices, host, hashes, event)
            writer.raise_failures()
        if pending is not None:
            finish(pending)


def _to_host(tensors: dict[str, torch.Tensor], cuda: bool) -> tuple[dict[str, torch.Tensor], Any]:
    if not cuda:
        return {k: v.detach() for k, v in tensors.items()}, None
    host = {
        k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
        for k, v in tensors.items()
    }
    event = torch.cuda.Event()
    event.record()
    return host, event


def _check_flags(p: _Pending, store: LogitStore) -> None:
    bad = p.host[NONFINITE].numpy()
    if bad.any():
        first = p.indices[int(np.argmax(bad))]
        raise TeacherOutputError(
            f"the teacher produced non-finite logits (NaN or inf) for sample {first} (the first bad "
            "sample); fix the input and run the same command again to resume (a changed teacher "
            "needs --overwrite)"
        )
    over = p.host[OVERFLOW].numpy()
    if over.any():
        first = p.indices[int(np.argmax(over))]
        raise TeacherOutputError(
            f"sample {first}: a logit overflows {store.meta.value_dtype}; "
            "rebuild with --dtype float32 or --dtype bfloat16 (and --overwrite)"
        )


def _check_output(logits: Any, batch: int, num_classes: int, first_index: int) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TeacherOutputError(
            f"the teacher returned a {type(logits).__name__}; it must return a (B, C) logits tensor"
        )
    if logits.ndim != 2 or logits.shape[0] != batch or logits.shape[1] != num_classes:
        raise TeacherOutputError(
            f"the teacher returned shape {tuple(logits.shape)} for the batch starting at sample "
            f"{first_index}; expected ({batch}, {num_classes}) = (batch, classes)"
        )


# ---- setup -------------------------------------------------------------------------------------


def teacher_inputs(config: BuildConfig) -> tuple[Any, int, dict[str, Any] | None]:
    """What the teacher runs over: the dataset, or its augmented views.

    Returns:
        The dataset of store rows (a `ViewDataset` when `config.augment` is set), the number of
        samples, and the augmentation's metadata for the store (None without one).
    """
    dataset = instantiate(config.dataset, "dataset")
    num_samples = _check_dataset(dataset, config.dataset)
    if not config.augment:
        return dataset, num_samples, None
    from softcache.data.augment import describe, parse_augment
    from softcache.data.views import ViewDataset

    augmentation = parse_augment(config.augment)
    rows = ViewDataset(dataset, augmentation, config.views, config.augment_seed)
    meta = {
        "spec": describe(augmentation)["spec"],
        "param_names": list(augmentation.param_names),
        "seed": config.augment_seed,
    }
    return rows, num_samples, meta


def _check_dataset(dataset: Any, spec: str) -> int:
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise DatasetFormatError(
            f"dataset factory {spec!r} returned a {type(dataset).__name__}; expected a map-style "
            "dataset (with __len__ and __getitem__)"
        )
    n = len(dataset)
    if n == 0:
        raise DatasetFormatError(f"dataset {spec!r} is empty")
    check_item(dataset[0], 0)
    return n


def load_teacher(spec: str, device: torch.device) -> nn.Module:
    """Instantiate a teacher spec, in eval mode on `device`."""
    teacher = instantiate(spec, "teacher")
    if not isinstance(teacher, nn.Module):
        raise SpecError(
            f"teacher factory {spec!r} returned a {type(teacher).__name__}, not an nn.Module"
        )
    return teacher.eval().to(device)


def _probe_classes(
    teacher: nn.Module, dataset: Any, device: torch.device, config: BuildConfig
) -> int:
    """Run one sample through the teacher to learn C (and fail early on a wrong output)."""
    inputs, _, _ = collate_with_hashes([dataset[0]])
    with torch.inference_mode(), autocast(device, config.amp):
        try:
            out = teacher(inputs.to(device))
        except Exception as exc:
            raise TeacherOutputError(
                f"the teacher failed on sample 0 (input shape {tuple(inputs.shape)}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TeacherOutputError(
            f"the teacher returned {shape} for a batch of 1; it must return (B, C) logits"
        )
    return int(out.shape[1])
