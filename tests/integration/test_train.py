"""`softcache train` end to end on real digits stores: modes, alignment, resume, the CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import softcache
from softcache.builder import build
from softcache.cli import main
from softcache.config import BuildConfig, TrainConfig
from softcache.errors import DatasetMismatchError, IncompleteStoreError
from softcache.trainer import train
from softcache.trainer.checkpoint import CHECKPOINT
from tests.helpers import train_specs

ROOT = Path(__file__).resolve().parents[2]
DIGITS = "pipelines.digits"
TRAIN_SET = f"{DIGITS}.data:train_set"
TEST_SET = f"{DIGITS}.data:test_set"
STUDENT = f"{DIGITS}.models:student"
TEACHER = f"{DIGITS}.models:teacher"


@pytest.fixture(scope="session")
def digits_stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Dense, top-5 and test-set stores of the digits teacher (trained here when missing)."""
    os.chdir(ROOT)
    from pipelines.digits.models import TEACHER_CHECKPOINT
    from pipelines.digits.prepare import train_teacher

    if not TEACHER_CHECKPOINT.is_file():
        TEACHER_CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
        torch.save(train_teacher().state_dict(), TEACHER_CHECKPOINT)
    root = tmp_path_factory.mktemp("digits")
    stores = {
        "dense": BuildConfig(teacher=TEACHER, dataset=TRAIN_SET, output=str(root / "dense.zarr")),
        "top5": BuildConfig(
            teacher=TEACHER,
            dataset=TRAIN_SET,
            output=str(root / "top5.zarr"),
            encoding="topk",
            top_k=5,
        ),
        "test": BuildConfig(teacher=TEACHER, dataset=TEST_SET, output=str(root / "test.zarr")),
    }
    for config in stores.values():
        build(_small_shards(config), progress=False)
    return {name: config.output for name, config in stores.items()}


def _small_shards(config: BuildConfig) -> BuildConfig:
    from dataclasses import replace

    return replace(config, shard_rows=256, batch_size=128, device="cpu")


def _config(stores: dict[str, str], out: Path, **overrides) -> TrainConfig:
    values = {
        "student": STUDENT,
        "dataset": TRAIN_SET,
        "store": stores["dense"],
        "teacher": TEACHER,
        "eval_dataset": TEST_SET,
        "eval_store": stores["test"],
        "epochs": 2,
        "lr": 5e-3,
        "temperature": 4.0,
        "device": "cpu",
        "output": str(out),
        **overrides,
    }
    return TrainConfig(**values)


def test_offline_first_step_loss_matches_online_within_fp16(digits_stores, tmp_path):
    offline = train(_config(digits_stores, tmp_path / "off", epochs=1), progress=False)
    online = train(_config(digits_stores, tmp_path / "on", epochs=1, mode="online"), progress=False)
    a, b = offline.metrics["first_step_loss"], online.metrics["first_step_loss"]
    # Stored logits are fp16: relative rounding 2^-11 per logit bounds the loss difference.
    assert a == pytest.approx(b, rel=2e-3)


def test_metrics_json_holds_every_documented_field(digits_stores, tmp_path):
    result = train(_config(digits_stores, tmp_path / "m"), progress=False)
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    for key in (
        "mode",
        "train_loss",
        "eval_accuracy",
        "teacher_agreement",
        "epoch_seconds",
        "samples_per_second",
        "data_wait_fraction",
        "step_seconds_median",
    ):
        assert key in metrics
    assert metrics["mode"] == "offline"
    assert len(metrics["train_loss"]) == 2
    assert 0.5 < metrics["eval_accuracy"][-1] <= 1.0
    assert 0.0 <= metrics["data_wait_fraction"][-1] <= 1.0
    # A step's period (from the end of the step before) is a part of its epoch.
    for step, seconds in zip(metrics["step_seconds_median"], metrics["epoch_seconds"], strict=True):
        assert 0.0 < step < seconds
    assert metrics == result.metrics


