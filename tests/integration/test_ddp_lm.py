"""`softcache train --lm` under torchrun: two DDP ranks (gloo, CPU) on a tiny per-token store.

The same machinery as row training (`test_ddp.py`): each rank loads the samples and reads the
soft-label blocks of its own plan only, all ranks take the same number of steps, rank 0 alone writes,
the weights equal one process averaging both ranks' losses, and a run that fails mid-epoch resumes
under torchrun to the uninterrupted weights.

The store: the 40 ragged token sequences of `tests.helpers.token_specs` (358 tokens, some samples
empty). With two ranks a plan block holds 20 samples (`block_samples_for`), one block per rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from softcache.builder import build
from softcache.config import BuildConfig
from softcache.data.sequences import causal_logits, collate_sequences
from softcache.store import LogitStore
from softcache.trainer.checkpoint import CHECKPOINT, METRICS, STUDENT_WEIGHTS
from softcache.trainer.plan import EpochPlan
from softcache.trainer.stream import PlanSampler, SoftLabelStream, equal_steps
from softcache.trainer.token_labels import block_samples_for
from softcache.trainer.tokens import token_kd_loss
from tests.helpers import ROOT
from tests.helpers import token_specs as ts

BATCH, WINDOW, EPOCHS, WORLD, CHECKPOINT_STEPS, LR = 4, 1, 2, 2, 2, 5e-2
DATASET = "tests.helpers.ddp_specs:recorded_token_dataset"
STUDENT = "tests.helpers.ddp_specs:causal_student"
_TEST_ENV = ("SOFTCACHE_TEST_LOG_DIR", "SOFTCACHE_TEST_WATCH", "SOFTCACHE_TEST_FAIL_AT")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp_lm") / "lm.zarr"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        build(
            BuildConfig(
                teacher="tests.helpers.token_specs:causal_teacher",
                dataset="tests.helpers.token_specs:ragged_dataset",
                output=str(out),
                lm=True,
                encoding="topk",
                top_k=8,
                shard_rows=16,
                batch_size=3,
                device="cpu",
            ),
            progress=False,
        )
    return out


def _torchrun(
    store: Path, out: Path, *extra: str, env: dict[str, str], logs: Path
) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
        "--standalone", "--redirects", "3", "--log-dir", str(logs),
        "-m", "softcache.cli", "train", "--lm", "--store", str(store), "--student", STUDENT,
        "--dataset", DATASET, "--eval-dataset", "tests.helpers.token_specs:ragged_dataset",
        "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--window-blocks", str(WINDOW),
        "--lr", str(LR), "--checkpoint-steps", str(CHECKPOINT_STEPS), "--device", "cpu",
        "--output", str(out), *extra,
    ]  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k not in _TEST_ENV}
    run_env = {**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=240, check=False
    )


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
def lm_run(store: Path, tmp_path_factory: pytest.TempPathFactory) -> _Run:
    base = tmp_path_factory.mktemp("ddp_lm_run")
    run = _Run(out=base / "out", record=base / "record", logs=base / "torchrun")
    run.record.mkdir()
    env = {"SOFTCACHE_TEST_LOG_DIR": str(run.record), "SOFTCACHE_TEST_WATCH": str(run.out)}
    result = _torchrun(store, run.out, env=env, logs=run.logs)
    assert result.returncode == 0, _failure(result, run.logs)
    return run


def _block_rows(store: Path) -> int:
    return block_samples_for(LogitStore.open(str(store)), BATCH, WORLD)


def _plan(store: Path, rank: int, epoch: int) -> EpochPlan:
    return EpochPlan(
        num_samples=ts.NUM_SEQUENCES, block_rows=_block_rows(store), batch_size=BATCH, seed=0,
        window_blocks=WINDOW, rank=rank, world_size=WORLD, epoch=epoch,
    )  # fmt: skip


def _trained_batches(store: Path, rank: int, epoch: int) -> list[np.ndarray]:
    plan = _plan(store, rank, epoch)
    return list(PlanSampler(plan, equal_steps(plan)))


def _numbers(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()]


def test_the_plan_gives_each_rank_its_own_block(store: Path) -> None:
    assert _block_rows(store) == ts.NUM_SEQUENCES // WORLD
    for epoch in range(EPOCHS):
        blocks = [set(_plan(store, r, epoch).block_order().tolist()) for r in range(WORLD)]
        assert all(blocks) and not blocks[0] & blocks[1]


def test_ranks_load_disjoint_samples_in_plan_order_and_read_their_own_blocks(
    lm_run: _Run, store: Path
) -> None:
    rows = {r: _numbers(lm_run.record / f"rows.{r}") for r in range(WORLD)}
    reads = {r: _numbers(lm_run.record / f"blocks.{r}") for r in range(WORLD)}
    for r in range(WORLD):
        # The scan (the alignment check) reads every sample once, in order; then training (the
        # eval set is another dataset object, not recorded).
        assert rows[r][: ts.NUM_SEQUENCES] == list(range(ts.NUM_SEQUENCES))
        trained = rows[r][ts.NUM_SEQUENCES :]
        want = [int(i) for e in range(EPOCHS) for b in _trained_batches(store, r, e) for i in b]
        assert trained == want, r
        own = [int(b) for e in range(EPOCHS) for b in _plan(store, r, e).block_order()]
        assert reads[r] == own, r
    for epoch in range(EPOCHS):
        samples = [
            set(np.concatenate(_trained_batches(store, r, epoch)).tolist()) for r in range(WORLD)
        ]
        assert not samples[0] & samples[1]
    assert not set(reads[0]) & set(reads[1])


def test_only_rank_0_writes_and_every_rank_took_the_same_steps(lm_run: _Run, store: Path) -> None:
    metrics = json.loads((lm_run.out / METRICS).read_text())
    steps = {len(_trained_batches(store, r, e)) for r in range(WORLD) for e in range(EPOCHS)}
    assert len(steps) == 1
    assert metrics["world_size"] == WORLD and metrics["lm"] is True
    assert metrics["steps"] == EPOCHS * steps.pop()
    assert metrics["eval_perplexity"][-1] is not None
    assert sorted(p.name for p in lm_run.out.iterdir()) == [CHECKPOINT, METRICS, STUDENT_WEIGHTS]
    assert not (lm_run.record / "writes.1").exists()


def _reference_weights(store: Path) -> dict[str, torch.Tensor]:
    """Both ranks' batches in one process, their losses averaged as DDP averages gradients."""
    from tests.helpers import lm_train_specs

    torch.manual_seed(0)
    student = lm_train_specs.causal_student()
    total = sum(len(_trained_batches(store, 0, e)) for e in range(EPOCHS))
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    opened = LogitStore.open(str(store))
    codec = opened.meta.codec
    dataset = ts.ragged_dataset()
    streams = [SoftLabelStream(opened) for _ in range(WORLD)]
    for epoch in range(EPOCHS):
        labels = [s.batches(_plan(store, r, epoch)) for r, s in enumerate(streams)]
        inputs = [_trained_batches(store, r, epoch) for r in range(WORLD)]
        for per_rank in zip(*labels, strict=True):
            losses = []
            for r, soft in enumerate(per_rank):
                batch = collate_sequences([dataset[int(i)] for i in soft.indices])
                assert soft.indices.tolist() == inputs[r][0].tolist()
                inputs[r] = inputs[r][1:]
                rows = causal_logits(student, batch.input_ids, batch.attention_mask)
                rows = rows[batch.attention_mask].float()
                losses.append(token_kd_loss(rows, soft.fields, codec))
            loss = sum(losses) / WORLD
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return student.state_dict()


