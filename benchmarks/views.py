"""Multi-view builds: `softcache build --views V --augment SPEC` next to a bare loop over the views.

The issue's promise is that a multi-view build's throughput still follows the bare teacher forward.
The bare loop here is what any script that labels augmented views pays anyway: the same
`ViewDataset` (every sample's V views, each drawn from (seed, sample, view) and applied with the
built-in crop and flip) through a DataLoader of the same batch size, the teacher forward only under
`inference_mode`. The build adds what it adds for one view (hashes, encoding, writes, fixed costs)
plus the `view_params` array. A second figure puts the build next to V bare passes over the
unaugmented data, which prices the augmentation itself (the torch-op bilinear crop, per item).
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from benchmarks.build import BUILD_GOAL, BuildWorkload, forward_only
from benchmarks.harness import Figure, ratio_figure, timed
from softcache.builder import BuildResult, build
from softcache.data.augment import parse_augment
from softcache.data.views import ViewDataset
from softcache.runtime.specs import instantiate

AUGMENT = "crop(size=32,scale=0.35:1);flip"
SEED = 0


class ViewsBench:
    """Cases `bare-views` (forward over the views), `bare-plain` (V forwards over the raw data) and
    `build` (a dense store of V views per sample)."""

    warmup = True

    def __init__(self, workload: BuildWorkload, views: int, workdir: Path) -> None:
        self.workload = workload
        self.views = views
        self.workdir = workdir
        self.result: BuildResult | None = None
        self._count = itertools.count()

    def _forward(self, dataset: object, passes: int) -> None:
        w = self.workload
        teacher = instantiate(w.teacher, "teacher")
        for _ in range(passes):
            forward_only(teacher, dataset, w.batch_size, w.device)

    def _bare_views(self) -> None:
        data = instantiate(self.workload.dataset, "dataset")
        self._forward(ViewDataset(data, parse_augment(AUGMENT), self.views, SEED), 1)

    def _bare_plain(self) -> None:
        self._forward(instantiate(self.workload.dataset, "dataset"), self.views)

    def _build(self) -> None:
        path = self.workdir / f"views-{next(self._count)}.zarr"
        config = replace(
            self.workload.config("dense", path),
            views=self.views,
            augment=AUGMENT,
            augment_seed=SEED,
            shard_rows=self.workload.shard_rows * self.views,  # 512 samples a shard, as V = 1
        )
        self.result = build(config, progress=False)
        shutil.rmtree(path)

    def cases(self) -> dict[str, Callable[[], float]]:
        return {
            "bare-views": lambda: timed(self._bare_views),
            "bare-plain": lambda: timed(self._bare_plain),
            "build": lambda: timed(self._build),
        }

    def figures(self, samples: dict[str, list[float]]) -> list[Figure]:
        assert self.result is not None
        w, v = self.workload, self.views
        note = (
            f"V={v} views of N={self.result.num_samples} ({self.result.samples_computed} teacher "
            f"rows), {AUGMENT}, batch {w.batch_size}, dense fp16"
        )
        return [
            ratio_figure(
                f"build V={v} / bare loop over the same views",
                samples,
                "build",
                "bare-views",
                goal=BUILD_GOAL,
                note=note,
            ),
            ratio_figure(
                f"build V={v} / {v} bare passes, no augmentation",
                samples,
                "build",
                "bare-plain",
                goal=None,
                note=note + "; the difference is the augmentation's own cost",
            ),
            Figure(
                name=f"store size, V={v} views, dense fp16",
                value=self.result.bytes_per_sample,
                unit="B/sample",
                detail="on disk, all arrays incl. view_params (N x V x 5 float64) and V hashes",
            ),
        ]
