"""`softcache verify` on real stores: a good store passes, and each kind of damage a shared store can
suffer fails with a message that names what is wrong and where (array, shard and rows, or samples).

Damage is done to a copy of the session's stores, directly on the files, as a bad disk, a failed copy
or a killed build would leave them.
"""

from __future__ import annotations

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
from click.testing import CliRunner, Result

from softcache.cli import main
from softcache.store import ATTR_KEY, FORMAT_VERSION, LogitStore
from tests.conftest import spec
from tests.helpers import NEWER, READABLE, cli, cli_popen
from tests.helpers.share_specs import SWAPPED

SHARE = "tests.helpers.share_specs"
# The session stores hold 300 rows in shards of 64: shard 2 is rows 128..191, shard 4 rows 256..299.


def _verify(*args: str) -> Result:
    return CliRunner().invoke(main, ["verify", *args, "-q"])


def _copy(store: Path, tmp_path: Path) -> Path:
    out = tmp_path / store.name
    shutil.copytree(store, out)
    return out


def _problems(store: Path, *args: str) -> list[str]:
    """The problems `verify --json` reports (it must fail)."""
    result = _verify(str(store), "--json", *args)
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is False
    return report["problems"]


# ---- a good store -------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "arrays"), [("dense", 3), ("topk", 5)])
def test_good_store_passes(built_stores, in_root, kind, arrays):
    result = _verify(str(built_stores[kind]))
    assert result.exit_code == 0, result.output
    store = LogitStore.open(built_stores[kind])
    assert result.stdout.strip() == (
        f"OK  {built_stores[kind]}: 5 shards of {arrays} arrays verified, "
        f"{store.meta.manifest['objects']} objects match digest {store.digest}"
    )
    assert result.stderr == ""


@pytest.mark.parametrize("kind", ["dense", "topk"])
def test_good_store_matches_its_dataset(built_stores, in_root, kind):
    result = _verify(str(built_stores[kind]), "--dataset", spec("dataset"))
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip().endswith(f", 300 samples match {spec('dataset')}")


