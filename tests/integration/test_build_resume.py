"""The fault test: a build killed with SIGKILL and resumed by the same command ends with exactly the
store an uninterrupted build writes, array by array and file by file."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from softcache.builder import build
from softcache.config import BuildConfig
from softcache.errors import IncompleteStoreError
from softcache.store import ATTR_KEY, LogitStore
from tests.helpers import assert_same_arrays, cli, cli_popen, snapshot

SPECS = "tests.helpers.specs"
N = 400
SHARD_ROWS = 16
BATCH = 8
TIMEOUT = 120.0


@dataclasses.dataclass(frozen=True)
class Variant:
    teacher: str
    extra: dict
    sleep: float  # seconds per item in the killed run
    kill_at: int  # kill once this many shards are recorded done (0: as soon as the store exists)


VARIANTS = {
    "dense-midway": Variant("conv_teacher", {}, 0.01, 5),
    "dense-first-shard": Variant("conv_teacher", {}, 0.1, 0),
    "topk-midway": Variant(
        "wide_teacher",
        {"encoding": "topk", "top_k": 5, "dtype": "bfloat16", "temperatures": (1.0, 3.0)},
        0.01,
        5,
    ),
    "views-midway": Variant(
        "conv_teacher",
        {"views": 4, "augment": "crop(size=8,scale=0.4:1);flip", "augment_seed": 3},
        0.005,
        12,
    ),
}


def _config(output: Path, variant: Variant) -> BuildConfig:
    return BuildConfig(
        teacher=f"{SPECS}:{variant.teacher}",
        dataset=f"{SPECS}:slow_dataset",
        output=str(output),
        shard_rows=SHARD_ROWS,
        batch_size=BATCH,
        device="cpu",
        **variant.extra,
    )


def _cli_args(config: BuildConfig) -> list[str]:
    args = ["build", "--teacher", config.teacher, "--dataset", config.dataset]
    args += ["--output", config.output, "--encoding", config.encoding, "--dtype", config.dtype]
    args += ["--top-k", str(config.top_k), "--shard-rows", str(config.shard_rows)]
    args += ["--batch-size", str(config.batch_size), "--device", config.device, "-q"]
    if config.augment:
        args += ["--views", str(config.views), "--augment", config.augment]
        args += ["--augment-seed", str(config.augment_seed)]
    return [*args, "--temperatures", ",".join(str(t) for t in config.temperatures)]


def _done_mask(path: Path) -> np.ndarray | None:
    """The store's shard_done record, or None while the store is still being created."""
    try:
        return LogitStore.open(path, require_complete=False).done_mask()
    except Exception:  # not there yet, or half-created: keep polling
        return None


def _wait_for(predicate: Callable[[], bool], proc, log: Path, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the build exited ({proc.returncode}) before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()}")
        time.sleep(0.005)


def _comparable_files(path: Path) -> dict[str, bytes]:
    """Every file of a store but the group metadata (which records creation time and output) and
    the `.partial` temporaries a killed atomic write may leave behind (zarr never reads them)."""
    return {
        name: data
        for name, data in snapshot(path).items()
        if name != "zarr.json" and not name.endswith(".partial")
    }