def test_ddp_weights_equal_one_process_averaging_both_ranks(lm_run: _Run, store: Path) -> None:
    got = torch.load(lm_run.out / STUDENT_WEIGHTS, weights_only=True)
    want = _reference_weights(store)
    for name, tensor in want.items():
        # The sums are DDP's, up to float32 rounding (other thread counts split the matmuls).
        torch.testing.assert_close(got["net." + name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_under_torchrun_reaches_the_uninterrupted_weights(
    lm_run: _Run, store: Path, tmp_path: Path
) -> None:
    steps = len(_trained_batches(store, 0, 0))
    fail_at = steps + CHECKPOINT_STEPS + 1  # epoch 2, after its checkpoint at cursor 2
    assert len(_trained_batches(store, 0, 1)) > CHECKPOINT_STEPS + 1
    out, logs = tmp_path / "out", tmp_path / "torchrun"
    failed = _torchrun(store, out, env={"SOFTCACHE_TEST_FAIL_AT": f"1:{fail_at}"}, logs=logs)
    assert failed.returncode != 0
    state = torch.load(out / CHECKPOINT, weights_only=False)
    assert (state["plan"]["epoch"], state["plan"]["cursor"]) == (1, CHECKPOINT_STEPS)
    resumed = _torchrun(store, out, "--resume", env={}, logs=tmp_path / "torchrun2")
    assert resumed.returncode == 0, _failure(resumed, tmp_path / "torchrun2")
    want = torch.load(lm_run.out / CHECKPOINT, weights_only=False)
    got = torch.load(out / CHECKPOINT, weights_only=False)
    assert got["plan"] == want["plan"] and got["step"] == want["step"]
    for name, tensor in want["student"].items():
        assert torch.equal(tensor, got["student"][name]), name
