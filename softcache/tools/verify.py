"""`softcache verify`: is this store whole, and does it match my copy of the data?

Checks, in order: the metadata follows the format (`softcache.store.validate`, as every reader
checks it); the build completed; every array has the shape and dtype the metadata implies; every
shard object of every array exists (a missing one would read back as zeros) and decodes with a
valid crc32c checksum; every object has the SHA-256 the store's manifest records
(`softcache.store.manifest`: a chunk rewritten with a valid checksum, an object added or removed;
an object already reported missing or unreadable is not named twice), or, for a store written
before manifests, a note that it has none; the sample hashes reproduce the recorded dataset
fingerprint; and, given a dataset, every sample's input hashes to what the teacher saw. Each failure
names the array, the shard and its rows, or the mismatching sample indices.

Per-token stores (format_version 3, `layout = "tokens"`) are checked the same way, by token shard,
and also: the per-sample arrays `offsets` and `sample_hash` are read chunk by chunk and `offsets`
must be a valid CSR index over the store's tokens; the stored log-probabilities hold no NaN or
+inf and every sampled row's counts add up to the draws; and, given a dataset, every sample's
length (from `softcache.data.sequences.scan`) must equal its stored one, ``diff(offsets)``, as well as
its hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from softcache.data.hashing import collate_with_hashes, fingerprint, hash_rows
from softcache.data.sequences import scan
from softcache.data.views import augmentation_of, replay
from softcache.errors import SoftcacheError, StoreFormatError
from softcache.runtime.progress import Progress
from softcache.runtime.specs import instantiate
from softcache.store import (
    OFFSETS,
    SAMPLE_HASH,
    SHARD_DONE,
    TOKEN_COUNTS,
    TOKEN_RESIDUAL,
    TOKEN_VALUES,
    VIEW_PARAMS,
    LogitStore,
    check_offsets,
)
from softcache.store.location import list_keys
from softcache.store.manifest import MANIFEST_KEY, hash_objects, normalise_digest, read_manifest
from softcache.store.validate import array_specs

MAX_LISTED = 10


@dataclass
class VerifyReport:
    """What `verify` checked and what it found (`notes`: facts that are not failures, such as a
    store written before manifests)."""

    location: str
    problems: list[str] = field(default_factory=list)
    checked: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Objects already reported missing, empty or unreadable (the manifest check skips them).
    damaged: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "ok": self.ok,
            "problems": self.problems,
            "notes": self.notes,
            "checked": self.checked,
        }


def verify(
    location: str,
    *,
    dataset: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = False,
    expect_digest: str | None = None,
) -> VerifyReport:
    """Check a store end to end (see the module docstring).

    Args:
        location: the store.
        dataset: a dataset spec to compare every sample hash against.
        storage_options: fsspec options for URL stores.
        progress: show a progress bar on stderr.
        expect_digest: also require the store's digest to be this one (`sha256:...`).

    Returns:
        A report; `report.ok` is True only if every check passed.

    Memory stays bounded by a few shards whatever the metadata claims: the fingerprint is
    hashed shard by shard, and per-sample data is kept only as it is read (and, for the dataset
    comparison, only once the dataset's length matched the store's).
    """
    report = VerifyReport(location)
    try:
        # The reference pipeline (zarr-python): verification reports what any reader would see.
        store = LogitStore.open(
            location, require_complete=False, storage_options=storage_options, fast_reads=False
        )
    except SoftcacheError as exc:
        report.problems.append(str(exc))
        return report
    meta = store.meta
    report.checked["format_version"] = meta.format_version
    if not meta.complete:
        done = int(store.done_mask().sum())
        report.problems.append(
            f"build incomplete: {done} of {meta.num_shards} shards written (complete is unset)"
        )
    _check_layout(store, report)
    source = _dataset_of_the_store(dataset, store, report) if dataset is not None else None
    keep = source is not None
    offsets: np.ndarray | None = None
    if meta.tokens:
        offsets, hashes = _check_samples(store, report)
        _check_chunks(store, report, progress, offsets=offsets)
        found = fingerprint(hashes, offsets) if hashes is not None and offsets is not None else None
    else:
        found, hashes = _check_chunks(store, report, progress, keep_hashes=keep)
    _check_manifest(store, report, expect_digest, progress)
    if found is not None and meta.complete and found != meta.dataset.get("fingerprint"):
        what = "sample_hash and offsets do" if meta.tokens else "sample_hash does"
        report.problems.append(
            f"{what} not reproduce the recorded dataset fingerprint: they were altered "
            "after the build"
        )
    if source is not None and meta.tokens:
        _check_token_dataset(dataset, source, offsets, hashes, store, report, progress)
    elif source is not None and hashes is not None:
        _check_dataset(source, hashes, store, report, progress)
    return report


def _check_manifest(
    store: LogitStore, report: VerifyReport, expect_digest: str | None, progress: bool
) -> None:
    """Recompute every object's SHA-256 against the manifest; name what differs."""
    meta = store.meta
    digest = store.digest
    report.checked["digest"] = digest
    if expect_digest is not None:
        try:
            want = normalise_digest(expect_digest)
        except SoftcacheError as exc:
            report.problems.append(str(exc))
            want = None
        if want is not None and digest != want:
            report.problems.append(
                f"the store's digest is {digest or 'none (no manifest)'}, not the expected {want}"
            )
    if not meta.complete:
        return
    if meta.manifest is None:
        report.notes.append(
            "the store has no manifest (written before softcache recorded digests): its "
            "objects are checked by their CRC-32C only, which catches accidents, not edits, "
            "and it has no digest to pin"
        )
        report.checked["manifest"] = None
        return
    where = f"store {store.location}"
    backend = store.backend
    try:
        manifest = read_manifest(backend, meta.manifest, array_specs(meta), where=where)
    except SoftcacheError as exc:
        report.problems.append(str(exc).removeprefix(f"{where}: "))
        return
    bar = Progress(len(manifest.objects), "verify digests", enabled=progress)
    keys = sorted(manifest.objects)
    changed = missing = 0
    for start in range(0, len(keys), 64):
        batch = [k for k in keys[start : start + 64] if k not in report.damaged]
        for key, found in hash_objects(backend, batch).items():
            recorded = manifest.objects[key]
            if found is None:
                missing += 1
                _listed_problem(report, missing, f"object {key} is missing (the manifest lists it)")
            elif found != recorded:
                changed += 1
                _listed_problem(
                    report,
                    changed,
                    f"object {key} does not match the manifest (sha256 {found[0][:16]}..., "
                    f"{found[1]:,} bytes; recorded {recorded[0][:16]}..., {recorded[1]:,} bytes): it was "
                    "changed after the build",
                )
        bar.update(len(keys[start : start + 64]))
    bar.close()
    known = {*manifest.objects, "zarr.json", MANIFEST_KEY}
    added = [k for k in list_keys(backend) if k not in known and not k.endswith(".partial")]
    for n, key in enumerate(added, 1):
        _listed_problem(
            report, n, f"object {key} is not in the manifest: it was added after the build"
        )
    for count, what in ((missing, "missing"), (changed, "changed"), (len(added), "added")):
        if count > MAX_LISTED:
            report.problems.append(f"... {count - MAX_LISTED} more {what} object(s)")
    report.checked["manifest"] = {"objects": len(manifest.objects), **dict(meta.manifest)}


