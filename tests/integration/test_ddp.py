"""`softcache train` under torchrun: two DDP ranks (gloo, CPU) on a tiny synthetic store.

What each rank did is recorded by `tests.helpers.ddp_specs` (rows loaded, store blocks read, files
written) and checked against the epoch plan: ranks train on disjoint rows in plan order, read only
their own blocks, take the same number of steps, and only rank 0 writes or reports.

The store: 300 rows in shards of 64 (5 blocks, the last one 44 rows), so the ranks hold 3 and 2
blocks and differ in batch count, and the rank with more rows leaves its last ones out to keep the
step counts equal. Each torchrun costs a few seconds of start-up (two Python processes importing
torch).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from softcache.builder import build
from softcache.config import BuildConfig, TrainConfig
from softcache.errors import ConfigError
from softcache.store import LogitStore
from softcache.trainer import train
from softcache.trainer.checkpoint import CHECKPOINT, METRICS, STUDENT_WEIGHTS
from softcache.trainer.distill import AlignedBatches, distillation_loss
from softcache.trainer.plan import EpochPlan
from softcache.trainer.stream import PlanSampler, SoftLabelStream, equal_steps
from tests.helpers import ROOT, ddp_specs, snapshot, specs

N, SHARD_ROWS, BATCH, WINDOW, EPOCHS, WORLD, CHECKPOINT_STEPS, LR = 300, 64, 16, 2, 2, 2, 3, 1e-2
DATASET = "tests.helpers.ddp_specs:recorded_dataset"
STUDENT = "tests.helpers.ddp_specs:student"
EVAL_DATASET = "tests.helpers.specs:dataset"
_TEST_ENV = ("SOFTCACHE_TEST_N", "SOFTCACHE_TEST_LOG_DIR", "SOFTCACHE_TEST_WATCH")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "store.zarr"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        mp.delenv("SOFTCACHE_TEST_N", raising=False)
        build(
            BuildConfig(
                teacher="tests.helpers.specs:teacher",
                dataset="tests.helpers.specs:dataset",
                output=str(out),
                shard_rows=SHARD_ROWS,
                batch_size=24,
                device="cpu",
            ),
            progress=False,
        )
    return out


def _torchrun(
    store: Path, out: Path, *extra: str, env: dict[str, str], logs: Path
) -> subprocess.CompletedProcess[str]:
    """`torchrun --nproc_per_node 2 --standalone -m softcache.cli train ...`; rank output in `logs`."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
        "--standalone", "--redirects", "3", "--log-dir", str(logs),
        "-m", "softcache.cli", "train", "--store", str(store), "--student", STUDENT,
        "--dataset", DATASET, "--eval-dataset", EVAL_DATASET, "--epochs", str(EPOCHS),
        "--batch-size", str(BATCH), "--window-blocks", str(WINDOW), "--lr", str(LR),
        "--checkpoint-steps", str(CHECKPOINT_STEPS), "--device", "cpu", "--output", str(out),
        *extra,
    ]  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k not in (*_TEST_ENV, "SOFTCACHE_TEST_FAIL_AT")}
    run_env = {**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=240, check=False
    )


def _rank_output(logs: Path, rank: int, stream: str) -> str:
    (path,) = logs.glob(f"*/attempt_0/{rank}/{stream}.log")
    return path.read_text()


def _failure(result: subprocess.CompletedProcess[str], logs: Path) -> str:
    parts = [result.stdout, result.stderr]
    parts += [p.read_text() for p in sorted(logs.glob("*/attempt_*/*/std*.log"))]
    return "\n".join(parts)


@dataclass(frozen=True)
class _Run:
    out: Path
    record: Path
    logs: Path


@pytest.fixture(scope="module")
def ddp_run(store: Path, tmp_path_factory: pytest.TempPathFactory) -> _Run:
    """One 2-rank, 2-epoch offline run, recorded."""
    base = tmp_path_factory.mktemp("ddp_run")
    run = _Run(out=base / "out", record=base / "record", logs=base / "torchrun")
    run.record.mkdir()
    env = {"SOFTCACHE_TEST_LOG_DIR": str(run.record), "SOFTCACHE_TEST_WATCH": str(run.out)}
    result = _torchrun(store, run.out, env=env, logs=run.logs)
    assert result.returncode == 0, _failure(result, run.logs)
    return run


def _plan(rank: int, epoch: int) -> EpochPlan:
    return EpochPlan(
        num_samples=N, block_rows=SHARD_ROWS, batch_size=BATCH, seed=0, window_blocks=WINDOW,
        rank=rank, world_size=WORLD, epoch=epoch,
    )  # fmt: skip


def _trained_batches(rank: int, epoch: int) -> list[np.ndarray]:
    """The batches the rank trains on in `epoch`: its plan, stopped at the common step count."""
    plan = _plan(rank, epoch)
    return list(PlanSampler(plan, equal_steps(plan)))


