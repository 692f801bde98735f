"""The row layout of a build: a teacher's (B, C) logits, one store row per sample (or view).

The loop: a DataLoader feeds the device with shard-aligned batches (a batch never crosses a shard
boundary, so a resumed or distributed build feeds every row the same batch composition and produces the
same bits); the teacher runs under `inference_mode` (autocast on CUDA when asked); encoding (top-k,
log-sum-exp, dtype cast) runs on the device; results cross to the host through pinned buffers, one
batch behind the forward pass; full shards go to background writer threads. With `augment`, the
teacher sees `views` augmented views of every sample, and the store keeps the parameters of each.

Resume, the cluster and completion are the build frame's (`softcache.builder.frame`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from softcache.builder.cluster import worker_inputs
from softcache.builder.teacher import load_teacher, provenance
from softcache.config import BuildConfig
from softcache.data.hashing import check_item, collate_with_hashes, fingerprint
from softcache.errors import (
    ConfigError,
    DatasetFormatError,
    TeacherOutputError,
)
from softcache.runtime.devices import autocast
from softcache.runtime.progress import Progress
from softcache.runtime.specs import describe as describe_spec
from softcache.runtime.specs import resolve
from softcache.store import (
    SAMPLE_HASH,
    SHARD_DONE,
    VIEW_PARAMS,
    LogitStore,
    StoreMeta,
)
from softcache.store.row_codec import NONFINITE, OVERFLOW, copy_encoded, encode_batch
from softcache.store.writer import ShardWriter


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
    dataset = resolve(config.dataset, "dataset")
    num_samples = _check_dataset(dataset, describe_spec(config.dataset))
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


# ---- the strategy -------------------------------------------------------------------------------


class RowBuild:
    """The build frame's strategy for row stores (see `softcache.builder.frame.BuildLayout`)."""

    unit = "samples"
    label = "build"

    def __init__(self, config: BuildConfig, device: torch.device, *, progress: bool) -> None:
        self.config = config
        self.device = device
        self.dataset: Any = None
        self.teacher: nn.Module | None = None

    def prepare(self) -> StoreMeta:
        """Load the dataset and the teacher, probe C, and describe the store to write."""
        config = self.config
        self.dataset, num_samples, augmentation = teacher_inputs(config)
        self.teacher = load_teacher(config.teacher, self.device)
        num_classes = _probe_classes(self.teacher, self.dataset, self.device, config)
        if config.encoding == "topk" and config.top_k > num_classes:
            raise ConfigError(
                f"--top-k {config.top_k} exceeds the teacher's {num_classes} classes; "
                f"use --top-k {num_classes} or less (or --encoding dense)"
            )
        return StoreMeta(
            encoding=config.encoding,
            num_classes=num_classes,
            k=config.top_k if config.encoding == "topk" else None,
            value_dtype=config.dtype,
            temperatures=config.temperatures if config.encoding == "topk" else (),
            views=config.views,
            augmentation=augmentation,
            **provenance(config, self.teacher, num_samples),
        )

    def on_open(self, store: LogitStore, done: np.ndarray) -> None:
        """Nothing to write before the shards: each shard carries its rows' hashes."""

    def release_teacher(self) -> None:
        self.teacher = None  # the cluster's workers load their own

    def run(
        self, store: LogitStore, todo: Sequence[int], writer: ShardWriter, bar: Progress
    ) -> None:
        assert self.teacher is not None
        _run_teacher(self.teacher, self.dataset, store, todo, self.device, self.config, writer, bar)

    @staticmethod
    def shard_task(config: BuildConfig, shards: Sequence[int], teacher_sha256: str) -> int:
        """On a Dask worker: compute and write `shards` not yet recorded; return their rows."""
        return _shard_task(config, shards, teacher_sha256)

    def fingerprint(self, store: LogitStore) -> str:
        return fingerprint(store.sample_hashes())