def _listed_problem(report: VerifyReport, n: int, problem: str) -> None:
    """Report the first `MAX_LISTED` problems of a kind (the rest are counted)."""
    if n <= MAX_LISTED:
        report.problems.append(problem)


def _check_layout(store: LogitStore, report: VerifyReport) -> None:
    meta = store.meta
    expected = {
        name: ((meta.num_rows, *shape), dtype)
        for name, (shape, dtype) in store.row_layout().items()
    }
    if meta.tokens:  # the per-sample arrays of a token store
        expected[OFFSETS] = ((meta.num_samples + 1,), np.dtype(np.int64))
        expected[SAMPLE_HASH] = ((meta.num_samples,), np.dtype(np.uint64))
    expected[SHARD_DONE] = ((meta.num_shards,), np.dtype(np.uint8))
    for name, (shape, dtype) in expected.items():
        arr = store.array(name)
        if tuple(arr.shape) != shape or np.dtype(arr.dtype) != dtype:
            report.problems.append(
                f"array {name}: shape {tuple(arr.shape)} dtype {arr.dtype}, but the metadata implies "
                f"shape {shape} dtype {dtype}"
            )
    report.checked["arrays"] = sorted(expected)


def _check_samples(
    store: LogitStore, report: VerifyReport
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Read a token store's per-sample arrays chunk by chunk and validate `offsets`.

    Returns:
        ``(offsets, hashes)``, each None when it cannot be trusted (missing or unreadable chunks,
        the wrong shape, or, for `offsets`, not a valid CSR index; each is reported). Memory grows
        with the chunks actually read, never with the length the metadata claims.
    """
    meta = store.meta
    lengths = {OFFSETS: meta.num_samples + 1, SAMPLE_HASH: meta.num_samples}
    what = {OFFSETS: "entries", SAMPLE_HASH: "samples"}
    out: dict[str, np.ndarray | None] = {}
    for name, length in lengths.items():
        arr = store.array(name)
        if tuple(arr.shape) != (length,):  # reported by _check_layout
            out[name] = None
            continue
        chunk = int(arr.chunks[0])
        parts: list[np.ndarray] | None = []
        for c in range(-(-length // chunk)):
            start, stop = c * chunk, min((c + 1) * chunk, length)
            where = f"array {name}, chunk {c} ({what[name]} {start}..{stop - 1})"
            size = store.shard_object_size(name, c)
            key = store.shard_object_key(name, c)
            if not size:  # missing (None) or empty (0): both would read back as zeros
                state = "is missing" if size is None else "is empty (0 bytes)"
                report.problems.append(f"{where}: object {key} {state}")
                report.damaged.add(key)
                parts = None
                continue
            try:
                values = store.read(name, slice(start, stop))
            except Exception as exc:  # any decode failure is a finding, not a crash
                report.problems.append(f"{where}: cannot be read: {_one_line(exc)}")
                report.damaged.add(key)
                parts = None
                continue
            if parts is not None:
                parts.append(values)
        if parts is None:
            out[name] = None
        else:
            out[name] = np.concatenate(parts) if parts else np.zeros(0, dtype=arr.dtype)
    offsets = out[OFFSETS]
    if offsets is not None:
        try:
            check_offsets(offsets, meta.num_samples, meta.num_tokens)
        except StoreFormatError as exc:
            report.problems.append(
                f"array {OFFSETS}: {exc}; the store's sample index is damaged, so no sample's "
                "tokens can be found: restore the store from a good copy or rebuild it"
            )
            offsets = None
    return offsets, out[SAMPLE_HASH]


def _check_chunks(
    store: LogitStore,
    report: VerifyReport,
    progress: bool,
    *,
    offsets: np.ndarray | None = None,
    keep_hashes: bool = False,
) -> tuple[str | None, np.ndarray | None]:
    """Read every shard of every per-row array.

    Returns:
        ``(fingerprint, hashes)`` of a row store: the fingerprint of its sample hashes, hashed
        shard by shard, and, with `keep_hashes`, the hashes themselves; each None when a
        `sample_hash` shard did not read. A token store's hashes are per sample
        (`_check_samples`): ``(None, None)``. `offsets`, when valid, names the samples each
        damaged token shard holds.
    """
    meta = store.meta
    names = store.row_array_names
    digest = hashlib.sha256()
    kept: list[np.ndarray] = []
    hashes_ok = SAMPLE_HASH in names
    done = store.done_mask()
    bar = Progress(meta.num_shards * len(names), "verify", enabled=progress)
    for shard in range(meta.num_shards):
        start, stop = store.shard_bounds(shard)
        where = _shard_where(shard, start, stop, offsets, meta.tokens)
        if not done[shard]:
            report.problems.append(f"{where} is not recorded as written in {SHARD_DONE}")
        for name in names:
            bar.update(1)
            size = store.shard_object_size(name, shard)
            key = store.shard_object_key(name, shard)
            if not size:  # missing (None) or empty (0): both would read back as zeros
                state = "is missing" if size is None else "is empty (0 bytes)"
                report.problems.append(f"array {name}, {where}: object {key} {state}")
                report.damaged.add(key)
                hashes_ok &= name != SAMPLE_HASH
                continue
            try:
                data = store.read(name, slice(start, stop))
            except Exception as exc:  # any decode failure is a finding, not a crash
                report.problems.append(f"array {name}, {where}: cannot be read: {_one_line(exc)}")
                report.damaged.add(key)
                hashes_ok &= name != SAMPLE_HASH
                continue
            if name == SAMPLE_HASH:
                if hashes_ok:
                    digest.update(np.ascontiguousarray(data, dtype="<u8").tobytes())
                    if keep_hashes:
                        kept.append(data)
            elif (problem := _value_problem(store, name, data)) is not None:
                report.problems.append(f"array {name}, {where}: {problem}")
    bar.close()
    report.checked["shards"] = meta.num_shards
    if not hashes_ok:
        return None, None
    hashes = (np.concatenate(kept) if kept else np.zeros(0, np.uint64)) if keep_hashes else None
    return digest.hexdigest(), hashes


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _shard_where(
    shard: int, start: int, stop: int, offsets: np.ndarray | None, tokens: bool
) -> str:
    """``shard 2 (rows 128..191)``; for a token store the tokens, and with offsets their samples."""
    if not tokens:
        return f"shard {shard} (rows {start}..{stop - 1})"
    if offsets is None:
        return f"shard {shard} (tokens {start}..{stop - 1})"
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    last = int(np.searchsorted(offsets, stop - 1, side="right")) - 1
    return f"shard {shard} (tokens {start}..{stop - 1} of samples {first}..{last})"


def _value_problem(store: LogitStore, name: str, data: np.ndarray) -> str | None:
    """What is wrong with a shard's values of array `name` (that decoded), or None."""
    meta = store.meta
    if meta.tokens and name == TOKEN_COUNTS:
        draws = meta.codec.width
        wrong = int((data.sum(axis=1, dtype=np.int64) != draws).sum())
        if wrong:
            return f"{wrong} row(s) whose counts do not add up to the {draws} draws"
        return None
    if np.issubdtype(data.dtype, np.integer):
        return None
    if meta.tokens and name in (TOKEN_VALUES, TOKEN_RESIDUAL):
        # Log-probabilities: -inf is probability 0 (the residual of k = V), NaN and +inf are not.
        if np.isnan(data).any() or np.isposinf(data).any():
            return "holds NaN or +inf log-probabilities"
        return None
    return None if np.isfinite(data).all() else "holds non-finite values"


def _dataset_of_the_store(spec: str, store: LogitStore, report: VerifyReport) -> Any | None:
    """The dataset `spec` builds, or None (reported) when its sample count is not the store's.

    Checked before any data is read, so the store's hashes are kept in memory only for a store
    as long as a real dataset."""
    dataset = instantiate(spec, "dataset")
    n = len(dataset)
    report.checked["dataset"] = {"spec": spec, "num_samples": n}
    if n != store.meta.num_samples:
        report.problems.append(
            f"dataset {spec} has {n} samples but the store holds {store.meta.num_samples}"
        )
        return None
    return dataset


def _check_dataset(
    dataset: Any, hashes: np.ndarray, store: LogitStore, report: VerifyReport, progress: bool
) -> None:
    meta = store.meta
    ours = (
        _view_hashes(dataset, store, progress) if meta.augmentation else _hashes(dataset, progress)
    )
    bad = np.flatnonzero(ours != hashes)
    if bad.size:
        bad = np.unique(bad // meta.views)  # rows -> samples
        report.problems.append(
            f"{bad.size} dataset sample(s) do not match the store: indices {_listed(bad)}; "
            "the dataset was reordered or changed since the build"
        )


def _check_token_dataset(
    spec: str | None,
    dataset: Any,
    offsets: np.ndarray | None,
    hashes: np.ndarray | None,
    store: LogitStore,
    report: VerifyReport,
    progress: bool,
) -> None:
    """Compare a sequence dataset's lengths and hashes (`scan`) with a token store's samples.

    `offsets` or `hashes` is None when the store's copy could not be read (already reported): that
    comparison is then skipped.
    """
    n = len(dataset)
    lengths, ours = scan(dataset, progress=progress)
    report.checked["dataset"]["num_tokens"] = int(lengths.sum())
    bad_length = np.zeros(n, dtype=bool)
    if offsets is not None:
        stored = np.diff(offsets)
        bad_length = lengths != stored
        if bad_length.any():
            bad = np.flatnonzero(bad_length)
            detail = ", ".join(
                f"{int(i)} ({int(lengths[i])} tokens, stored {int(stored[i])})"
                for i in bad[:MAX_LISTED]
            )
            more = f" (and {bad.size - MAX_LISTED} more)" if bad.size > MAX_LISTED else ""
            report.problems.append(
                f"{bad.size} dataset sample(s) differ in length from the store: indices "
                f"{detail}{more}; the dataset was reordered or changed since the build"
            )
    if hashes is not None:
        bad = np.flatnonzero((ours != hashes) & ~bad_length)
        if bad.size:
            report.problems.append(
                f"{bad.size} dataset sample(s) do not match the store (other tokens): indices "
                f"{_listed(bad)}; the dataset was reordered or changed since the build"
            )


def _listed(indices: np.ndarray) -> str:
    """The first `MAX_LISTED` indices, comma-separated, and how many more there are."""
    listed = ", ".join(str(int(i)) for i in indices[:MAX_LISTED])
    more = f" (and {indices.size - MAX_LISTED} more)" if indices.size > MAX_LISTED else ""
    return listed + more


def _hashes(dataset: Any, progress: bool) -> np.ndarray:
    """(N,) uint64: every sample's input hash, in dataset order."""
    n = len(dataset)
    loader = DataLoader(dataset, batch_size=256, collate_fn=collate_with_hashes)
    ours = np.empty(n, dtype=np.uint64)
    bar = Progress(n, "hash dataset", enabled=progress)
    offset = 0
    for _, _, batch_hashes in loader:
        ours[offset : offset + len(batch_hashes)] = batch_hashes
        offset += len(batch_hashes)
        bar.update(len(batch_hashes))
    bar.close()
    return ours


def _view_hashes(dataset: Any, store: LogitStore, progress: bool) -> np.ndarray:
    """(N * V,) uint64: the hash of every stored view, replayed from the stored parameters."""
    meta = store.meta
    augmentation = augmentation_of(store.meta.augmentation)
    assert augmentation is not None
    ours = np.empty(meta.num_rows, dtype=np.uint64)
    bar = Progress(meta.num_rows, "replay views", enabled=progress)
    for shard in range(meta.num_shards):
        start, stop = store.shard_bounds(shard)
        params = store.read(VIEW_PARAMS, slice(start, stop))
        samples = np.arange(start, stop) // meta.views
        inputs = torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in samples])
        ours[start:stop] = hash_rows(replay(augmentation, inputs, params))
        bar.update(stop - start)
    bar.close()
    return ours
