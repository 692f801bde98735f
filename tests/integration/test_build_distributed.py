"""Builds on a Dask cluster: the same store as one process writes, a killed worker's shards
recomputed elsewhere, errors from workers reported as the user's one-line message.

The clusters are real `LocalCluster`s of worker processes (spawned, so they inherit this process's
environment and working directory at start: the helper specs import and `SOFTCACHE_TEST_*` apply).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from softcache.builder import BuildResult, build
from softcache.builder.cluster import task_ranges
from softcache.config import BuildConfig
from softcache.errors import ConfigError, TeacherOutputError
from softcache.store import LogitStore
from tests.conftest import SMALL, spec
from tests.helpers import assert_same_arrays, cli
from tests.helpers.specs import NAN_SAMPLE

distributed = pytest.importorskip("distributed")

N = 400
SHARD_ROWS = 16
SHARDS = N // SHARD_ROWS  # 25
TIMEOUT = 180.0


@pytest.fixture
def cluster(in_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Two single-threaded worker processes on this machine, with the test's data size."""
    monkeypatch.setenv("SOFTCACHE_TEST_N", str(N))
    monkeypatch.setenv("SOFTCACHE_TEST_SLEEP", "0.01")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    try:
        yield cluster
    finally:
        cluster.close()


def _config(output: Path, **changes: object) -> BuildConfig:
    values = {
        **SMALL,
        "teacher": spec("conv_teacher"),
        "dataset": spec("slow_dataset"),
        "output": str(output),
        "shard_rows": SHARD_ROWS,
        "batch_size": 8,
        **changes,
    }
    return BuildConfig(**values)  # type: ignore[arg-type]


