"""Versioned publishing through Icechunk, on local disk and on the local S3 server (moto).

A producer publishes a store under a name, version after version; a consumer pinned to a version
(and to its digest) keeps reading exactly those bytes after a newer version is published. Two
producers publishing the same name at once (separate processes, `spawn`: `fork` hangs Icechunk's
runtime) end with one published version and one told of the conflict, never a torn version: the
version that exists verifies object by object against its manifest. A published version reads
as a plain store through `icechunk:REGISTRY/NAME@VERSION`, and exports to a plain folder.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import softcache
from softcache.cli import main
from softcache.errors import PublishConflictError, SoftcacheError, TamperedStoreError
from softcache.store import LogitStore
from softcache.store.published import published_location
from softcache.tools.publish import export, publish, versions
from tests.conftest import spec
from tests.helpers import one_line_error

pytest.importorskip("icechunk")


@pytest.fixture(scope="module")
def s3() -> Iterator[dict]:
    """The local S3 server the object-storage tests run (moto)."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from tests.integration.test_object_storage import moto_server

    with moto_server() as server:
        yield server


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in store.rglob("*") if p.is_file()}


def _arrays(location: str, digest: str, options: dict | None = None) -> dict[str, np.ndarray]:
    store = softcache.open_store(location, expect_digest=digest, storage_options=options)
    return {name: store.read(name) for name in store.array_names}


def _other_store(make_store) -> Path:
    path, _ = make_store("other.zarr", shard_rows=32)
    return path


def test_publish_versions_and_a_pinned_consumer_reads_its_own(built_stores, make_store, tmp_path):
    registry = tmp_path / "registry"
    first = publish(str(built_stores["dense"]), str(registry), "teacher", "1.0")
    v1 = published_location(str(registry), "teacher", "1.0")
    assert first.location == v1
    assert first.digest == LogitStore.open(built_stores["dense"]).digest
    before = _arrays(v1, first.digest)
    pinned = softcache.open_store(v1, expect_digest=first.digest)  # opened before 1.1 exists
    second = publish(str(_other_store(make_store)), str(registry), "teacher", "1.1")
    assert second.digest != first.digest
    # The consumer pinned to 1.0 reads 1.0's bytes, before and after 1.1 was published.
    after = _arrays(v1, first.digest)
    assert before.keys() == after.keys()
    for name in before:
        assert np.array_equal(before[name], after[name]), name
        assert np.array_equal(pinned.read(name), before[name]), name
    latest = softcache.open_store(published_location(str(registry), "teacher"))
    assert latest.digest == second.digest
    listed = versions(str(registry / "teacher"))
    assert [(v["version"], v["digest"]) for v in listed] == [
        ("1.0", first.digest),
        ("1.1", second.digest),
    ]
    with pytest.raises(PublishConflictError, match="already published; versions are immutable"):
        publish(str(built_stores["topk"]), str(registry), "teacher", "1.0")
    with pytest.raises(
        SoftcacheError, match=r"version '2.0' of .* is not published \(versions: 1.0, 1.1\)"
    ):
        softcache.open_store(published_location(str(registry), "teacher", "2.0"))


def test_a_published_version_reads_as_a_plain_store_and_exports_bit_for_bit(
    built_stores, tmp_path, in_root
):
    registry = tmp_path / "registry"
    result = publish(str(built_stores["topk"]), str(registry), "teacher", "v1")
    runner = CliRunner()
    info = json.loads(runner.invoke(main, ["info", result.location, "--json"]).stdout)
    assert info["digest"] == result.digest and info["encoding"] == "topk"
    ok = runner.invoke(main, ["verify", "-q", result.location, "--expect-digest", result.digest])
    assert ok.exit_code == 0, ok.output
    trained = runner.invoke(
        main,
        [
            "train", "--store", result.location, "--expect-digest", result.digest,
            "--student", spec("teacher"), "--dataset", spec("dataset"), "--epochs", "1",
            "--device", "cpu", "-q", "--output", str(tmp_path / "run"),
        ],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    out = tmp_path / "exported.zarr"
    assert export(result.location, str(out)) == result.digest
    assert _files(out) == _files(built_stores["topk"])  # the very bytes the producer built
    one_line_error(runner.invoke(main, ["export", result.location, str(out)]), "is not empty")


def test_publish_refuses_a_changed_or_unpinnable_store(built_stores, tmp_path):
    edited = tmp_path / "edited.zarr"
    shutil.copytree(built_stores["dense"], edited)
    chunk = edited / "logits" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"\x00")
    with pytest.raises(TamperedStoreError, match="logits/c/0/0 does not match the manifest"):
        publish(str(edited), str(tmp_path / "registry"), "teacher", "v1")
    assert versions(str(tmp_path / "registry" / "teacher")) == []  # nothing was published


# ---- two publishers at once -------------------------------------------------------------------------


