"""`softcache merge`: an ensemble teacher from several stores of the same dataset.

The merged distribution is the weighted mean of the teachers' probabilities at T = 1,
`p = sum_j w_j softmax(z_j)`, stored as logits `log p` (dense) or as the top-k of `log p` with its
normalisers. So `softmax(stored)` is exactly the ensemble at T = 1; at another temperature a student
sees `softmax(log p / T)`, the tempered ensemble, not the mean of tempered teachers.

A top-k source contributes its exact kept probabilities (from `lse` at T = 1, which it must store)
and spreads its tail mass evenly over the classes it did not keep: an approximation, exact only for
the kept classes. Work is streamed one output shard at a time, so memory is bounded by a shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from softcache._version import __version__
from softcache.config import VALUE_DTYPES
from softcache.data.hashing import fingerprint
from softcache.errors import ConfigError, DatasetMismatchError
from softcache.runtime.progress import Progress
from softcache.runtime.specs import package_versions
from softcache.store import (
    LOGITS,
    LSE,
    SAMPLE_HASH,
    TOPK_INDICES,
    TOPK_VALUES,
    LogitStore,
    StoreMeta,
)
from softcache.store.output import open_output
from softcache.store.row_codec import copy_encoded, encode_batch
from softcache.store.validate import MAX_SHARD_BYTES
from softcache.store.writer import ShardWriter


@dataclass(frozen=True)
class MergeResult:
    """What `merge` wrote."""

    store: str
    num_samples: int
    sources: int
    bytes_stored: int


# A merged store is a row store: dense or top-k (sampled stores are per-token only).
_ENCODINGS = ("dense", "topk")


def merge(
    sources: Sequence[str],
    output: str,
    *,
    weights: Sequence[float] | None = None,
    encoding: str = "dense",
    top_k: int = 5,
    dtype: str = "float16",
    temperatures: Sequence[float] = (1.0, 2.0, 4.0),
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> MergeResult:
    """Write the weighted ensemble of `sources` to `output`.

    Args:
        sources: two or more complete stores built over the same dataset (same fingerprint).
        output: where to write the merged store.
        weights: one non-negative weight per source (normalised to sum 1); equal by default.
        encoding: `dense` or `topk` for the merged store.
        top_k: k when `encoding` is `topk`.
        dtype: stored value type.
        temperatures: normalisers to store for `topk`.
        overwrite: replace an existing store at `output`.
        storage_options: fsspec options for URL stores.
        progress: show a progress bar on stderr.

    Raises:
        DatasetMismatchError: the sources were built from different datasets.
        ConfigError: bad weights, encodings, or a top-k source without a T = 1 normaliser.
    """
    if len(sources) < 2:
        raise ConfigError("merge needs at least two source stores")
    if encoding not in _ENCODINGS or dtype not in VALUE_DTYPES:
        raise ConfigError(f"encoding must be one of {_ENCODINGS} and dtype one of {VALUE_DTYPES}")
    stores = [LogitStore.open(s, storage_options=storage_options) for s in sources]
    for store in stores:
        if store.meta.tokens:
            raise ConfigError(
                f"{store.location} is a per-token LM store; merge ensembles row stores only "
                "(average LM teachers' logits in the teacher module and build once instead)"
            )
    w = _weights(weights, len(stores))
    first = stores[0].meta
    for store in stores[1:]:
        meta = store.meta
        if meta.dataset.get("fingerprint") != first.dataset.get("fingerprint"):
            raise DatasetMismatchError(
                f"{store.location} was built from another dataset than {stores[0].location} "
                f"(fingerprints {meta.dataset.get('fingerprint')} and "
                f"{first.dataset.get('fingerprint')}); merge only stores of the same dataset"
            )
        if meta.num_classes != first.num_classes:
            raise ConfigError(
                f"{store.location} has {meta.num_classes} classes, {stores[0].location} has "
                f"{first.num_classes}"
            )
    for store in stores:
        if store.meta.encoding == "topk" and 1.0 not in store.meta.temperatures:
            raise ConfigError(
                f"{store.location} is top-k without a normaliser at T = 1, so its probabilities "
                "are unknown; rebuild it with 1 in --temperatures"
            )
    working = first.shard_rows * first.num_classes * 8  # one (rows, C) float64 mixture
    if working * 3 > MAX_SHARD_BYTES:
        raise ConfigError(
            f"merge mixes probabilities as dense (shard_rows, num_classes) float64 blocks: "
            f"{first.shard_rows:,} x {first.num_classes:,} classes would take {working:,} bytes "
            f"per block, more than softcache holds at once ({MAX_SHARD_BYTES // 3:,})"
        )
    if encoding == "topk" and top_k > first.num_classes:
        raise ConfigError(f"--top-k {top_k} exceeds the {first.num_classes} classes")
    meta = StoreMeta(
        encoding=encoding,
        num_classes=first.num_classes,
        k=top_k if encoding == "topk" else None,
        num_samples=first.num_samples,
        value_dtype=dtype,
        temperatures=tuple(temperatures) if encoding == "topk" else (),
        shard_rows=first.shard_rows,
        chunk_rows=first.chunk_rows,
        teacher=_ensemble_identity(stores, w),
        dataset={**first.dataset, "fingerprint": None},
        build_config={
            "merge": {
                "sources": list(sources),
                "weights": w.tolist(),
                "encoding": encoding,
                "top_k": top_k,
                "dtype": dtype,
                "temperatures": list(temperatures),
            }
        },
        softcache_version=__version__,
        provenance={
            "sources": [{"location": s.location, "digest": s.digest} for s in stores],
            "packages": package_versions(),
        },
    )
    out = open_output(output, meta, overwrite=overwrite, storage_options=storage_options)
    done = out.done_mask()
    bar = Progress(meta.num_samples, "merge", enabled=progress)
    index_dtype = torch.int16 if meta.index_dtype == np.uint16 else torch.int32
    with ShardWriter(out) as writer:
        for shard in range(meta.num_shards):
            start, stop = out.shard_bounds(shard)
            if not done[shard]:
                log_p = np.log(
                    np.maximum(_mixture(stores, w, start, stop), np.finfo(np.float32).tiny)
                )
                encoded = encode_batch(
                    torch.from_numpy(log_p.astype(np.float32)),
                    encoding=encoding,
                    value_dtype=dtype,
                    k=meta.k,
                    temperatures=meta.temperatures,
                    index_dtype=index_dtype,
                )
                buf = out.empty_shard(shard)
                copy_encoded(encoded, buf, 0)
                buf[SAMPLE_HASH][:] = stores[0].read(SAMPLE_HASH, slice(start, stop))
                writer.submit(shard, buf)
            bar.update(stop - start)
    bar.close()
    out.mark_complete(fingerprint(out.sample_hashes()))
    return MergeResult(output, meta.num_samples, len(stores), out.nbytes_stored())


def source_probabilities(store: LogitStore, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a store as probabilities at T = 1, (rows, C) float64.

    Dense rows are exact; top-k rows are exact on the kept classes, with the tail mass spread
    evenly over the other classes.
    """
    meta = store.meta
    rows = store.read_rows(start, stop)
    if meta.encoding == "dense":
        z = store.decode_values(rows[LOGITS]).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)
    values = store.decode_values(rows[TOPK_VALUES]).astype(np.float64)
    indices = rows[TOPK_INDICES].astype(np.int64)
    lse = rows[LSE][:, list(meta.temperatures).index(1.0)].astype(np.float64)
    kept = np.exp(values - lse[:, None])
    tail = np.clip(1.0 - kept.sum(axis=1), 0.0, None)
    others = meta.num_classes - indices.shape[1]
    p = np.repeat((tail / others if others else np.zeros_like(tail))[:, None], meta.num_classes, 1)
    np.put_along_axis(p, indices, kept, axis=1)
    return p


def _mixture(stores: Sequence[LogitStore], w: np.ndarray, start: int, stop: int) -> np.ndarray:
    return sum(wj * source_probabilities(s, start, stop) for wj, s in zip(w, stores, strict=True))


def _weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(
            f"--weights needs {n} non-negative numbers with a positive sum, got {list(weights)}"
        )
    return w / w.sum()


def _ensemble_identity(stores: Sequence[LogitStore], w: np.ndarray) -> dict[str, Any]:
    members = [
        {
            "store": s.location,
            "spec": s.meta.teacher.get("spec"),
            "state_dict_sha256": s.meta.teacher.get("state_dict_sha256"),
            "weight": float(wj),
        }
        for s, wj in zip(stores, w, strict=True)
    ]
    digest = hashlib.sha256(
        "|".join(f"{m['state_dict_sha256']}:{m['weight']!r}" for m in members).encode()
    ).hexdigest()
    return {
        "spec": "ensemble(" + ", ".join(str(m["spec"]) for m in members) + ")",
        "num_parameters": sum(int(s.meta.teacher.get("num_parameters", 0)) for s in stores),
        "state_dict_sha256": digest,
        "members": members,
    }
