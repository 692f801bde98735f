"""The training loop's epoch loss sum (`softcache.trainer.loop.LossSum`): read as it comes on the
CPU, kept on the device until read on a GPU (here: the same lazy path on the CPU)."""

from __future__ import annotations

import random

import pytest
import torch

from softcache.trainer.checkpoint import EpochStats
from softcache.trainer.loop import LossSum


def _steps(seed: int, n: int) -> list[tuple[torch.Tensor, int]]:
    rng = random.Random(seed)
    return [
        (torch.tensor(rng.uniform(0.0, 5.0), requires_grad=True) * 1.0, rng.randint(1, 256))
        for _ in range(n)
    ]


@pytest.mark.parametrize("seed", range(3))
def test_a_lazy_sum_reads_what_the_eager_sum_does_and_nothing_before(seed: int) -> None:
    carried = 12.25  # a mid-epoch resume's partial sum
    eager, lazy = EpochStats(loss_sum=carried), EpochStats(loss_sum=carried)
    now, later = (
        LossSum(eager, torch.device("cpu"), lazy=False),
        LossSum(lazy, torch.device("cpu"), lazy=True),
    )
    steps = _steps(seed, 40)
    for loss, count in steps[:25]:
        now.add(loss, count)
        later.add(loss, count)
    assert lazy.loss_sum == carried  # not read yet
    later.read()
    assert lazy.loss_sum == pytest.approx(eager.loss_sum, rel=1e-14)
    for loss, count in steps[25:]:  # on after a read (a checkpoint's)
        now.add(loss, count)
        later.add(loss, count)
    later.read(sync=True)
    assert lazy.loss_sum == pytest.approx(eager.loss_sum, rel=1e-14)
    want = carried + sum(float(loss.detach()) * count for loss, count in steps)
    assert eager.loss_sum == pytest.approx(want, rel=1e-14)


def test_a_read_without_steps_leaves_the_carried_sum() -> None:
    stats = EpochStats(loss_sum=3.5, count=7)
    LossSum(stats, torch.device("cpu"), lazy=True).read(sync=True)
    assert stats.loss_sum == 3.5 and stats.count == 7
