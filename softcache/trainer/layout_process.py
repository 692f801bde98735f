"""The training loop's batch process: a child that builds the run's layout and makes its batches.

`softcache.trainer.batch_process` runs any `BatchSource` in a child; this module gives it the one
the training loop needs (`layout_process`), and the loop's policy around it: the child is the
default (`TrainConfig.loader = "process"`), and where one cannot be made (no fork server, a config
that does not pickle, a spec the child cannot resolve) the loop warns and makes its batches on a
thread instead. Kept apart from `batch_process` because the layouts import the own-loop API
(`softcache.trainer.distill`), which runs its batches through `batch_process` too.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch

from softcache.config import TrainConfig
from softcache.runtime.threads import read_threads, set_read_threads
from softcache.trainer.batch_process import BatchProcess, BatchProcessError, BatchSource
from softcache.trainer.ddp import Ranks
from softcache.trainer.layouts import open_layout


def layout_process(
    config: TrainConfig, ranks: Ranks, device: torch.device, *, depth: int = 4
) -> BatchProcess:
    """The training loop's batch process: the child builds the run's layout from `config`.

    Args:
        config: the run's configuration (the student, teacher and evaluation stay here).
        ranks: this process's DDP rank and world size.
        device: where the student runs (the child makes the batches for it, teacher targets
            included, without touching the device).
        depth: batches the child makes ahead of the one in use.

    Raises:
        BatchProcessError: the config does not pickle (an object the child cannot receive).
    """
    return BatchProcess(child_source(config, ranks, device), device, depth=depth)


def child_source(
    config: TrainConfig, ranks: Ranks, device: torch.device
) -> Callable[[], BatchSource]:
    """What the batch process calls to build its layout: a picklable call that opens the run's
    layout from `config` (less what stays in the parent, `_child_config`) with its stores
    decoded on this process's decoding threads (`softcache.runtime.threads.read_threads`, as
    the training loop set them)."""
    return functools.partial(
        _child_layout, _child_config(config), ranks, device.type, read_threads()
    )


def open_batch_process(
    config: TrainConfig, ranks: Ranks, device: torch.device
) -> BatchProcess | None:
    """The run's batch process, started, or None for the batch thread (asked for with
    `loader = "thread"`, or no child here: warned about). Call `ready_or_none` before the first
    epoch: the child builds its layout meanwhile."""
    if config.loader != "process":
        return None
    try:
        return layout_process(config, ranks, device)
    except BatchProcessError as exc:
        _fallback(str(exc))
        return None


def ready_or_none(process: BatchProcess | None) -> BatchProcess | None:
    """`process` once its layout is built; None (warned about, the child stopped) if it failed."""
    if process is None:
        return None
    try:
        process.wait_ready()
    except BatchProcessError as exc:
        process.close()
        _fallback(str(exc))
        return None
    return process


def _fallback(why: str) -> None:
    warnings.warn(
        f"making batches on a thread of the training process ({why}); pass --loader thread "
        "to ask for that and silence this warning",
        RuntimeWarning,
        stacklevel=3,
    )


def _child_config(config: TrainConfig) -> TrainConfig:
    """What the child's layout needs of the run's config: the dataset and store settings.

    The student, the teacher and the evaluation stay in the parent (they may be large objects,
    which would be pickled across); so do the checks the parent's layout made when it was built
    (a token store's scan hashes every sample, and the student's tokenizer is checked there).
    The per-epoch alignment checks come with each epoch's command.
    """
    return dataclasses.replace(
        config,
        student="(the parent's)",
        teacher=None if config.teacher is None else "(the parent's)",
        tokenizer=None,
        eval_dataset=None,
        eval_store=None,
        hash_check="off",
    )


def _child_layout(config: TrainConfig, ranks: Ranks, device_type: str, reads: int) -> Any:
    """The child's copy of the run's layout (a `BatchSource`), its stores decoded on `reads`
    threads: the child is the run's batch maker for the rest of its life."""
    set_read_threads(reads)
    return open_layout(config, ranks, torch.device(device_type), None, pin_memory=False)


__all__ = ["child_source", "layout_process", "open_batch_process", "ready_or_none"]
