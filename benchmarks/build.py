"""Build overhead: `softcache.builder.build` next to a bare forward loop of the same teacher.

The bare loop is what any inference script pays anyway: the same dataset through a DataLoader of
the same batch size, the teacher under `torch.inference_mode()`, forward only, keeping nothing.
`build` adds the input hashes, the on-device encoding, the host copies, compression and writes (in
background threads), and its fixed costs (store creation, teacher hash, completion record). Its
wall time includes everything `build()` does from call to return.
"""

from __future__ import annotations

import itertools
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from benchmarks.harness import Figure, ratio_figure, timed
from softcache.builder import BuildResult, build
from softcache.config import BuildConfig
from softcache.runtime.specs import instantiate
from softcache.store import LogitStore

BUILD_GOAL = 1.05


@dataclass(frozen=True)
class BuildWorkload:
    """A teacher and a dataset to build stores from.

    Attributes:
        label: prefixes the figure names ("" for the main workload, "digits" for the bundled one).
        teacher: teacher spec.
        dataset: dataset spec.
        batch_size: teacher batch size (bare loop and build alike).
        shard_rows: rows per shard of the stores.
        top_k: k of the top-k store.
        dtype: how logit values are stored (`BuildConfig.dtype`).
        compression_level: zstd level (`BuildConfig.compression_level`).
        goal: the goal the ratios are held to, or None for informational figures.
        note: appended to the ratios' detail.
        device: where the teacher runs, in the build and the bare loop alike.
    """

    label: str
    teacher: str
    dataset: str
    batch_size: int = 128
    shard_rows: int = 512
    top_k: int = 5
    dtype: str = "float16"
    compression_level: int = 3
    goal: float | None = BUILD_GOAL
    note: str = ""
    device: str = "cpu"

    def config(self, encoding: str, output: Path) -> BuildConfig:
        return BuildConfig(
            teacher=self.teacher,
            dataset=self.dataset,
            output=str(output),
            encoding=encoding,
            top_k=self.top_k,
            dtype=self.dtype,
            compression_level=self.compression_level,
            batch_size=self.batch_size,
            shard_rows=self.shard_rows,
            device=self.device,
        )


def bare_loop(teacher_spec: str, dataset_spec: str, batch_size: int, device: str = "cpu") -> None:
    """The baseline: instantiate the teacher and dataset, run every batch forward, keep nothing."""
    forward_only(
        instantiate(teacher_spec, "teacher"),
        instantiate(dataset_spec, "dataset"),
        batch_size,
        device,
    )


def forward_only(teacher: torch.nn.Module, dataset: Any, batch_size: int, device: str) -> None:
    """Every batch of `dataset` through `teacher` on `device` (pinned copies on CUDA), nothing kept."""
    teacher = teacher.eval().to(device)
    cuda = device.startswith("cuda")
    loader = DataLoader(dataset, batch_size=batch_size, pin_memory=cuda)
    with torch.inference_mode():
        for inputs, _ in loader:
            teacher(inputs.to(device, non_blocking=cuda))


class BuildBench:
    """Cases `bare`, `dense` and `topk` over one workload; every build writes a fresh store."""

    warmup = True

    def __init__(self, workload: BuildWorkload, workdir: Path) -> None:
        self.workload = workload
        self.workdir = workdir
        self.results: dict[str, BuildResult] = {}
        self.raw_bytes: dict[str, int] = {}
        self._count = itertools.count()

    def _build(self, encoding: str) -> float:
        path = self.workdir / f"build-{encoding}-{next(self._count)}.zarr"
        config = self.workload.config(encoding, path)
        seconds = timed(lambda: self.results.__setitem__(encoding, build(config, progress=False)))
        self.raw_bytes[encoding] = sum(
            math.prod(shape) * dtype.itemsize
            for shape, dtype in LogitStore.open(path).row_layout().values()
        )
        shutil.rmtree(path)
        return seconds

    def cases(self) -> dict[str, Callable[[], float]]:
        w = self.workload
        return {
            "bare": lambda: timed(lambda: bare_loop(w.teacher, w.dataset, w.batch_size, w.device)),
            "dense": lambda: self._build("dense"),
            "topk": lambda: self._build("topk"),
        }

    def figures(self, samples: dict[str, list[float]]) -> list[Figure]:
        w = self.workload
        prefix = f"{w.label} " if w.label else ""
        n = self.results["dense"].num_samples
        note = f"N={n}, batch {w.batch_size}" + (f"; {w.note}" if w.note else "")
        figures = [
            ratio_figure(
                f"{prefix}build / bare loop, dense",
                samples,
                "dense",
                "bare",
                goal=w.goal,
                note=note,
            ),
            ratio_figure(
                f"{prefix}build / bare loop, top-{w.top_k}",
                samples,
                "topk",
                "bare",
                goal=w.goal,
                note=note,
            ),
        ]
        for encoding, what in (("dense", "dense fp16"), ("topk", f"top-{w.top_k} fp16")):
            result = self.results[encoding]
            figures.append(
                Figure(
                    name=f"{prefix}store size, {what}",
                    value=result.bytes_per_sample,
                    unit="B/sample",
                    detail=(
                        f"on disk, all arrays; {self.raw_bytes[encoding]} B/sample before "
                        "zstd + crc32c, of which 8 B sample_hash"
                    ),
                )
            )
        return figures


def fresh_store(workload: BuildWorkload, encoding: str, path: Path) -> Path:
    """Build a store once, untimed (for the benchmarks that read stores)."""
    build(replace(workload.config(encoding, path), overwrite=True), progress=False)
    return path