@pytest.mark.parametrize("name", list(VARIANTS))
def test_killed_build_resumes_to_the_identical_store(
    name: str, in_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    variant = VARIANTS[name]
    env = {"SOFTCACHE_TEST_N": str(N), "SOFTCACHE_TEST_SLEEP": str(variant.sleep)}
    killed = tmp_path / "killed.zarr"
    config = _config(killed, variant)
    shards = N * config.views // SHARD_ROWS  # 25, or 100 with 4 views

    # 1. Start the build in a subprocess, wait until it is where we want it, SIGKILL it.
    log = tmp_path / "killed.log"
    proc = cli_popen(_cli_args(config), env, log)
    try:
        if variant.kill_at:
            _wait_for(
                lambda: (m := _done_mask(killed)) is not None and m.sum() >= variant.kill_at,
                proc,
                log,
                f"{variant.kill_at} shards to be recorded done",
            )
        else:
            _wait_for(lambda: _done_mask(killed) is not None, proc, log, "the store to exist")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    # 2. The store is recognisably partial: refused by readers, its record short of all shards.
    done = LogitStore.open(killed, require_complete=False).done_mask()
    n_done = int(done.sum())
    if variant.kill_at:
        assert variant.kill_at <= n_done < shards, f"killed too late: {n_done} shards done"
    else:
        assert n_done == 0, "the build got past its first shard before the kill"
    attrs = zarr.open_group(str(killed), mode="r").attrs[ATTR_KEY]
    assert attrs["complete"] is False and attrs["dataset"]["fingerprint"] is None
    with pytest.raises(IncompleteStoreError, match=rf"\({n_done} of {shards} shards written\)"):
        LogitStore.open(killed)

    # 3. Resume with the same command (fast now: sleeping changes no value).
    proc2 = cli(*_cli_args(config), "--json", env={**env, "SOFTCACHE_TEST_SLEEP": "0"})
    assert proc2.returncode == 0, proc2.stderr
    summary = json.loads(proc2.stdout)
    assert summary["shards_resumed"] == n_done
    assert summary["shards_written"] == shards - n_done

    # 4. An uninterrupted build of the same configuration, here in the test process.
    monkeypatch.setenv("SOFTCACHE_TEST_N", str(N))
    monkeypatch.setenv("SOFTCACHE_TEST_SLEEP", "0")
    reference = tmp_path / "reference.zarr"
    build(dataclasses.replace(config, output=str(reference)), progress=False)

    # 5. Identical: every array (integer and float, compared as bits), every chunk file, and the
    #    metadata but for the creation time and the output path.
    resumed_store = LogitStore.open(killed)
    assert resumed_store.done_mask().all()
    assert_same_arrays(killed, reference)
    assert _comparable_files(killed) == _comparable_files(reference)
    # The manifest (every object's SHA-256) is among those files: the same as uninterrupted.
    assert "manifest/zarr.json" in _comparable_files(killed)
    got = dict(zarr.open_group(str(killed), mode="r").attrs[ATTR_KEY])
    want = dict(zarr.open_group(str(reference), mode="r").attrs[ATTR_KEY])
    for meta in (got, want):
        meta.pop("created")
        meta["build_config"] = {k: v for k, v in meta["build_config"].items() if k != "output"}
    assert got == want
    assert got["complete"] is True and got["dataset"]["fingerprint"]


def test_killed_while_creating_the_store_resumes(
    make_store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOFTCACHE_TEST_N", "64")
    monkeypatch.setenv("SOFTCACHE_TEST_SLEEP", "0")
    variant = VARIANTS["dense-midway"]
    config = _config(tmp_path / "s.zarr", variant)
    reference, _ = make_store("reference.zarr", **_fields(config, output=None))
    # Recreate the state a SIGKILL between the metadata write and the array creation leaves.
    out = Path(config.output)
    LogitStore.create(out, dataclasses.replace(LogitStore.open(reference).meta, complete=False))
    for child in out.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
    build(config, progress=False)  # the same command again
    assert_same_arrays(out, reference)


def _fields(config: BuildConfig, **changes) -> dict:
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    values.update(changes)
    return {k: v for k, v in values.items() if v is not None}


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after the point it is raised from runs."""


def test_store_creation_never_leaves_a_group_without_metadata(
    make_store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOFTCACHE_TEST_N", "64")
    monkeypatch.setenv("SOFTCACHE_TEST_SLEEP", "0")
    config = _config(tmp_path / "s.zarr", VARIANTS["dense-midway"])
    reference, _ = make_store("reference.zarr", **_fields(config, output=None))
    meta = dataclasses.replace(LogitStore.open(reference).meta, complete=False)

    def die(*args, **kwargs):
        raise _Killed

    # Die at the first metadata or array write after the group exists.
    with monkeypatch.context() as m:
        m.setattr(zarr.core.attributes.Attributes, "__setitem__", die)
        m.setattr(zarr.Group, "create_array", die)
        with pytest.raises(_Killed):
            LogitStore.create(config.output, meta)
    group_json = Path(config.output) / "zarr.json"
    if group_json.exists():
        assert ATTR_KEY in json.loads(group_json.read_text()).get("attributes", {})
    build(config, progress=False)  # the same command again
    assert_same_arrays(Path(config.output), reference)
