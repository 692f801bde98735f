"""The build frame: written once for every layout.

A build describes its store, opens (or resumes) it, computes the shards not yet recorded, here or
on a Dask cluster, and marks the store complete with its dataset fingerprint. What differs between
row stores and token stores (what the teacher sees, how a shard is computed, what is written before
the shards) is a layout object the frame calls: `softcache.builder.rows.RowBuild` or
`softcache.builder.tokens.TokenBuild`. A new layout is one new class.

Resume: shards are recorded in `shard_done` only after their data is written, so a build killed at any
moment (SIGKILL included) and started again with the same command skips the recorded shards, recomputes
the rest, and ends with the store an uninterrupted build writes. `complete` is set last.

Distributed (`workers` / `dask_scheduler`): the layout's shard task runs inside Dask tasks, one
task per range of whole shards (`softcache.builder.cluster`); the store is byte for byte the one a
single process writes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from softcache.builder.cluster import run_on_cluster
from softcache.builder.rows import RowBuild
from softcache.builder.tokens import TokenBuild
from softcache.config import BuildConfig
from softcache.errors import ConfigError, SoftcacheError
from softcache.runtime.devices import resolve_device
from softcache.runtime.progress import Progress
from softcache.runtime.specs import is_spec
from softcache.store import LogitStore, StoreMeta
from softcache.store.output import open_output
from softcache.store.writer import ShardWriter


class BuildLayout(Protocol):
    """What the frame needs from a layout (rows or tokens)."""

    #: what a store row is, for the progress rate: "samples" or "tokens"
    unit: str
    #: the progress bar's label
    label: str

    def prepare(self) -> StoreMeta:
        """Load the dataset and the teacher, and describe the store to write."""
        ...

    def on_open(self, store: LogitStore, done: np.ndarray) -> None:
        """Called with the opened store and its `done` mask, before any shard is computed."""
        ...

    def run(
        self, store: LogitStore, todo: Sequence[int], writer: ShardWriter, bar: Progress
    ) -> None:
        """Compute and submit the shards `todo` in this process."""
        ...

    def release_teacher(self) -> None:
        """Drop this process's teacher (a cluster's workers load their own)."""
        ...

    @staticmethod
    def shard_task(config: BuildConfig, shards: Sequence[int], teacher_sha256: str) -> int:
        """On a Dask worker: compute and write `shards` not yet recorded; return their rows."""
        ...

    def fingerprint(self, store: LogitStore) -> str:
        """The dataset fingerprint recorded at completion."""
        ...


@dataclass(frozen=True)
class BuildResult:
    """What a build did.

    Attributes:
        store: the store's location.
        num_samples: samples in the store (sequences, for a token store).
        shards_total: shards in the store.
        shards_written: shards this run computed.
        shards_skipped: shards a previous run had already written.
        bytes_stored: bytes on disk, all arrays.
        seconds: wall time of this run's teacher loop and writes.
        samples_computed: store rows this run computed (tokens, for a token store).
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
        config: the build configuration; `config.lm` picks the token layout (a causal LM over
            token sequences, one row per token), else one row per sample.
        progress: show a progress bar on stderr.
        client: a `distributed.Client` to run the build on (overrides `config.workers` and
            `config.dask_scheduler`); its workers must import softcache and the specs.

    Returns:
        A `BuildResult` summary (for a token store, `num_samples` counts sequences and
        `samples_computed` the tokens this run coded).

    Raises:
        SoftcacheError: bad specs, teacher output, dataset items or output path; the message says
            which and what to do. Shards written before the error stay written.
    """
    distributed = client is not None or config.distributed
    if distributed:
        _check_specs_travel(config)
    device = resolve_device(config.device)
    layout: BuildLayout = (TokenBuild if config.lm else RowBuild)(config, device, progress=progress)
    meta = layout.prepare()
    store = open_output(
        config.output,
        meta,
        overwrite=config.overwrite,
        compression_level=config.compression_level,
        storage_options=config.storage_options,
    )
    done = store.done_mask()
    layout.on_open(store, done)
    todo = [s for s in range(meta.num_shards) if not done[s]]
    rows_done = store.rows_in(np.flatnonzero(done).tolist())

    t0 = time.perf_counter()
    bar = Progress(
        meta.num_rows, layout.label, enabled=progress, initial=rows_done, unit=layout.unit
    )
    if distributed:
        layout.release_teacher()
        gpus = device.type == "cuda"
        run_on_cluster(client, config, store, todo, bar, gpus=gpus, task=layout.shard_task)
    else:
        with ShardWriter(store, threads=config.writer_threads) as writer:
            layout.run(store, todo, writer, bar)
    bar.close()
    seconds = time.perf_counter() - t0
    if not store.done_mask().all():  # pragma: no cover - a writer failure raises before this
        raise SoftcacheError("some shards were not recorded as written; run the command again")
    store.mark_complete(layout.fingerprint(store))
    return BuildResult(
        store=store.location,
        num_samples=meta.num_samples,
        shards_total=meta.num_shards,
        shards_written=len(todo),
        shards_skipped=meta.num_shards - len(todo),
        bytes_stored=store.nbytes_stored(),
        seconds=seconds,
        samples_computed=meta.num_rows - rows_done,
    )


def _check_specs_travel(config: BuildConfig) -> None:
    """A cluster's workers rebuild the teacher and the dataset from the config: specs only."""
    objects = [name for name in ("teacher", "dataset") if not is_spec(getattr(config, name))]
    if objects:
        raise ConfigError(
            f"a build on a Dask cluster needs importable specs for {' and '.join(objects)} "
            "('package.module:factory'): its workers rebuild them from the config, and Python "
            "objects do not travel; pass specs, or build in this process (no --workers / "
            "--dask-scheduler)"
        )
