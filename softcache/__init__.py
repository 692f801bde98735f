"""softcache: offline soft-label caching for knowledge distillation.

Build a teacher's logits once into a Zarr store (`build`), then train students from it many times
(`train`, or your own loop with `AlignedBatches` and `distillation_loss`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from softcache._version import __version__
from softcache.config import BuildConfig, TrainConfig, load_config
from softcache.errors import (
    DatasetMismatchError,
    IncompleteStoreError,
    SoftcacheError,
    StoreFormatError,
)
from softcache.losses import hard_loss, kd_loss_dense, kd_loss_topk
from softcache.store import LogitStore, StoreMeta
from softcache.trainer.distill import AlignedBatches, distillation_loss
from softcache.trainer.plan import EpochPlan
from softcache.trainer.stream import SoftLabels, SoftLabelStream

if TYPE_CHECKING:  # the heavy modules load on first use
    from softcache.builder.rows import BuildResult
    from softcache.trainer.rows import TrainResult


def open_store(path: str, *, require_complete: bool = True) -> LogitStore:
    """Open a store for reading (see `LogitStore.open`)."""
    return LogitStore.open(path, mode="r", require_complete=require_complete)


def build(config: BuildConfig, *, progress: bool = True) -> BuildResult:
    """Run `softcache build` from Python (see `softcache.build.build`)."""
    from softcache.builder.rows import build as _build

    return _build(config, progress=progress)


def train(config: TrainConfig, *, progress: bool = True, client: Any | None = None) -> TrainResult:
    """Run `softcache train` from Python (see `softcache.train.train`)."""
    from softcache.trainer.rows import train as _train

    return _train(config, progress=progress, client=client)


__all__ = [
    "AlignedBatches",
    "BuildConfig",
    "DatasetMismatchError",
    "EpochPlan",
    "IncompleteStoreError",
    "LogitStore",
    "SoftLabelStream",
    "SoftLabels",
    "SoftcacheError",
    "StoreFormatError",
    "StoreMeta",
    "TrainConfig",
    "__version__",
    "build",
    "distillation_loss",
    "hard_loss",
    "kd_loss_dense",
    "kd_loss_topk",
    "load_config",
    "open_store",
    "train",
]
