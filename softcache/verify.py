"""`softcache verify`: is this store whole, and does it match my copy of the data?

Checks, in order: the format version is known; the build completed; every array has the shape and
dtype the metadata implies; every shard object of every array exists (a missing one would read back
as zeros) and decodes with a valid crc32c checksum; the sample hashes reproduce the recorded dataset
fingerprint; and, given a dataset, every sample's input hashes to what the teacher saw. Each failure
names the array, the shard and its rows, or the mismatching sample indices.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from softcache.distill import store_augmentation
from softcache.errors import SoftcacheError
from softcache.hashing import collate_with_hashes, fingerprint, hash_rows
from softcache.progress import Progress
from softcache.specs import instantiate
from softcache.store import SAMPLE_HASH, SHARD_DONE, VIEW_PARAMS, LogitStore
from softcache.views import replay

MAX_LISTED = 10


@dataclass
class VerifyReport:
    """What `verify` checked and what it found."""

    location: str
    problems: list[str] = field(default_factory=list)
    checked: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "ok": self.ok,
            "problems": self.problems,
            "checked": self.checked,
        }


def verify(
    location: str,
    *,
    dataset: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> VerifyReport:
    """Check a store end to end (see the module docstring).

    Args:
        location: the store.
        dataset: a dataset spec to compare every sample hash against.
        storage_options: fsspec options for URL stores.
        progress: show a progress bar on stderr.

    Returns:
        A report; `report.ok` is True only if every check passed.
    """
    report = VerifyReport(location)
    try:
        store = LogitStore.open(location, require_complete=False, storage_options=storage_options)
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
    hashes = _check_chunks(store, report, progress)
    if hashes is not None and meta.complete:
        recorded = meta.dataset.get("fingerprint")
        if fingerprint(hashes) != recorded:
            report.problems.append(
                "sample_hash does not reproduce the recorded dataset fingerprint: the hashes "
                "were altered after the build"
            )
    if dataset is not None and hashes is not None:
        _check_dataset(dataset, hashes, store, report, progress)
    return report


def _check_layout(store: LogitStore, report: VerifyReport) -> None:
    meta = store.meta
    expected = {
        name: ((meta.num_rows, *shape), dtype)
        for name, (shape, dtype) in store.row_layout().items()
    }
    expected[SHARD_DONE] = ((meta.num_shards,), np.dtype(np.uint8))
    for name, (shape, dtype) in expected.items():
        arr = store.array(name)
        if tuple(arr.shape) != shape or np.dtype(arr.dtype) != dtype:
            report.problems.append(
                f"array {name}: shape {tuple(arr.shape)} dtype {arr.dtype}, but the metadata implies "
                f"shape {shape} dtype {dtype}"
            )
    report.checked["arrays"] = sorted(expected)


def _check_chunks(store: LogitStore, report: VerifyReport, progress: bool) -> np.ndarray | None:
    """Read every shard of every array; return the sample hashes if they all read."""
    meta = store.meta
    names = store.row_array_names
    hashes = np.zeros(meta.num_rows, dtype=np.uint64)
    hashes_ok = True
    done = store.done_mask()
    bar = Progress(meta.num_shards * len(names), "verify", enabled=progress)
    for shard in range(meta.num_shards):
        start, stop = store.shard_bounds(shard)
        where = f"shard {shard} (rows {start}..{stop - 1})"
        if not done[shard]:
            report.problems.append(f"{where} is not recorded as written in {SHARD_DONE}")
        for name in names:
            bar.update(1)
            size = store.shard_object_size(name, shard)
            if not size:  # missing (None) or empty (0): both would read back as zeros
                state = "is missing" if size is None else "is empty (0 bytes)"
                report.problems.append(
                    f"array {name}, {where}: object {store.shard_object_key(name, shard)} {state}"
                )
                hashes_ok &= name != SAMPLE_HASH
                continue
            try:
                data = store.read(name, slice(start, stop))
            except Exception as exc:  # any decode failure is a finding, not a crash
                report.problems.append(f"array {name}, {where}: cannot be read: {exc}")
                hashes_ok &= name != SAMPLE_HASH
                continue
            if name == SAMPLE_HASH:
                hashes[start:stop] = data
            elif not np.issubdtype(data.dtype, np.integer) and not np.isfinite(data).all():
                report.problems.append(f"array {name}, {where}: holds non-finite values")
    bar.close()
    report.checked["shards"] = meta.num_shards
    return hashes if hashes_ok else None


def _check_dataset(
    spec: str, hashes: np.ndarray, store: LogitStore, report: VerifyReport, progress: bool
) -> None:
    dataset = instantiate(spec, "dataset")
    n = len(dataset)
    meta = store.meta
    report.checked["dataset"] = {"spec": spec, "num_samples": n}
    if n != meta.num_samples:
        report.problems.append(
            f"dataset {spec} has {n} samples but the store holds {meta.num_samples}"
        )
        return
    ours = (
        _view_hashes(dataset, store, progress) if meta.augmentation else _hashes(dataset, progress)
    )
    bad = np.flatnonzero(ours != hashes)
    if bad.size:
        bad = np.unique(bad // meta.views)  # rows -> samples
        listed = ", ".join(str(int(i)) for i in bad[:MAX_LISTED])
        more = f" (and {bad.size - MAX_LISTED} more)" if bad.size > MAX_LISTED else ""
        report.problems.append(
            f"{bad.size} dataset sample(s) do not match the store: indices {listed}{more}; "
            "the dataset was reordered or changed since the build"
        )


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
    augmentation = store_augmentation(store)
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
