"""DDP for `softcache train`: joining torchrun's process group, and the few numbers ranks share.

Under `torchrun` every process runs `softcache.trainer.train` as one rank. This module finds the rank
(RANK, WORLD_SIZE, LOCAL_RANK from torchrun's environment), joins the process group (gloo on CPU,
nccl on CUDA, where rank r uses cuda:LOCAL_RANK) unless the caller made one, and holds the
arithmetic every rank must agree on without talking: the steps of an epoch (`equal_steps`, the
fewest batches any rank has, so DDP's all-reduce never waits on a rank that ran out) and the rows
behind them. A rank that fails is stopped by torchrun with the others; a rank that hangs makes the
others fail after `ddp_timeout` seconds in a collective. Rank 0's eval pass and checkpoint at an
epoch end must fit in that timeout: the other ranks wait for it in the next all-reduce.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from softcache.config import TrainConfig
from softcache.errors import ConfigError
from softcache.runtime.devices import resolve_device
from softcache.trainer.plan import EpochPlan
from softcache.trainer.stream import equal_steps, plan_from_state

log = logging.getLogger("softcache")


@dataclass(frozen=True)
class Ranks:
    """This process's place in a DDP run (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def join(config: TrainConfig, stack: contextlib.ExitStack) -> tuple[Ranks, torch.device]:
    """This process's ranks and device; joins (and later leaves) torchrun's process group.

    A group the caller already initialised is used as is and left to the caller.
    """
    device = resolve_device(config.device)
    env = os.environ
    if dist.is_available() and dist.is_initialized():
        ranks = Ranks(dist.get_rank(), dist.get_world_size(), int(env.get("LOCAL_RANK", "0")))
        if ranks.world_size > 1:
            device = rank_device(device, ranks)
        return ranks, device
    world_size = int(env.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks(), device
    if not dist.is_available():
        raise ConfigError(
            f"WORLD_SIZE={world_size} asks for distributed training, but this torch build has "
            "no torch.distributed; run one process"
        )
    if "RANK" not in env:
        raise ConfigError(
            f"WORLD_SIZE={world_size} is set but RANK is not; launch with torchrun (which sets "
            "both), or unset WORLD_SIZE to train in one process"
        )
    ranks = Ranks(int(env["RANK"]), world_size, int(env.get("LOCAL_RANK", "0")))
    device = rank_device(device, ranks)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=config.ddp_timeout))
    stack.callback(dist.destroy_process_group)  # a group we made, we destroy
    return ranks, device


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """cuda:LOCAL_RANK for a CUDA run (each rank its own GPU); the CPU as is."""
    if device.type != "cuda":
        return device
    if device.index is not None and device.index != ranks.local_rank:
        raise ConfigError(
            f"device {device} asked for, but under torchrun each rank uses cuda:LOCAL_RANK "
            f"(cuda:{ranks.local_rank} here); pass --device cuda or auto"
        )
    if ranks.local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK {ranks.local_rank} has no GPU: this node has "
            f"{torch.cuda.device_count()}; start at most that many processes per node"
        )
    device = torch.device("cuda", ranks.local_rank)
    torch.cuda.set_device(device)
    return device


def check_ranks(plan: EpochPlan, ranks: Ranks) -> None:
    """Refuse more ranks than blocks; warn when equal step counts leave many rows out."""
    if ranks.world_size == 1:
        return
    if plan.num_blocks < ranks.world_size:
        raise ConfigError(
            f"{ranks.world_size} ranks but the data has only {plan.num_blocks} blocks of "
            f"{plan.block_rows} rows, and ranks take whole blocks; use at most {plan.num_blocks} "
            "processes, or a store built with a smaller --shard-rows"
        )
    used = RowCount(plan, equal_steps(plan)).total
    left_out = 1 - used / max(plan.num_samples, 1)
    if ranks.main and left_out > 0.02:
        log.warning(
            "%d ranks take the same number of steps, which leaves %.1f%% of the rows out of "
            "epoch %d (ranks hold whole blocks of %d rows; other rows are left out each epoch); "
            "a store with a smaller shard_rows leaves fewer out",
            ranks.world_size,
            100 * left_out,
            plan.epoch,
            plan.block_rows,
        )


def total_steps(plan: EpochPlan, epochs: int) -> int:
    """Steps of the whole run (for the schedule): every epoch's `equal_steps`."""
    probe = plan_from_state(dict(plan.state_dict(), epoch=0, cursor=0))
    total = 0
    for epoch in range(epochs):
        probe.set_epoch(epoch)
        total += equal_steps(probe)
    return total


class RowCount:
    """Rows all ranks together train on in one epoch of `steps` steps, for the progress bar."""

    def __init__(self, plan: EpochPlan, steps: int) -> None:
        state = plan.state_dict()
        self.rows = np.array(
            [plan_from_state(dict(state, rank=r)).num_rows() for r in range(plan.world_size)]
        )
        self.batch_size = plan.batch_size
        self.steps = steps
        self.total = self.before(steps)

    def before(self, step: int) -> int:
        """Rows of the epoch's first `step` steps."""
        return int(np.minimum(self.rows, step * self.batch_size).sum())

    def at(self, step: int) -> int:
        """Rows of step `step` (0-based) over all ranks."""
        return self.before(step + 1) - self.before(step)


def global_mean(value: float, count: int, ranks: Ranks, device: torch.device) -> float:
    """The mean of a per-rank mean `value` over `count` samples, over all ranks."""
    if ranks.world_size == 1:
        return value
    total, samples = all_sum([value * count, count], device)
    return total / samples


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums of `values` over all ranks (a collective: every rank must call it)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)  # nccl: a CUDA tensor
    dist.all_reduce(tensor)
    return tensor.tolist()