def _read_blocks(rank: int, epoch: int) -> list[int]:
    """The rank's blocks, in its plan's order, that hold a row it trains on."""
    used = set((np.concatenate(_trained_batches(rank, epoch)) // SHARD_ROWS).tolist())
    return [int(b) for b in _plan(rank, epoch).block_order() if b in used]


def _numbers(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()]


# ---- the torchrun run ---------------------------------------------------------------------------


def test_only_rank_0_writes_and_reports(ddp_run):
    metrics = json.loads((ddp_run.out / METRICS).read_text())
    assert metrics["epoch"] == [1, 2] and metrics["world_size"] == WORLD
    assert all(a is not None for a in metrics["eval_accuracy"])  # rank 0 evaluated
    assert metrics["train_loss"][-1] < metrics["first_step_loss"]
    # samples/s counts both ranks' rows: seconds x rate = the rows of both ranks' steps.
    both = sum(sum(map(len, _trained_batches(r, 0))) for r in range(WORLD))
    rate, seconds = metrics["samples_per_second"][0], metrics["epoch_seconds"][0]
    assert rate * seconds == pytest.approx(both, rel=1e-9)

    assert sorted(p.name for p in ddp_run.out.iterdir()) == [CHECKPOINT, METRICS, STUDENT_WEIGHTS]
    assert not (ddp_run.record / "writes.1").exists()  # rank 1 touched nothing under out/
    written = {Path(line.split()[1]).name for line in (ddp_run.record / "writes.0").open()}
    assert written <= {
        "out", CHECKPOINT, CHECKPOINT + ".tmp", METRICS, "metrics.tmp", STUDENT_WEIGHTS,
        STUDENT_WEIGHTS + ".tmp",
    }  # fmt: skip

    assert f"epoch {EPOCHS}/{EPOCHS}" in _rank_output(ddp_run.logs, 0, "stderr")
    assert f"{both}/{both}" in _rank_output(ddp_run.logs, 0, "stderr")  # the bar counts all ranks
    assert "epoch 1/" not in _rank_output(ddp_run.logs, 1, "stderr")

    state = torch.load(ddp_run.out / CHECKPOINT, weights_only=False)
    fresh = ddp_specs.student()
    fresh.load_state_dict(state["student"])  # the bare student's keys, no DDP "module." prefix
    assert "rank" not in state["plan"] and state["plan"]["world_size"] == WORLD


def test_ranks_train_on_disjoint_rows_in_plan_order(ddp_run):
    per_rank = {r: _numbers(ddp_run.record / f"rows.{r}") for r in range(WORLD)}
    for epoch in range(EPOCHS):
        steps = {len(_trained_batches(r, epoch)) for r in range(WORLD)}
        assert len(steps) == 1  # every rank stops at the same step
        rows = []
        for r in range(WORLD):
            want = np.concatenate(_trained_batches(r, epoch))
            got, per_rank[r] = per_rank[r][: len(want)], per_rank[r][len(want) :]
            assert got == want.tolist(), (r, epoch)  # exactly the plan's rows, in its order
            rows.append(set(got))
            assert len(got) == len(rows[-1])  # no row twice in an epoch
        assert not rows[0] & rows[1]
        # Left out: exactly the rows of the longer rank past the common step count.
        past_stop = set()
        for r in range(WORLD):
            plan = _plan(r, epoch)
            past_stop |= {int(i) for batch in list(plan)[equal_steps(plan) :] for i in batch}
        assert set(range(N)) - rows[0] - rows[1] == past_stop
        assert len(past_stop) < 2 * SHARD_ROWS
    assert per_rank == {r: [] for r in range(WORLD)}  # and nothing else was loaded


def test_each_rank_reads_only_its_own_blocks(ddp_run):
    reads = {r: _numbers(ddp_run.record / f"blocks.{r}") for r in range(WORLD)}
    for r in range(WORLD):
        # Epoch 0's blocks, then epoch 1's (read ahead during epoch 0) from the rank's own plan;
        # blocks holding only rows past the stop are never read.
        assert reads[r] == _read_blocks(r, 0) + _read_blocks(r, 1)
    for epoch in range(EPOCHS):
        assert not set(_read_blocks(0, epoch)) & set(_read_blocks(1, epoch))


def test_ddp_weights_equal_one_process_averaging_both_ranks(ddp_run, store, in_root):
    """Both ranks' batches in one process, losses averaged as DDP averages gradients."""
    torch.manual_seed(0)
    student = ddp_specs.student()
    total = sum(len(_trained_batches(0, e)) for e in range(EPOCHS))
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    opened = LogitStore.open(str(store))
    dataset = specs.dataset()
    aligned = [AlignedBatches(dataset, opened) for _ in range(WORLD)]

    def rank_loss(x: torch.Tensor, y: torch.Tensor, soft) -> torch.Tensor:
        t = opened.meta.temperatures
        return distillation_loss(student(x), soft, y, temperatures=t, temperature=2.0, alpha=0.0)

    for epoch in range(EPOCHS):
        streams = [a.epoch(_plan(r, epoch)) for r, a in enumerate(aligned)]
        for batches in zip(*streams, strict=True):
            loss = sum(rank_loss(*batch) for batch in batches) / WORLD
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    got = torch.load(ddp_run.out / CHECKPOINT, weights_only=False)["student"]
    for name, want in student.state_dict().items():
        # DDP halves each rank's gradient and sums the two, which is exactly what this loop's
        # mean of two losses gives, and the runs here agree bitwise; but this process may split
        # its matmuls over other threads than the ranks (OMP_NUM_THREADS=1), so float32 rounding.
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_under_torchrun_reaches_the_uninterrupted_weights(ddp_run, store, tmp_path):
    """Rank 1 fails mid-epoch 2; torchrun stops rank 0; `--resume` on 2 ranks ends as ddp_run."""
    steps = len(_trained_batches(0, 0))
    fail_at = steps + CHECKPOINT_STEPS + 2  # epoch 2, step 5: after the checkpoint at cursor 3
    assert len(_trained_batches(0, 1)) > CHECKPOINT_STEPS + 2
    out, logs = tmp_path / "out", tmp_path / "torchrun"
    failed = _torchrun(store, out, env={"SOFTCACHE_TEST_FAIL_AT": f"1:{fail_at}"}, logs=logs)
    assert failed.returncode != 0
    assert "test failure on rank 1" in _rank_output(logs, 1, "stderr")
    state = torch.load(out / CHECKPOINT, weights_only=False)
    assert (state["plan"]["epoch"], state["plan"]["cursor"]) == (1, CHECKPOINT_STEPS)

    resumed = _torchrun(store, out, "--resume", env={}, logs=tmp_path / "torchrun2")
    assert resumed.returncode == 0, _failure(resumed, tmp_path / "torchrun2")
    want = torch.load(ddp_run.out / CHECKPOINT, weights_only=False)
    got = torch.load(out / CHECKPOINT, weights_only=False)
    assert got["plan"] == want["plan"]
    for name, tensor in want["student"].items():
        assert torch.equal(tensor, got["student"][name]), name  # the same sums: bitwise
    # Epoch 2's loss: rank 0 carried the saved global sums, each rank added its own since.
    assert got["metrics"]["train_loss"] == pytest.approx(want["metrics"]["train_loss"], rel=1e-12)


def test_resume_with_another_number_of_processes_is_refused(ddp_run, store, tmp_path, in_root):
    out = tmp_path / "out"
    shutil.copytree(ddp_run.out, out)
    before = snapshot(out)
    config = TrainConfig(
        student=STUDENT, dataset=DATASET, store=str(store), eval_dataset=EVAL_DATASET,
        epochs=EPOCHS, batch_size=BATCH, window_blocks=WINDOW, lr=LR, device="cpu",
        output=str(out), resume=True,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"run of 2 process\(es\) but this run has 1"):
        train(config, progress=False)
    assert snapshot(out) == before


# ---- in process: the Python API and the launch environment -------------------------------------


def test_python_api_ranks_read_disjoint_blocks_and_stop_together(store, monkeypatch):
    """The own-loop recipe of `softcache.trainer.distill`, one rank at a time, two epochs each."""
    reads: list[int] = []
    compute = SoftLabelStream._compute

    def record(self, blocks, *args):
        reads.extend(blocks)
        return compute(self, blocks, *args)

    monkeypatch.setattr(SoftLabelStream, "_compute", record)
    opened = LogitStore.open(str(store))
    dataset = specs.dataset()
    own_lengths, steps = [], []
    for rank in range(WORLD):
        reads.clear()
        aligned = AlignedBatches(dataset, opened)
        plan, then = _plan(rank, 0), _plan(rank, 1)
        first = [soft.indices for _, _, soft in aligned.epoch(plan, then=then)]
        second = [soft.indices for _, _, soft in aligned.epoch(then)]
        for got, epoch in ((first, 0), (second, 1)):
            want = _trained_batches(rank, epoch)
            assert len(got) == len(want) and all(map(np.array_equal, got, want))
        # Its own blocks only; epoch 1's read ahead during epoch 0 and handed over, not reread.
        assert reads == _read_blocks(rank, 0) + _read_blocks(rank, 1)
        own_lengths.append(len(plan))
        steps.append(aligned.steps(plan))
    assert own_lengths[0] != own_lengths[1] and steps[0] == steps[1] == min(own_lengths)
    everything = AlignedBatches(dataset, opened, equal_steps=False)
    assert len(list(everything.epoch(_plan(0, 0)))) == own_lengths[0]


def test_world_size_without_rank_is_refused(store, tmp_path, monkeypatch, in_root):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    config = TrainConfig(
        student=STUDENT, dataset=EVAL_DATASET, store=str(store), device="cpu",
        output=str(tmp_path / "out"),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="RANK is not"):
        train(config, progress=False)