def _reference(tmp_path: Path, config: BuildConfig, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The same configuration built in this process, without Dask."""
    monkeypatch.setenv("SOFTCACHE_TEST_SLEEP", "0")
    out = tmp_path / "reference.zarr"
    build(
        dataclasses.replace(config, output=str(out), dask_scheduler=None, workers=0),
        progress=False,
    )
    return out


def test_scheduler_build_equals_the_single_process_build(
    cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "dist.zarr"
    config = _config(out, encoding="topk", top_k=4, dtype="bfloat16")
    args = ["build", "--teacher", config.teacher, "--dataset", config.dataset, "-o", str(out)]
    args += ["--encoding", "topk", "--top-k", "4", "--dtype", "bfloat16", "--device", "cpu"]
    args += ["--shard-rows", str(SHARD_ROWS), "--batch-size", "8", "--shards-per-task", "3"]
    args += ["--dask-scheduler", cluster.scheduler_address, "--json"]  # type: ignore[attr-defined]
    proc = cli(*args, env={"SOFTCACHE_TEST_N": str(N), "SOFTCACHE_TEST_SLEEP": "0"})
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["shards_written"] == SHARDS and summary["samples"] == N
    assert "build [" in proc.stderr and f"{N}/{N}" in proc.stderr  # progress across the cluster
    assert_same_arrays(out, _reference(tmp_path, config, monkeypatch))


def test_workers_option_starts_a_local_cluster(in_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "local.zarr"
    args = ["build", "--teacher", spec("conv_teacher"), "--dataset", spec("dataset")]
    args += ["-o", str(out), "--device", "cpu", "--shard-rows", "64", "--workers", "2", "--json"]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["shards_written"] == 5
    store = LogitStore.open(out)
    assert store.meta.complete and store.meta.build_config["workers"] == 2


def test_a_killed_worker_has_its_shards_recomputed(
    cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path / "killed.zarr", shards_per_task=2)
    client = distributed.Client(cluster)
    outcome: dict[str, BuildResult | BaseException] = {}

    def run() -> None:
        try:
            outcome["result"] = build(config, progress=False, client=client)
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    try:
        # Wait until shards are being recorded, then SIGKILL a worker in the middle of a task.
        deadline = time.monotonic() + TIMEOUT
        victim = None
        while victim is None:
            assert time.monotonic() < deadline, "the build never got going"
            assert thread.is_alive(), outcome
            done = _done(config.output)
            busy = [w for w, keys in client.processing().items() if keys]
            if done is not None and 2 <= done < SHARDS - 6 and busy:
                victim = busy[0]
            else:
                time.sleep(0.01)
        in_flight = list(client.processing()[victim])
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "the build did not finish after a worker died"
    finally:
        thread.join(1)
        client.close()
    assert "error" not in outcome, outcome.get("error")
    assert in_flight, "the killed worker held no task"
    result = outcome["result"]
    assert isinstance(result, BuildResult) and result.shards_written == SHARDS
    store = LogitStore.open(config.output)
    assert store.meta.complete and store.done_mask().all()
    assert_same_arrays(Path(config.output), _reference(tmp_path, config, monkeypatch))


def _done(path: str) -> int | None:
    try:
        return int(LogitStore.open(path, require_complete=False).done_mask().sum())
    except Exception:  # not created yet
        return None


def test_a_worker_error_reaches_the_user_as_one_line(in_root: Path, tmp_path: Path) -> None:
    args = ["build", "--teacher", spec("nan_teacher"), "--dataset", spec("dataset")]
    args += ["-o", str(tmp_path / "nan.zarr"), "--device", "cpu", "--shard-rows", "64"]
    proc = cli(*args, "--workers", "2", "-q")
    assert proc.returncode == 1
    assert f"non-finite logits (NaN or inf) for sample {NAN_SAMPLE}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_unreachable_scheduler_is_a_clear_error(in_root: Path, tmp_path: Path) -> None:
    args = ["build", "--teacher", spec("teacher"), "--dataset", spec("dataset")]
    args += ["-o", str(tmp_path / "s.zarr"), "--dask-scheduler", "tcp://127.0.0.1:9", "-q"]
    proc = cli(*args)
    assert proc.returncode == 1
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in proc.stderr


def test_workers_and_scheduler_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        _config(tmp_path / "s.zarr", workers=2, dask_scheduler="tcp://127.0.0.1:8786")


@given(
    todo=st.lists(st.integers(0, 500), unique=True).map(sorted),
    workers=st.integers(1, 16),
    per_task=st.integers(0, 10),
)
def test_task_ranges_cover_every_shard_once_in_order(
    todo: list[int], workers: int, per_task: int
) -> None:
    tasks = task_ranges(todo, workers, per_task)
    assert [s for task in tasks for s in task] == todo
    assert all(task for task in tasks)
    limit = per_task or 8
    assert all(len(task) <= limit for task in tasks)


def test_teacher_output_error_pickles_through_dask() -> None:
    # Workers hand exceptions back pickled; the CLI's one-line message relies on the type surviving.
    import pickle

    error = pickle.loads(pickle.dumps(TeacherOutputError("sample 3: bad")))
    assert isinstance(error, TeacherOutputError) and str(error) == "sample 3: bad"


@pytest.mark.parametrize("encoding", [("topk", "--top-k", "8"), ("sampled", "--draws", "12")])
def test_lm_build_on_a_cluster_equals_the_single_process_build(
    cluster, tmp_path: Path, encoding: tuple[str, ...]
) -> None:
    """build --lm on a Dask cluster: shards of tokens as tasks, samples straddling them included,
    sampled draws seeded per shard: the same bytes as one process."""
    lm = "tests.helpers.token_specs"
    args = ["build", "--lm", "--teacher", f"{lm}:causal_teacher", "--dataset"]
    args += [f"{lm}:ragged_dataset", "--encoding", *encoding, "--shard-rows", "32"]
    args += ["--batch-size", "4", "--device", "cpu", "--json"]
    single = tmp_path / "single.zarr"
    proc = cli(*args, "-o", str(single))
    assert proc.returncode == 0, proc.stderr
    dist = tmp_path / "dist.zarr"
    address = cluster.scheduler_address  # type: ignore[attr-defined]
    proc = cli(*args, "-o", str(dist), "--dask-scheduler", address, "--shards-per-task", "2")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["shards_written"] == summary["shards"] > 2
    assert_same_arrays(dist, single)
    assert LogitStore.open(dist).meta.build_config["dask_scheduler"] == address
