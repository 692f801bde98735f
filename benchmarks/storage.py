"""Storage: bytes per sample on disk for each encoding, and what each codec choice compresses to.

These are sizes, not timings: one build per variant, no rounds. The stores are real
(`softcache.build` over `benchmarks.models:teacher_peaked`, 1,000 classes), because how well zstd
does depends on the values: the synthetic teacher's logits are peaked like a trained classifier's
(the detail of the dense row gives its mean top-1 probability and top-5 mass, measured on the store).

- Size rows: dense fp16, and top-k fp16 for k = 1, 5, 10, 32, 100, in bytes per sample of
  `LogitStore.nbytes_stored()` (every array, zstd + crc32c, plus the store's fixed metadata, whose
  share the detail states: it vanishes at large N). The detail gives the share of the teacher's
  probability mass the k kept entries hold, so size can be read against fidelity.
- Compression rows: `nbytes_logical() / nbytes_stored()` of a dense store for each value dtype
  (float16, bfloat16, float32 at the default level 3) and each zstd level (1, 3, 9, 19 at float16):
  the build options that change the bytes (`BuildConfig.dtype`, `BuildConfig.compression_level`).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.build import BuildWorkload, fresh_store
from benchmarks.harness import Figure
from softcache.store import LOGITS, LogitStore

TOP_KS = (1, 5, 10, 32, 100)
DTYPES = ("float16", "bfloat16", "float32")
LEVELS = (1, 3, 9, 19)


@dataclass(frozen=True)
class StoreSize:
    """What one store takes.

    Attributes:
        num_samples: N.
        logical: `nbytes_logical()`: the per-row arrays uncompressed.
        stored: `nbytes_stored()`: every array on disk, metadata included.
        data: the per-row arrays' shard objects alone (stored minus metadata and `shard_done`).
        row_bytes: uncompressed bytes of one row, per array.
    """

    num_samples: int
    logical: int
    stored: int
    data: int
    row_bytes: dict[str, int]

    @property
    def per_sample(self) -> float:
        return self.stored / self.num_samples

    @property
    def compression(self) -> float:
        return self.logical / self.stored

    @property
    def fixed_per_sample(self) -> float:
        """Bytes per sample of the store's fixed metadata (zarr.json files, `shard_done`)."""
        return (self.stored - self.data) / self.num_samples


def measure(store: LogitStore) -> StoreSize:
    """Sizes of a complete store."""
    layout = store.row_layout()  # every per-row array, sample_hash included
    data = sum(
        store.shard_object_size(name, shard) or 0
        for name in layout
        for shard in range(store.meta.num_shards)
    )
    return StoreSize(
        num_samples=store.meta.num_samples,
        logical=store.nbytes_logical(),
        stored=store.nbytes_stored(),
        data=data,
        row_bytes={
            name: math.prod(shape) * dtype.itemsize for name, (shape, dtype) in layout.items()
        },
    )


class StorageBench:
    """Builds its stores while being set up; no timed cases.

    Args:
        teacher: teacher spec (peaked logits, 1,000 classes).
        dataset: dataset spec.
        workdir: where the stores are built (each is removed once measured).
        shard_rows: rows per shard (inner chunks are min(shard_rows, 1024) rows).
    """

    warmup = False

    def __init__(
        self, teacher: str, dataset: str, workdir: Path, *, shard_rows: int = 1024
    ) -> None:
        self.workload = BuildWorkload(
            "", teacher, dataset, batch_size=1024, shard_rows=shard_rows, goal=None
        )
        self.workdir = workdir
        self.dense = self._size(self.workload, "dense", keep=True)
        self.topk = {k: self._size(replace(self.workload, top_k=k), "topk") for k in TOP_KS}
        self.dtypes = {dtype: self._dense_variant(dtype=dtype) for dtype in DTYPES}
        self.levels = {level: self._dense_variant(compression_level=level) for level in LEVELS}

    def _dense_variant(self, **changes: Any) -> StoreSize:
        """A dense store with some build settings changed (the default one is not rebuilt)."""
        workload = replace(self.workload, **changes)
        return self.dense if workload == self.workload else self._size(workload, "dense")

    def _size(self, workload: BuildWorkload, encoding: str, *, keep: bool = False) -> StoreSize:
        path = fresh_store(workload, encoding, self.workdir / f"storage-{encoding}.zarr")
        store = LogitStore.open(path)
        size = measure(store)
        if keep:
            self.mass = probability_mass(store, TOP_KS)
        shutil.rmtree(path)
        return size

    def cases(self) -> dict[str, Callable[[], float]]:
        return {}

    def figures(self, samples: dict[str, list[float]]) -> list[Figure]:
        dense = self.dense
        n = dense.num_samples
        mass = self.mass
        figures = [
            Figure(
                name="storage, dense fp16",
                value=dense.per_sample,
                unit="B/sample",
                detail=(
                    f"{_row(dense)}; compression {dense.compression:.2f}x; "
                    f"{dense.fixed_per_sample:.1f} B/sample fixed metadata; teacher: mean top-1 "
                    f"p {mass[1]:.2f}, top-5 mass {mass[5]:.2f}; N={n}, C=1000"
                ),
                samples={"bytes": [dense.stored]},
            )
        ]
        for k, size in self.topk.items():
            figures.append(
                Figure(
                    name=f"storage, top-{k} fp16",
                    value=size.per_sample,
                    unit="B/sample",
                    detail=(
                        f"{size.per_sample / dense.per_sample:.1%} of dense; keeps "
                        f"{mass[k]:.1%} of the probability mass; {_row(size)}; compression "
                        f"{size.compression:.2f}x; {size.fixed_per_sample:.1f} B/sample fixed"
                    ),
                    samples={"bytes": [size.stored]},
                )
            )
        w = self.workload
        for dtype, size in self.dtypes.items():
            name = f"compression, dense {dtype} zstd-{w.compression_level}"
            figures.append(_compression(name, size))
        for level, size in self.levels.items():
            figures.append(_compression(f"compression, dense {w.dtype} zstd-{level}", size))
        return figures


def probability_mass(store: LogitStore, ks: tuple[int, ...]) -> dict[int, float]:
    """Mean share of the softmax (T = 1) that a row's k largest entries hold, for each k."""
    logits = store.decode_values(store.read(LOGITS)).astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    ranked = -np.sort(-probs, axis=1)
    cumulative = ranked.cumsum(axis=1)
    return {k: float(cumulative[:, k - 1].mean()) for k in ks}


def _row(size: StoreSize) -> str:
    arrays = " + ".join(f"{b} {name}" for name, b in size.row_bytes.items())
    return f"raw row {sum(size.row_bytes.values())} B ({arrays})"


def _compression(name: str, size: StoreSize) -> Figure:
    return Figure(
        name=name,
        value=size.compression,
        detail=(
            f"nbytes_logical / nbytes_stored = {size.logical / 1e6:.2f} MB / "
            f"{size.stored / 1e6:.2f} MB; {size.per_sample:.1f} B/sample; N={size.num_samples}"
        ),
        samples={"logical": [size.logical], "stored": [size.stored]},
    )