def test_a_cpu_student_trains_beside_its_batch_maker_and_torch_keeps_its_threads(
    digits_stores, tmp_path, monkeypatch
):
    """The run takes a core less than the machine's for the batch process, whose reads decode
    on the cores the student leaves (both recorded in metrics.json, as is an explicit --threads
    or SOFTCACHE_READ_THREADS), and leaves torch's count and the decoding default as it found
    them."""
    from softcache.runtime.threads import READ_THREADS_ENV, THREAD_ENV, read_threads, usable_cores

    for name in (*THREAD_ENV, READ_THREADS_ENV, "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    reads_before = read_threads()
    auto = train(_config(digits_stores, tmp_path / "auto", epochs=1), progress=False)
    assert auto.metrics["threads"] == max(1, min(before, usable_cores() - 1))
    assert auto.metrics["read_threads"] == max(1, usable_cores() - auto.metrics["threads"])
    assert torch.get_num_threads() == before
    assert read_threads() == reads_before
    explicit = train(_config(digits_stores, tmp_path / "one", epochs=1, threads=3), progress=False)
    assert explicit.metrics["threads"] == 3
    assert explicit.metrics["read_threads"] == max(1, usable_cores() - 3)
    assert json.loads((tmp_path / "one" / "metrics.json").read_text())["threads"] == 3
    assert torch.get_num_threads() == before
    monkeypatch.setenv(READ_THREADS_ENV, "5")  # the user's number wins
    chosen = train(_config(digits_stores, tmp_path / "env", epochs=1), progress=False)
    assert chosen.metrics["read_threads"] == 5


@pytest.mark.parametrize("mode", ["hard", "online", "offline"])
def test_every_mode_learns_from_the_same_initialisation(digits_stores, tmp_path, mode):
    result = train(_config(digits_stores, tmp_path / mode, epochs=4, mode=mode), progress=False)
    # An untrained student is at chance (0.1); every mode must clearly learn.
    assert result.metrics["eval_accuracy"][-1] > 0.6


def test_same_seed_gives_the_same_run(digits_stores, tmp_path):
    """Same seed -> same initial student and data order -> bitwise the same weights.

    (That the modes share the initialisation and order is shown by the offline/online first-step
    test above: their losses agree to fp16 rounding only if batch and student are the same.)"""
    a = train(_config(digits_stores, tmp_path / "a", epochs=1, mode="hard"), progress=False)
    b = train(_config(digits_stores, tmp_path / "b", epochs=1, mode="hard"), progress=False)
    assert a.metrics["first_step_loss"] == b.metrics["first_step_loss"]
    for pa, pb in zip(a.student.parameters(), b.student.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_topk_store_trains_and_warns_once_for_an_unstored_temperature(
    digits_stores, tmp_path, caplog
):
    with caplog.at_level(logging.WARNING, logger="softcache"):
        result = train(
            _config(digits_stores, tmp_path / "k", store=digits_stores["top5"], temperature=3.0),
            progress=False,
        )
    warnings = [r for r in caplog.records if "no normaliser for temperature 3.0" in r.message]
    assert len(warnings) == 1
    # Two epochs of renormalised top-5 targets: well above chance (0.1), not yet converged.
    assert result.metrics["eval_accuracy"][-1] > 0.25


@pytest.mark.parametrize(
    ("factory", "first_bad"),
    [("altered", train_specs.ALTERED)],
)
def test_misaligned_dataset_is_refused_naming_the_first_bad_sample(
    digits_stores, tmp_path, factory, first_bad
):
    config = _config(
        digits_stores, tmp_path / factory, dataset=f"tests.helpers.train_specs:{factory}"
    )
    with pytest.raises(DatasetMismatchError, match=rf"dataset sample {first_bad} does not match"):
        train(config, progress=False)


def test_misaligned_dataset_names_the_first_bad_sample_in_plan_order(digits_stores, tmp_path):
    """With swapped samples, whichever of the two the plan reaches first is named."""
    config = _config(digits_stores, tmp_path / "sw", dataset="tests.helpers.train_specs:swapped")
    with pytest.raises(DatasetMismatchError) as info:
        train(config, progress=False)
    named = int(str(info.value).split("dataset sample ")[1].split()[0])
    assert named in train_specs.SWAPPED


def test_truncated_dataset_is_refused_before_training(digits_stores, tmp_path):
    config = _config(digits_stores, tmp_path / "t", dataset="tests.helpers.train_specs:truncated")
    with pytest.raises(DatasetMismatchError, match="1000 samples but store"):
        train(config, progress=False)
    assert not (tmp_path / "t" / CHECKPOINT).exists()


def test_incomplete_store_is_refused(digits_stores, tmp_path):
    # Copy the dense store and unset `complete`, as a killed build leaves it.
    import shutil

    import zarr

    from softcache.store import ATTR_KEY

    partial = tmp_path / "partial.zarr"
    shutil.copytree(digits_stores["dense"], partial)
    group = zarr.open_group(str(partial), mode="r+")
    group.attrs[ATTR_KEY] = {**group.attrs[ATTR_KEY], "complete": False}
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        train(_config(digits_stores, tmp_path / "p", store=str(partial)), progress=False)


def test_resume_refuses_a_checkpoint_from_other_settings(digits_stores, tmp_path):
    train(_config(digits_stores, tmp_path / "r", epochs=1), progress=False)
    with pytest.raises(Exception, match="other settings"):
        train(
            _config(digits_stores, tmp_path / "r", epochs=1, lr=1e-2, resume=True), progress=False
        )


def test_resume_after_the_last_epoch_changes_nothing(digits_stores, tmp_path):
    first = train(_config(digits_stores, tmp_path / "done", epochs=2), progress=False)
    again = train(_config(digits_stores, tmp_path / "done", epochs=2, resume=True), progress=False)
    for pa, pb in zip(first.student.parameters(), again.student.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert again.metrics["train_loss"] == first.metrics["train_loss"]


def test_the_epoch_hook_sees_each_epoch_and_a_run_it_stops_resumes_to_the_same_weights(
    digits_stores, tmp_path
):
    """`on_epoch_end` runs after each epoch's checkpoint with that epoch's metrics; what it
    raises ends the run, and `resume` continues it to an uninterrupted run's weights."""
    seen: list[tuple[int, int, float]] = []

    def record(epoch: int, metrics: dict) -> None:
        assert (tmp_path / "whole" / CHECKPOINT).is_file()
        seen.append((epoch, len(metrics["epoch_seconds"]), metrics["train_loss"][-1]))

    whole = softcache.train(  # the public call passes the hook on
        _config(digits_stores, tmp_path / "whole", epochs=3), progress=False, on_epoch_end=record
    )
    assert [(e, n) for e, n, _ in seen] == [(0, 1), (1, 2), (2, 3)]
    assert [loss for *_, loss in seen] == whole.metrics["train_loss"]

    class Stop(Exception):
        pass

    def stop_after_first(epoch: int, metrics: dict) -> None:
        raise Stop(epoch)

    stopped = tmp_path / "stopped"
    with pytest.raises(Stop):
        train(
            _config(digits_stores, stopped, epochs=3), progress=False, on_epoch_end=stop_after_first
        )
    state = torch.load(stopped / CHECKPOINT, weights_only=False)
    assert state["plan"]["epoch"] == 1 and state["plan"]["cursor"] == 0
    resumed = train(_config(digits_stores, stopped, epochs=3, resume=True), progress=False)
    for want, got in zip(whole.student.parameters(), resumed.student.parameters(), strict=True):
        assert torch.equal(want, got)
    assert resumed.metrics["train_loss"] == whole.metrics["train_loss"]


def _train_cmd(stores: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "softcache.cli", "train",
        "--store", stores["dense"], "--student", "tests.helpers.train_specs:slow_student",
        "--dataset", TRAIN_SET, "--epochs", "3", "--batch-size", "64", "--lr", "5e-3",
        "--temperature", "4", "--device", "cpu", "--checkpoint-steps", "4",
        "--output", str(out), "--quiet", *extra,
    ]  # fmt: skip


def test_killed_train_resumes_to_the_same_weights(digits_stores, tmp_path):
    """SIGKILL mid-epoch, `--resume`, and the final weights equal an uninterrupted run's, bitwise."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    reference = tmp_path / "reference"
    subprocess.run(_train_cmd(digits_stores, reference), cwd=ROOT, env=env, check=True)

    killed = tmp_path / "killed"
    slow_env = {**env, "SOFTCACHE_TEST_STEP_SLEEP": "0.05"}
    proc = subprocess.Popen(_train_cmd(digits_stores, killed), cwd=ROOT, env=slow_env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "train finished before it could be killed"
            assert time.monotonic() < deadline, "no mid-epoch checkpoint appeared"
            if (killed / CHECKPOINT).is_file():
                state = torch.load(killed / CHECKPOINT, weights_only=False)
                if state["plan"]["epoch"] >= 1 and state["plan"]["cursor"] > 0:
                    break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run(_train_cmd(digits_stores, killed, "--resume"), cwd=ROOT, env=env, check=True)
    want = torch.load(reference / CHECKPOINT, weights_only=False)
    got = torch.load(killed / CHECKPOINT, weights_only=False)
    assert want["plan"] == got["plan"]
    for name, tensor in want["student"].items():
        assert torch.equal(tensor, got["student"][name]), name
    assert got["metrics"]["train_loss"][0] == want["metrics"]["train_loss"][0]


def test_cli_train_prints_a_summary_and_json(digits_stores, tmp_path):
    runner = CliRunner()
    args = [
        "train", "--store", digits_stores["dense"], "--student", STUDENT, "--dataset", TRAIN_SET,
        "--eval-dataset", TEST_SET, "--eval-store", digits_stores["test"], "--epochs", "1",
        "--device", "cpu", "--output", str(tmp_path / "cli"), "--quiet",
    ]  # fmt: skip
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "teacher agreement" in result.output
    result = runner.invoke(main, [*args, "--json", "--overwrite"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["mode"] == "offline" and len(data["eval_accuracy"]) == 1


def test_cli_train_errors_are_one_line(digits_stores, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["train", "--student", STUDENT, "--dataset", TRAIN_SET, "--output", str(tmp_path / "x")],
    )
    assert result.exit_code == 1
    assert "mode offline trains from a store: pass --store" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(
        main,
        [
            "train", "--store", digits_stores["dense"], "--student", STUDENT,
            "--dataset", "tests.helpers.train_specs:truncated", "--output", str(tmp_path / "y"),
        ],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "1000 samples but store" in result.output


@pytest.mark.slow
def test_offline_kd_matches_online_kd_over_three_seeds(digits_stores, tmp_path):
    """The issue's claim: mean eval accuracy over 3 seeds within 0.5 points."""
    accuracy = {"online": [], "offline": []}
    for seed in range(3):
        for mode in accuracy:
            config = _config(
                digits_stores, tmp_path / f"{mode}{seed}", epochs=20, mode=mode, seed=seed
            )
            accuracy[mode].append(train(config, progress=False).metrics["eval_accuracy"][-1])
    gap = abs(np.mean(accuracy["online"]) - np.mean(accuracy["offline"]))
    assert gap <= 0.005, accuracy


@pytest.mark.parametrize(
    ("hash_check", "refused"), [("all", True), ("first-epoch", True), ("off", False)]
)
def test_hash_check_policy(digits_stores, tmp_path, hash_check, refused):
    """`first-epoch` and `all` both hash every row of the first epoch; `off` checks nothing."""
    config = _config(
        digits_stores,
        tmp_path / hash_check,
        epochs=1,
        dataset="tests.helpers.train_specs:altered",
        hash_check=hash_check,
    )
    if refused:
        with pytest.raises(DatasetMismatchError, match=f"dataset sample {train_specs.ALTERED} "):
            train(config, progress=False)
    else:
        assert len(train(config, progress=False).metrics["train_loss"]) == 1


def test_train_reads_through_a_dask_scheduler_address(digits_stores, tmp_path):
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", dashboard_address=None
    )
    with cluster:
        via_cluster = train(
            _config(
                digits_stores, tmp_path / "c", epochs=2, dask_scheduler=cluster.scheduler_address
            ),
            progress=False,
        )
    local = train(_config(digits_stores, tmp_path / "l", epochs=2), progress=False)
    assert via_cluster.metrics["train_loss"] == local.metrics["train_loss"]
    for pa, pb in zip(via_cluster.student.parameters(), local.student.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("loader", ["process", "thread"])
@pytest.mark.parametrize("store", ["dense", "top5"])
def test_a_gpu_student_trains_as_a_cpu_student(digits_stores, tmp_path, loader, store):
    """The teacher targets a GPU student's step copies (made with the batch, in the batch
    process or on the batch thread) give the loss a CPU student's step computes."""
    runs = {
        device: train(
            _config(
                digits_stores, tmp_path / device, epochs=1, device=device, loader=loader,
                store=digits_stores[store],
            ),
            progress=False,
        ).metrics
        for device in ("cpu", "cuda")
    }  # fmt: skip
    cpu, gpu = runs["cpu"]["first_step_loss"], runs["cuda"]["first_step_loss"]
    assert gpu == pytest.approx(cpu, rel=1e-4)
    # The epoch's loss, summed on the device (`LossSum`): the same steps, their kernels aside.
    assert runs["cuda"]["train_loss"][0] == pytest.approx(runs["cpu"]["train_loss"][0], rel=0.05)
    assert 0.5 < runs["cuda"]["eval_accuracy"][-1] <= 1.0
