"""Stores from other teams are untrusted input: tampered metadata never crashes a reader.

A property test (hypothesis) changes one value of one `zarr.json` of a store of each kind (dense,
top-k, views, token top-k, token sampled): the group's, an array's or the manifest's, by
replacing a value with another of any JSON type and size, deleting it, adding one, or replacing
the whole file with bytes that are not JSON. Every reader then runs over the tampered store in a
subprocess whose address space is capped (`RLIMIT_AS`, `tests.helpers.tamper.MEMORY_LIMIT`):
`info`, `ls`, `verify`, `train`, `train --expect-digest` (pinned to the untampered store's
digest), `merge` and `softcache.open_store`. Each must exit 0 or 1 without a traceback (a reader
that tried to allocate what the metadata claims would die with a MemoryError); an `Error:` is one
line; `ls` always lists (exit 0); and the pinned `train` refuses every store whose bytes changed.

The named mutations of the tamper table (`scripts/tamper_table.py`: the cases issue 16 found) run
the same way, each with its expected refusal.

SOFTCACHE_TAMPER_EXAMPLES sets the examples per store kind (default 8; the `slow` variant 60).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.tamper import (
    KINDS,
    NAMED,
    ReaderOutcome,
    Worker,
    apply_named,
    build_stores,
    describe_mutation,
    json_paths,
    metadata_files,
    mutate,
)

EXAMPLES = int(os.environ.get("SOFTCACHE_TAMPER_EXAMPLES", "8"))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """One complete store of each kind, and its digest."""
    import softcache

    stores = build_stores(tmp_path_factory.mktemp("pristine"))
    return {kind: (path, softcache.open_store(str(path)).digest) for kind, path in stores.items()}


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    w = Worker()
    yield w
    w.close()


# ---- values ---------------------------------------------------------------------------------------

_SPECIAL = [
    None, True, False, 0, -1, 1, 2, 3, 7, 64, 10**9, 10**12, 10**15, 2**63, -(2**63), 1.5, -0.0,
    1e300, float("inf"), float("nan"), "", "no", "x", "1", "float64", "int8", "uint64", "zstd",
    "gzip", "sharding_indexed", "tokens", "rows", "topk", "dense", "sampled", "end", "big",
    [], {}, [0], [1, 2], [10**12, 10], [[]], {"name": "bytes"}, {"name": "lz4"},
]  # fmt: skip


def _values(original: object) -> st.SearchStrategy:
    derived: list[object] = [[original], {"v": original}, str(original)]
    if type(original) is int:
        derived += [original + 1, original - 1, -original, original * 10**9, original * 2**40]
    if type(original) is float:
        derived += [original * 1e9, -original, int(original)]
    if isinstance(original, str):
        derived += [original.upper(), original + "x", original[:-1]]
    if isinstance(original, list):
        derived += [original[:-1], [*original, 1], original * 2, list(reversed(original))]
    return st.one_of(
        st.sampled_from(_SPECIAL + derived),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=8),
    )


_RAW = [b"", b"null", b"[]", b"{}", b"{", b"\xff\xfe\x00", b"[" * 50_000, b"1" * 6000]


@st.composite
def _change(draw: st.DrawFn, docs: dict[str, object]) -> tuple[str, bytes | None, str]:
    """(file, its new bytes or None to delete it, a description)."""
    file = draw(st.sampled_from(sorted(docs)))
    doc = docs[file]
    if draw(st.integers(0, 19)) == 0:  # the whole file: not JSON, empty, gone
        raw = draw(st.sampled_from([*_RAW, None]))
        return file, raw, f"{file} raw {raw[:12]!r}" if raw is not None else f"{file} deleted"
    paths = json_paths(doc)
    path = draw(st.sampled_from(paths))
    op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]  # type: ignore[index]
    original = parent[path[-1]]  # type: ignore[index]
    value = None if op == "delete" else draw(_values(original))
    changed = mutate(doc, path, op, value)
    return file, json.dumps(changed, indent=2).encode(), describe_mutation(file, path, op, value)


def _check(outcomes: list[ReaderOutcome], unchanged: bool, what: str) -> None:
    """Every reader exited 0 or 1 without a traceback, errors in one line, ls listed, and the
    pinned reader refused a store whose bytes changed."""
    for o in outcomes:
        assert o.clean, f"{what}: {o.reader} exit {o.exit_code}: {o.message}"
        if o.exit_code == 1 and o.reader in ("info", "merge", "train", "train-pinned"):
            assert o.message.startswith("Error: ") and o.lines == 1, f"{what}: {o}"
    by_reader = {o.reader: o for o in outcomes}
    assert by_reader["ls"].exit_code == 0, f"{what}: {by_reader['ls']}"
    if not unchanged:
        pinned = by_reader["train-pinned"]
        assert pinned.exit_code == 1, f"{what}: the pinned train accepted it: {pinned}"


def _run_property(kind: str, pristine, worker: Worker, examples: int) -> None:
    source, digest = pristine[kind]
    docs = {f: json.loads((source / f).read_text()) for f in metadata_files(source)}
    base = Path(tempfile.mkdtemp(prefix=f"tamper-{kind}-"))

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(change=_change(docs))
    def check(change: tuple[str, bytes | None, str]) -> None:
        file, raw, what = change
        case = Path(tempfile.mkdtemp(dir=base))
        store = case / "store" / f"{kind}.zarr"
        shutil.copytree(source, store)
        before = (store / file).read_bytes()
        if raw is None:
            (store / file).unlink()
        else:
            (store / file).write_bytes(raw)
        try:
            outcomes = worker.run(store, kind, case / "work", digest)
            _check(outcomes, raw == before, f"{kind}: {what}")
        finally:
            shutil.rmtree(case, ignore_errors=True)

    try:
        check()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("kind", list(KINDS))
def test_tampered_metadata_never_crashes_a_reader(kind, pristine, worker) -> None:
    _run_property(kind, pristine, worker, EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_tampered_metadata_never_crashes_a_reader_many(kind, pristine, worker) -> None:
    _run_property(kind, pristine, worker, max(EXAMPLES, 60))


# ---- the named cases of the tamper table -----------------------------------------------------------

# What each named mutation must be refused with, by the readers that open it (fragments).
_EXPECTED = {
    "shard_rows 0": "softcache.shard_rows is 0; expected an integer >= 1",
    "temperatures a string": "softcache.temperatures is",
    "views 0": "softcache.views is 0; expected an integer >= 1",
    "data_type float16 -> float32": "logits/zarr.json: data_type is \"float32\"; expected 'float16'",
    "unknown codec (zstd -> lz4hc)": "topk_values/zarr.json: codecs[0].configuration.codecs[1] is",
    "num_samples 10^15": "softcache.num_samples is 1000000000000000 but softcache.dataset.num_samples is 300",
    "shape 10^12 rows": "logits/zarr.json: shape is [1000000000000, 10]; expected [300, 10]",
    "num_tokens 10^13": "softcache.shard_rows is 16; expected at most 4,194,304 shards",
    'complete "no"': 'softcache.complete is "no"; expected true or false',
    "format_version true": "unknown store format_version true; expected an integer, one of 1, 2, 3",
    "k negative": "softcache.k is -5; expected an integer in [1, 10]",
    "k 50 > stored 5": "softcache.k is 50; expected an integer in [1, 10]",
    "temperatures [] (top-k)": "softcache.temperatures is []; expected a non-empty list",
    "num_classes 10^12": "softcache.num_classes is 1000000000000; expected an integer in [1, 2147483647]",
}


@pytest.mark.parametrize("case", NAMED, ids=[m.name for m in NAMED])
def test_named_mutations_are_refused_in_one_line(case, pristine, worker, tmp_path) -> None:
    source, digest = pristine[case.kind]
    store = tmp_path / "store" / f"{case.kind}.zarr"
    shutil.copytree(source, store)
    apply_named(store, case)
    outcomes = worker.run(store, case.kind, tmp_path / "work", digest)
    _check(outcomes, False, case.name)
    by_reader = {o.reader: o for o in outcomes}
    assert by_reader["train-pinned"].exit_code == 1
    if case.name in _EXPECTED:
        for reader in ("info", "open_store", "train"):
            assert by_reader[reader].exit_code == 1, by_reader[reader]
            assert _EXPECTED[case.name] in by_reader[reader].message, by_reader[reader]
        assert by_reader["ls"].message.endswith(by_reader["info"].message.removeprefix("Error: "))
