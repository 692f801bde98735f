"""`softcache build --lm` end to end, through its command line: the alignment convention (row
``offsets[i] + j`` is the teacher's prediction of token ``j + 1``), ragged datasets with empty
samples, determinism, SIGKILL and resume to the identical store, and the refusals (a changed
dataset, configurations that do not make sense for a language model)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner, Result

from softcache.cli import main
from softcache.data.hashing import fingerprint
from softcache.data.sequences import offsets_of, scan
from softcache.store import (
    ATTR_KEY,
    OFFSETS,
    SHARD_DONE,
    TOKEN_IDS,
    TOKEN_VALUES,
    LogitStore,
    decode_token_rows,
)
from tests.helpers import assert_same_arrays, cli, cli_popen, one_line_error, snapshot
from tests.helpers import token_specs as ts

SPECS = "tests.helpers.token_specs"
SHARD_ROWS = 16  # 358 tokens: 23 shards, the last one short; samples straddle shard boundaries
BATCH = 3
TIMEOUT = 120.0
TOTAL = int(ts.lengths().sum())
SHARDS = -(-TOTAL // SHARD_ROWS)


def _args(
    output: Path, *extra: str, teacher: str = "causal_teacher", dataset: str = "ragged_dataset"
) -> list[str]:
    return [
        "build",
        "--lm",
        "--teacher",
        f"{SPECS}:{teacher}",
        "--dataset",
        f"{SPECS}:{dataset}",
        "-o",
        str(output),
        "--shard-rows",
        str(SHARD_ROWS),
        "--batch-size",
        str(BATCH),
        "--device",
        "cpu",
        "-q",
        *extra,
    ]


def _invoke(args: list[str]) -> Result:
    return CliRunner().invoke(main, args)


def _ok(args: list[str]) -> dict:
    result = _invoke([*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


TOPK = ("--encoding", "topk", "--top-k", "8")
SAMPLED = ("--encoding", "sampled", "--draws", "12")


# ---- the alignment convention --------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        ("--encoding", "topk", "--top-k", "4"),
        ("--encoding", "topk", "--top-k", "4", "--value-bits", "7", "--id-coding", "plain"),
        ("--encoding", "sampled", "--draws", "12"),
    ],
    ids=["topk", "topk-7bit-plain", "sampled"],
)
def test_row_j_predicts_token_j_plus_1(in_root: Path, tmp_path: Path, extra: tuple) -> None:
    out = tmp_path / "next.zarr"
    _ok(_args(out, *extra, teacher="next_token_teacher", dataset="next_token_dataset"))
    store = LogitStore.open(out)
    seqs = ts.next_token_sequences()
    offsets = store.offsets()
    np.testing.assert_array_equal(offsets, offsets_of(ts.lengths()))
    top1 = store.top1()
    assert top1.shape == (TOTAL,)
    checked = 0
    for i, ids in enumerate(seqs):
        rows = top1[offsets[i] : offsets[i + 1]]
        assert len(rows) == len(ids)
        # Position j predicts input_ids[j + 1]; the last position predicts the token after the
        # sample (which the teacher knows, the store does not check).
        np.testing.assert_array_equal(rows[:-1], ids[1:].numpy(), err_msg=f"sample {i}")
        if len(ids):
            assert rows[-1] == ts.next_token(int(ids[-1]))
        checked += max(len(ids) - 1, 0)
    assert checked == TOTAL - (len(seqs) - len(ts.EMPTY_SAMPLES))
    if "plain" in extra:  # the same, read with nothing but zarr: ids in order, values follow them
        group = zarr.open_group(str(out), mode="r")
        ids, values = group[TOKEN_IDS][:], group[TOKEN_VALUES][:]
        assert ids.dtype == np.uint16 and values.dtype == np.uint8
        raw_top1 = ids[np.arange(TOTAL), values.argmax(axis=1)]
        np.testing.assert_array_equal(raw_top1, top1)
        np.testing.assert_array_equal(group[OFFSETS][:], offsets)


# ---- ragged datasets ------------------------------------------------------------------------------


def test_ragged_dataset_with_empty_samples(in_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ragged.zarr"
    summary = _ok(_args(out, *TOPK))
    assert summary["tokens"] == TOTAL and summary["samples"] == ts.NUM_SEQUENCES
    assert summary["shards"] == SHARDS and summary["shards_written"] == SHARDS
    assert summary["vocab_size"] == ts.VOCAB and summary["width"] == 8

    store = LogitStore.open(out)
    meta = store.meta
    assert meta.tokens and meta.complete and meta.format_version == 3
    assert meta.num_tokens == TOTAL == meta.num_rows and meta.num_samples == ts.NUM_SEQUENCES
    assert store.done_mask().all()
    lengths, hashes = scan(ts.ragged_dataset())
    np.testing.assert_array_equal(store.offsets(), offsets_of(lengths))
    np.testing.assert_array_equal(store.sample_hashes(), hashes)
    # The fingerprint covers the sample boundaries too (offsets), not only each sample's hash.
    assert meta.dataset["fingerprint"] == fingerprint(hashes, offsets_of(lengths))
    offsets = store.offsets()
    for i in ts.EMPTY_SAMPLES:
        assert offsets[i] == offsets[i + 1]

    # Every row is the teacher's distribution at that position of its sample run alone: batching,
    # padding and shard boundaries change nothing but float rounding.
    decoded = decode_token_rows(store.read_rows(0, TOTAL), meta)
    reference = torch.log_softmax(ts.reference_logits(ts.causal_teacher(), ts.sequences()), dim=1)
    top = reference.topk(8, dim=1)
    for row in range(TOTAL):
        assert set(decoded["indices"][row].tolist()) == set(top.indices[row].tolist()), row
    torch.testing.assert_close(
        decoded["values"], reference.gather(1, decoded["indices"]), rtol=2e-3, atol=2e-3
    )


def test_padded_dict_items_build_the_same_arrays(in_root: Path, tmp_path: Path) -> None:
    """Right-padded dict items with attention masks: the padding is not stored, and the rows are
    bit for bit those of the unpadded items."""
    a, b = tmp_path / "tuples.zarr", tmp_path / "dicts.zarr"
    _ok(_args(a, *SAMPLED))
    _ok(_args(b, *SAMPLED, dataset="dict_dataset"))
    assert_same_arrays(a, b)


@pytest.mark.parametrize(
    ("teacher", "dataset", "fragments"),
    [
        ("causal_teacher", "empty_token_dataset", ("holds no tokens",)),
        ("causal_teacher", "left_padded_dataset", ("dataset item 1", "right padding")),
        ("wrong_vocab_teacher", "ragged_dataset", ("logits per token",)),
    ],
    ids=["no-tokens", "left-padded", "ragged-vocabulary"],
)
def test_bad_data_or_teacher_is_one_line(
    in_root: Path, tmp_path: Path, teacher: str, dataset: str, fragments: tuple
) -> None:
    result = _invoke(_args(tmp_path / "s.zarr", *TOPK, teacher=teacher, dataset=dataset))
    one_line_error(result, *fragments)


def test_a_classifier_teacher_is_refused(in_root: Path, tmp_path: Path) -> None:
    args = _args(tmp_path / "s.zarr", *TOPK)
    args[args.index(f"{SPECS}:causal_teacher")] = "tests.helpers.specs:teacher"
    one_line_error(_invoke(args), "the teacher failed on sample 1")


# ---- determinism ----------------------------------------------------------------------------------


def test_sampled_builds_are_deterministic_and_seeded(in_root: Path, tmp_path: Path) -> None:
    a, b, c = (tmp_path / f"{name}.zarr" for name in "abc")
    _ok(_args(a, *SAMPLED, "--seed", "3"))
    _ok(_args(b, *SAMPLED, "--seed", "3"))
    assert_same_arrays(a, b)
    _ok(_args(c, *SAMPLED, "--seed", "4"))
    ga, gc = zarr.open_group(str(a), mode="r"), zarr.open_group(str(c), mode="r")
    assert not np.array_equal(ga["token_counts"][:], gc["token_counts"][:])


# ---- kill and resume ------------------------------------------------------------------------------


def _done_mask(path: Path) -> np.ndarray | None:
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


def _meta_without_run_details(path: Path) -> dict:
    meta = dict(zarr.open_group(str(path), mode="r").attrs[ATTR_KEY])
    meta.pop("created")
    meta["build_config"] = {k: v for k, v in meta["build_config"].items() if k != "output"}
    return meta


@pytest.mark.parametrize(
    "extra",
    [("--encoding", "topk", "--top-k", "8", "--value-bits", "7"), SAMPLED],
    ids=["topk-7bit", "sampled"],
)
def test_killed_build_resumes_to_the_identical_store(
    in_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: tuple
) -> None:
    killed, reference = tmp_path / "killed.zarr", tmp_path / "reference.zarr"
    args = _args(killed, *extra, "--batch-size", "2")
    log = tmp_path / "killed.log"
    kill_at = 4
    proc = cli_popen(args, {"SOFTCACHE_TEST_LM_SLEEP": "0.04"}, log)
    try:
        _wait_for(
            lambda: (m := _done_mask(killed)) is not None and m.sum() >= kill_at,
            proc,
            log,
            f"{kill_at} shards to be recorded done",
        )
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    n_done = int(LogitStore.open(killed, require_complete=False).done_mask().sum())
    assert kill_at <= n_done < SHARDS, f"killed too late: {n_done} of {SHARDS} shards done"
    assert zarr.open_group(str(killed), mode="r").attrs[ATTR_KEY]["complete"] is False

    # The same command again, in another process (fast now: sleeping changes no value).
    resumed = cli(*args, "--json", env={"SOFTCACHE_TEST_LM_SLEEP": "0"})
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["shards_resumed"] == n_done
    assert summary["shards_written"] == SHARDS - n_done

    monkeypatch.delenv("SOFTCACHE_TEST_LM_SLEEP", raising=False)
    _ok(_args(reference, *extra, "--batch-size", "2"))
    assert LogitStore.open(killed).done_mask().all()
    assert_same_arrays(killed, reference)
    files = {
        name: data
        for name, data in snapshot(killed).items()
        if name != "zarr.json" and not name.endswith(".partial")
    }
    assert files == {n: d for n, d in snapshot(reference).items() if n != "zarr.json"}
    assert _meta_without_run_details(killed) == _meta_without_run_details(reference)


def _partial(path: Path, keep: int) -> None:
    """Turn a finished store into what a build killed after `keep` shards leaves behind."""
    group = zarr.open_group(str(path), mode="r+")
    attrs = dict(group.attrs[ATTR_KEY])
    group.attrs[ATTR_KEY] = {
        **attrs,
        "complete": False,
        "dataset": {**attrs["dataset"], "fingerprint": None},
    }
    done = group[SHARD_DONE]
    done[keep:] = 0


@pytest.mark.parametrize(
    ("variant", "fragments"),
    [
        ("token", ("built from other data", "1 sample(s) differ", f"first: {ts.CHANGED_SAMPLE}")),
        ("swap", ("built from other data", "2 sample(s) differ", f"first: {ts.CHANGED_SAMPLE}")),
        ("length", ("different configuration", f"num_tokens: stored {TOTAL}, now {TOTAL + 1}")),
    ],
)
def test_resume_with_a_changed_dataset_is_refused(
    in_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant: str, fragments: tuple
) -> None:
    out, reference = tmp_path / "s.zarr", tmp_path / "reference.zarr"
    args = _args(out, *TOPK)
    _ok(args)
    _ok(_args(reference, *TOPK))
    _partial(out, keep=5)
    before = snapshot(out)

    monkeypatch.setenv("SOFTCACHE_TEST_LM_VARIANT", variant)
    one_line_error(_invoke(args), *fragments, "--overwrite")
    assert snapshot(out) == before  # refused before touching anything

    # The original data resumes it; the changed data replaces it with --overwrite.
    monkeypatch.delenv("SOFTCACHE_TEST_LM_VARIANT")
    summary = _ok(args)
    assert summary["shards_resumed"] == 5 and summary["shards_written"] == SHARDS - 5
    assert_same_arrays(out, reference)
    monkeypatch.setenv("SOFTCACHE_TEST_LM_VARIANT", variant)
    _ok([*args, "--overwrite"])
    lengths, hashes = scan(ts.ragged_dataset())
    store = LogitStore.open(out)
    np.testing.assert_array_equal(store.offsets(), offsets_of(lengths))
    np.testing.assert_array_equal(store.sample_hashes(), hashes)


# ---- refused configurations -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (("--encoding", "dense"), ("--lm stores are sparse", "--encoding topk")),
        ((), ("--lm stores are sparse",)),  # dense is the default encoding
        (("--encoding", "topk", "--value-bits", "17"), ("value_bits must be in 0..16",)),
        (("--encoding", "sampled", "--draws", "0"), ("draws",)),
        (("--encoding", "sampled", "--draws", "65536"), ("draws must be in [1, 65535]",)),
        (("--encoding", "topk", "--top-k", "301"), ("top-k must be in [1, 300]",)),
        (("--encoding", "topk", "--lm-temperature", "0"), ("lm_temperature must be > 0",)),
        (
            ("--encoding", "topk", "--views", "2", "--augment", "flip"),
            ("views does not apply to language-model (--lm) runs",),
        ),
    ],
    ids=[
        "dense",
        "default-dense",
        "value-bits",
        "no-draws",
        "too-many-draws",
        "k-over-vocab",
        "temperature",
        "views",
    ],
)
def test_lm_configurations_that_make_no_sense(
    in_root: Path, tmp_path: Path, extra: tuple, fragments: tuple
) -> None:
    out = tmp_path / "s.zarr"
    one_line_error(_invoke(_args(out, *extra)), *fragments)
    assert not out.exists() or not any(out.iterdir())


def test_sampled_needs_lm(in_root: Path, tmp_path: Path) -> None:
    args = [
        "build",
        "--teacher",
        "tests.helpers.specs:teacher",
        "--dataset",
        "tests.helpers.specs:dataset",
        "-o",
        str(tmp_path / "s.zarr"),
        "--encoding",
        "sampled",
        "-q",
    ]
    one_line_error(_invoke(args), "--encoding sampled is for language models", "--lm")
    assert not (tmp_path / "s.zarr").exists()


def test_merge_refuses_token_stores(in_root: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    _ok(_args(a, *SAMPLED))
    _ok(_args(b, *SAMPLED, "--seed", "1"))
    result = _invoke(["merge", str(a), str(b), "-o", str(tmp_path / "m.zarr")])
    one_line_error(result, "per-token LM store", "row stores only")
