"""What a training layout is (`TrainLayout`) and which one a config trains on (`open_layout`): rows
or tokens, built for the loop and for its batch process (`softcache.trainer.batch_process`), which
builds its own from the same config."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

from softcache.config import TrainConfig
from softcache.trainer import ddp
from softcache.trainer.plan import EpochPlan


class TrainLayout(Protocol):
    """What the loop needs from a layout (rows or tokens)."""

    #: what a loss is a mean over, and throughput is counted in: "samples" or "tokens"
    unit: str
    #: settings beyond `RESUME_KEYS` a resumed run must share
    resume_keys: tuple[str, ...]
    #: the keys of the evaluation's results, recorded per epoch in metrics.json
    eval_keys: tuple[str, ...]
    num_samples: int
    #: samples per plan block
    block_rows: int
    #: the student's tokenizer, saved with a Hugging Face student (None: none)
    tokenizer: Any

    def batches(
        self, plan: EpochPlan, steps: int, *, hash_stride: int, then: EpochPlan | None
    ) -> Iterator[Any]:
        """The epoch's batches from the plan's cursor up to batch `steps` (the plan is not
        advanced); `then` is the next epoch's plan, for read-ahead."""
        ...

    def loss(self, model: nn.Module, batch: Any, teacher: nn.Module | None) -> tuple[Any, int]:
        """The batch's loss (a scalar tensor, a mean) and what it is a mean over (its count)."""
        ...

    def check_student(self, student: nn.Module) -> None:
        """Refuse a student that cannot learn from this layout's soft labels, before training."""
        ...

    def evaluator(self, teacher: nn.Module | None) -> Callable[[nn.Module], dict[str, Any]]:
        """The per-epoch evaluation of the student (run on rank 0 only)."""
        ...

    def metrics(self) -> dict[str, Any]:
        """The layout's own entries of metrics.json (store size, ...)."""
        ...

    def warm_up(self) -> None:
        """Start, on a background thread, what the first step would otherwise wait for (the
        training process's, not a batch process's: called once, before the first epoch)."""
        ...

    def close(self) -> None:
        """Release what the layout holds (waits for `warm_up`'s thread)."""
        ...


def open_layout(
    config: TrainConfig,
    ranks: ddp.Ranks,
    device: torch.device,
    client: Any | None,
    *,
    pin_memory: bool | None = None,
) -> TrainLayout:
    """The layout `config` trains on: token sequences with `lm`, else rows.

    `pin_memory` (default: on CUDA) pins the batches' host memory; the batch process, whose
    batches are copied into shared memory anyway, passes False.
    """
    if config.lm:
        from softcache.trainer.tokens import TokenLayout

        return TokenLayout(config, ranks, device, client, pin_memory=pin_memory)
    from softcache.trainer.rows import RowLayout

    return RowLayout(config, ranks, device, client, pin_memory=pin_memory)


__all__ = ["TrainLayout", "open_layout"]
