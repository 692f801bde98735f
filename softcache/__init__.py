"""softcache: offline soft-label caching for knowledge distillation.

Build a teacher's logits once into a Zarr store (`build`), then train students from it many times
(`train`, or your own loop with `AlignedBatches` and `distillation_loss`).

The names below load on first use (PEP 562), so `import softcache` and `softcache --help` do not
pay for torch, zarr and dask until a command or a name needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from softcache._version import __version__

if TYPE_CHECKING:
    from softcache.builder import BuildResult
    from softcache.config import BuildConfig, TrainConfig, load_config
    from softcache.errors import (
        DatasetMismatchError,
        IncompleteStoreError,
        SoftcacheError,
        StoreFormatError,
    )
    from softcache.losses import hard_loss, kd_loss_dense, kd_loss_topk
    from softcache.store import LogitStore, StoreMeta
    from softcache.trainer import TrainResult
    from softcache.trainer.distill import (
        AlignedBatches,
        AlignedTokenBatches,
        distillation_loss,
        token_distillation_loss,
    )
    from softcache.trainer.loop import EpochHook
    from softcache.trainer.plan import EpochPlan
    from softcache.trainer.stream import SoftLabels, SoftLabelStream
    from softcache.trainer.token_targets import TokenTargets

# name -> the module that defines it
_LAZY = {
    "AlignedBatches": "softcache.trainer.distill",
    "distillation_loss": "softcache.trainer.distill",
    "AlignedTokenBatches": "softcache.trainer.distill",
    "token_distillation_loss": "softcache.trainer.distill",
    "TokenTargets": "softcache.trainer.token_targets",
    "BuildConfig": "softcache.config",
    "TrainConfig": "softcache.config",
    "load_config": "softcache.config",
    "DatasetMismatchError": "softcache.errors",
    "IncompleteStoreError": "softcache.errors",
    "SoftcacheError": "softcache.errors",
    "StoreFormatError": "softcache.errors",
    "hard_loss": "softcache.losses",
    "kd_loss_dense": "softcache.losses",
    "kd_loss_topk": "softcache.losses",
    "EpochPlan": "softcache.trainer.plan",
    "LogitStore": "softcache.store",
    "StoreMeta": "softcache.store",
    "SoftLabels": "softcache.trainer.stream",
    "SoftLabelStream": "softcache.trainer.stream",
    "BuildResult": "softcache.builder",
    "TrainResult": "softcache.trainer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'softcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def open_store(
    path: str,
    *,
    require_complete: bool = True,
    storage_options: dict[str, Any] | None = None,
    expect_digest: str | None = None,
) -> LogitStore:
    """Open a store for reading, its metadata validated against docs/FORMAT.md (see
    `LogitStore.open`). With `expect_digest` (``sha256:...``, as `softcache info` shows it), a
    store with another digest is refused and every object read is checked against its
    manifest: the store is exactly the one its producer published."""
    from softcache.store import LogitStore

    return LogitStore.open(
        path,
        mode="r",
        require_complete=require_complete,
        storage_options=storage_options,
        expect_digest=expect_digest,
    )


def build(config: BuildConfig, *, progress: bool = True, client: Any | None = None) -> BuildResult:
    """Run `softcache build` from Python: rows or tokens, as `config.lm` says (see
    `softcache.builder.build`)."""
    from softcache.builder import build as run_build

    return run_build(config, progress=progress, client=client)


def train(
    config: TrainConfig,
    *,
    progress: bool = True,
    client: Any | None = None,
    on_epoch_end: EpochHook | None = None,
) -> TrainResult:
    """Run `softcache train` from Python: rows or tokens, as `config.lm` says (see
    `softcache.trainer.train`, which `on_epoch_end` is passed to)."""
    from softcache.trainer import train as run_train

    return run_train(config, progress=progress, client=client, on_epoch_end=on_epoch_end)


__all__ = [
    "AlignedBatches",
    "AlignedTokenBatches",
    "BuildConfig",
    "BuildResult",
    "DatasetMismatchError",
    "EpochPlan",
    "IncompleteStoreError",
    "LogitStore",
    "SoftLabelStream",
    "SoftLabels",
    "SoftcacheError",
    "StoreFormatError",
    "StoreMeta",
    "TokenTargets",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "build",
    "distillation_loss",
    "hard_loss",
    "kd_loss_dense",
    "kd_loss_topk",
    "load_config",
    "open_store",
    "token_distillation_loss",
    "train",
]