def _publisher(
    source: str, registry: str, version: str, options: Any, barrier: Any, results: Any
) -> None:
    """A publishing process: copy, wait for the other at the barrier, commit."""
    from softcache.errors import PublishConflictError
    from softcache.tools.publish import publish

    try:
        result = publish(
            source,
            registry,
            "teacher",
            version,
            storage_options=options,
            before_commit=lambda: barrier.wait(600),
        )
        results.put(("published", version, result.digest))
    except PublishConflictError as exc:
        results.put(("conflict", version, str(exc)))
    except BaseException as exc:  # reported to the test, which fails on it
        results.put(("error", version, repr(exc)))


def _race(
    sources: dict[str, Path], registry: str, options: dict | None
) -> list[tuple[str, str, str]]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(sources))
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_publisher, args=(str(s), registry, v, options, barrier, results))
        for v, s in sources.items()
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return sorted(outcomes)


def _check_race(outcomes, sources, registry: str, options: dict | None) -> None:
    kinds = [kind for kind, _, _ in outcomes]
    assert sorted(kinds) == ["conflict", "published"], outcomes
    (_, winner, digest) = next(o for o in outcomes if o[0] == "published")
    (_, loser, message) = next(o for o in outcomes if o[0] == "conflict")
    assert "another publisher committed" in message and f"nothing of version {loser}" in message
    assert digest == LogitStore.open(sources[winner]).digest
    listed = versions(f"{registry}/teacher", options)
    assert [(v["version"], v["digest"]) for v in listed if v["version"] != "base"] == [
        (winner, digest)
    ]
    # No torn version: the version and the branch tip verify object by object (nothing missing,
    # changed or added), and equal the winner's store.
    for location in (
        published_location(registry, "teacher", winner),
        published_location(registry, "teacher"),
    ):
        result = CliRunner().invoke(
            main,
            [
                "verify", "-q", location, "--expect-digest", digest,
                *(f"--storage-option={k}={v}" for k, v in (options or {}).items()),
            ],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    want = LogitStore.open(sources[winner])
    got = softcache.open_store(
        published_location(registry, "teacher", winner), expect_digest=digest,
        storage_options=options,
    )  # fmt: skip
    for name in want.array_names:
        assert np.array_equal(want.read(name), got.read(name)), name


def test_two_concurrent_publishers_on_local_disk(built_stores, make_store, tmp_path):
    sources = {"a": built_stores["dense"], "b": _other_store(make_store)}
    registry = str(tmp_path / "registry")
    publish(str(built_stores["topk"]), registry, "teacher", "base")  # the repository exists
    outcomes = _race(sources, registry, None)
    _check_race(outcomes, sources, registry, None)


def test_two_concurrent_publishers_on_s3(s3, built_stores, make_store, tmp_path):
    sources = {"a": built_stores["dense"], "b": _other_store(make_store)}
    registry = "s3://softcache-test/registry"
    options = {"endpoint_url": s3["endpoint"]}
    outcomes = _race(sources, registry, options)
    assert sorted(k for k, _, _ in outcomes) == ["conflict", "published"], outcomes
    _check_race(outcomes, sources, registry, options)
    # A second version, published after: the first stays pinned to its bytes.
    (_, winner, digest) = next(o for o in outcomes if o[0] == "published")
    before = _arrays(published_location(registry, "teacher", winner), digest, options)
    later = publish(
        str(built_stores["topk"]), registry, "teacher", "later", storage_options=options
    )
    assert later.digest != digest
    after = _arrays(published_location(registry, "teacher", winner), digest, options)
    for name in before:
        assert np.array_equal(before[name], after[name]), name


def test_publish_needs_a_name_and_version(built_stores, tmp_path):
    with pytest.raises(SoftcacheError, match="version 'a@b' must be"):
        publish(str(built_stores["dense"]), str(tmp_path), "teacher", "a@b")


def _creator(repository: str, options: dict | None, barrier: Any, results: Any) -> None:
    from softcache.store.published import open_repository

    try:
        barrier.wait(120)
        open_repository(repository, options, create=True)
        results.put("opened")
    except BaseException as exc:  # reported to the test, which fails on it
        results.put(repr(exc))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_publishers_creating_one_new_repository_at_once_both_open_it(where, s3, tmp_path):
    """The race the two-publisher test meets by chance, forced: both create a missing repository
    at the same moment; the loser of Icechunk's conditional write opens the winner's."""
    ctx = multiprocessing.get_context("spawn")
    options = {"endpoint_url": s3["endpoint"]} if where == "s3" else None
    for round_ in range(3):
        repository = (
            f"s3://softcache-test/create-race-{tmp_path.name}-{round_}"
            if where == "s3"
            else str(tmp_path / f"repo{round_}")
        )
        barrier, results = ctx.Barrier(3), ctx.Queue()
        procs = [
            ctx.Process(target=_creator, args=(repository, options, barrier, results))
            for _ in range(3)
        ]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=300) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert outcomes == ["opened"] * 3, outcomes