def test_good_store_json_report(built_stores, in_root):
    result = _verify(str(built_stores["topk"]), "--json", "--dataset", spec("dataset"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["problems"] == []
    assert report["checked"]["format_version"] == FORMAT_VERSION
    assert report["checked"]["shards"] == 5
    assert report["checked"]["arrays"] == sorted(
        ["topk_values", "topk_indices", "lse", "sample_hash", "shard_done"]
    )
    assert report["checked"]["dataset"] == {"spec": spec("dataset"), "num_samples": 300}


# ---- damaged files --------------------------------------------------------------------------------


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate_to_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _set_value(name: str, row: int, value: float) -> Callable[[Path], None]:
    """Write one element through zarr itself: the chunk stays valid, its content is wrong."""

    def damage(store: Path) -> None:
        arr = zarr.open_group(str(store), mode="r+")[name]
        arr[row, ...] = value

    return damage


# (store kind, file or array to damage, damage, fragments the single problem line must hold)
DAMAGE = {
    "flipped-byte-dense": (
        "dense",
        "logits/c/2/0",
        _flip_middle_byte,
        ["array logits, shard 2 (rows 128..191): cannot be read", "checksum"],
    ),
    "flipped-byte-topk-indices": (
        "topk",
        "topk_indices/c/1/0",
        _flip_middle_byte,
        ["array topk_indices, shard 1 (rows 64..127): cannot be read", "checksum"],
    ),
    "truncated-shard": (
        "dense",
        "logits/c/4/0",
        _truncate_to_half,
        ["array logits, shard 4 (rows 256..299): cannot be read"],
    ),
    "truncated-hash-shard": (
        "topk",
        "sample_hash/c/3",
        _truncate_to_half,
        ["array sample_hash, shard 3 (rows 192..255): cannot be read"],
    ),
    "deleted-shard-object": (
        "dense",
        "logits/c/3/0",
        os.remove,
        ["array logits, shard 3 (rows 192..255): object logits/c/3/0 is missing"],
    ),
    "deleted-lse-shard": (
        "topk",
        "lse/c/0/0",
        os.remove,
        ["array lse, shard 0 (rows 0..63): object lse/c/0/0 is missing"],
    ),
    "missing-logits-array": ("dense", "logits", shutil.rmtree, ["missing array(s) logits"]),
    "missing-lse-array": ("topk", "lse", shutil.rmtree, ["missing array(s) lse"]),
    "nan-logit": (
        "dense",
        None,
        _set_value("logits", 200, float("nan")),
        ["array logits, shard 3 (rows 192..255): holds non-finite values"],
    ),
    "altered-sample-hash": (
        "dense",
        None,
        _set_value("sample_hash", 5, 12345),
        ["sample_hash does not reproduce the recorded dataset fingerprint"],
    ),
}


# The object each damage rewrites with a valid checksum (through zarr).
REWRITTEN = {"nan-logit": "logits/c/3/0", "altered-sample-hash": "sample_hash/c/0"}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_named_with_array_and_shard(built_stores, in_root, tmp_path, case):
    kind, target, damage, fragments = DAMAGE[case]
    store = _copy(built_stores[kind], tmp_path)
    damage(store / target if target else store)

    result = _verify(str(store))
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    # A value written through zarr (with a valid checksum) also changes its object: the
    # manifest names it, once; damage the checksum already catches is not named twice.
    rewritten = REWRITTEN.get(case)
    if rewritten is not None:
        manifest_line = f"FAIL  object {rewritten} does not match the manifest"
        named = [line for line in lines if line.startswith(manifest_line)]
        assert len(named) == 1, lines
        lines = [line for line in lines if line not in named]
    assert len(lines) == 1, lines  # exactly the damage, nothing else flagged
    assert lines[0].startswith("FAIL  ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


def test_shard_truncated_to_zero_bytes_is_caught(built_stores, in_root, tmp_path):
    store = _copy(built_stores["dense"], tmp_path)
    (store / "logits/c/2/0").write_bytes(b"")
    # What a reader sees: the shard's 64 rows are all zero logits, recorded as written.
    assert (zarr.open_group(str(store), mode="r")["logits"][128:192] == 0).all()
    problems = _problems(store)
    assert any("array logits" in p and "shard 2 (rows 128..191)" in p for p in problems)


def test_json_report_lists_every_problem(built_stores, in_root, tmp_path):
    store = _copy(built_stores["dense"], tmp_path)
    _flip_middle_byte(store / "logits/c/1/0")
    os.remove(store / "logits/c/3/0")
    problems = _problems(store)
    assert len(problems) == 2, problems
    assert "array logits, shard 1 (rows 64..127): cannot be read" in problems[0]
    assert "array logits, shard 3 (rows 192..255): object logits/c/3/0 is missing" in problems[1]


# ---- a store that never finished ---------------------------------------------------------------


def test_unfinished_store_names_the_unwritten_shard(built_stores, in_root, tmp_path):
    """`complete` unset and shard 4 not recorded: the state a build killed in its last shard leaves."""
    store = _copy(built_stores["dense"], tmp_path)
    group = zarr.open_group(str(store), mode="r+")
    group.attrs[ATTR_KEY] = {**group.attrs[ATTR_KEY], "complete": False}
    group["shard_done"][4] = 0
    problems = _problems(store)
    assert problems == [
        "build incomplete: 4 of 5 shards written (complete is unset)",
        "shard 4 (rows 256..299) is not recorded as written in shard_done",
    ]


@pytest.mark.slow
def test_sigkilled_build_fails_verify_and_info_reports_it(in_root, tmp_path):
    """A real build, SIGKILLed midway (as in test_build_resume), then `verify` and `info`."""
    n, shard_rows, shards = 160, 16, 10
    env = {"SOFTCACHE_TEST_N": str(n), "SOFTCACHE_TEST_SLEEP": "0.02"}
    store = tmp_path / "killed.zarr"
    args = ["build", "--teacher", spec("teacher"), "--dataset", spec("slow_dataset")]
    args += ["--output", str(store), "--shard-rows", str(shard_rows), "--batch-size", "8"]
    args += ["--device", "cpu", "-q"]
    log = tmp_path / "build.log"
    proc = cli_popen(args, env, log)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"the build ended before the kill:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no shard was written:\n{log.read_text()}"
            try:
                if LogitStore.open(store, require_complete=False).done_mask().sum() >= 2:
                    break
            except Exception:  # not created yet
                pass
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    done = LogitStore.open(store, require_complete=False).done_mask()
    n_done = int(done.sum())
    assert 2 <= n_done < shards, f"killed too late: {n_done} shards done"
    first_missing = int(np.flatnonzero(~done)[0])

    # A real process: exit status 1, the findings on stderr, no traceback.
    proc = cli("verify", str(store), "-q", env={"SOFTCACHE_TEST_N": str(n)})
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == (
        f"FAIL  build incomplete: {n_done} of {shards} shards written (complete is unset)"
    )
    start = first_missing * shard_rows
    assert (
        f"FAIL  shard {first_missing} (rows {start}..{start + shard_rows - 1}) is not recorded "
        "as written in shard_done"
    ) in lines

    result = CliRunner().invoke(main, ["info", str(store)])
    assert result.exit_code == 0, result.output
    assert f"INCOMPLETE: {n_done} of {shards} shards written" in result.stdout


# ---- a store from a newer softcache ------------------------------------------------------------


def test_newer_format_version_is_refused_naming_the_version(built_stores, in_root, tmp_path):
    store = _copy(built_stores["dense"], tmp_path)
    group = zarr.open_group(str(store), mode="r+")
    newer = NEWER
    group.attrs[ATTR_KEY] = {**group.attrs[ATTR_KEY], "format_version": newer}
    problems = _problems(store)
    assert len(problems) == 1
    assert f"format_version {newer}" in problems[0]
    assert f"reads only versions {READABLE}" in problems[0]


# ---- the wrong dataset ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "topk"])
def test_swapped_samples_are_both_named(built_stores, in_root, kind):
    result = _verify(str(built_stores[kind]), "--dataset", f"{SHARE}:swapped_dataset")
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    a, b = SWAPPED
    assert f"2 dataset sample(s) do not match the store: indices {a}, {b};" in lines[0]


def test_shorter_dataset_is_named_with_both_lengths(built_stores, in_root, monkeypatch):
    monkeypatch.setenv("SOFTCACHE_TEST_N", "200")
    problems = _problems(built_stores["dense"], "--dataset", spec("dataset"))
    assert problems == [f"dataset {spec('dataset')} has 200 samples but the store holds 300"]


def test_not_a_store_is_one_failure_line(in_root, tmp_path):
    (tmp_path / "empty").mkdir()
    result = _verify(str(tmp_path / "empty"))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"FAIL  store {tmp_path / 'empty'} does not exist or is not a Zarr group (no zarr.json)"
    ]
