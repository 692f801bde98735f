"""`LogitStore`: an open store, for a build to create and fill or a reader to read.

The format it writes and reads (array names, the `softcache` attribute, layouts) is in
`softcache.store.format` and docs/FORMAT.md. Writes follow the rules that make builds resumable:
one writer per shard, every shard written whole and then recorded in `shard_done`, and `complete`
set last (`mark_complete`). Arrays opened for writing write every chunk, zeros included, so a
missing chunk object always means loss, which `verify` can then detect.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from softcache.errors import (
    ConfigError,
    CorruptChunkError,
    IncompleteStoreError,
    NotAStoreError,
    StoreFormatError,
    TamperedStoreError,
)
from softcache.store.format import (
    ATTR_KEY,
    LOGITS,
    OFFSETS,
    SAMPLE_CHUNK,
    SAMPLE_HASH,
    SHARD_DONE,
    TOPK_INDICES,
    VIEW_PARAMS,
    StoreMeta,
    check_offsets,
    data_array_names,
    decode_token_rows,
    decode_values,
    row_layout,
)
from softcache.store.location import exists, is_local, local_path, object_size, open_location
from softcache.store.manifest import (
    MANIFEST_KEY,
    DigestRecorder,
    VerifiedStore,
    compute_manifest,
    digest_of,
    has_manifest,
    normalise_digest,
    object_keys,
    read_manifest,
)
from softcache.store.read_pipeline import read_pipeline
from softcache.store.shard_files import (
    ShardDecodeError,
    ShardFileReader,
    ShardLayout,
    UnsupportedChunk,
    checked_picks,
    direct_reads_enabled,
    shard_layout,
)
from softcache.store.validate import (
    MAX_GROUP_JSON,
    array_specs,
    check_store,
    parse_meta,
    read_object,
)

_T = TypeVar("_T")


class LogitStore:
    """An open softcache store.

    Use `LogitStore.create` to start a build and `LogitStore.open` to read or resume one.
    """

    def __init__(
        self,
        group: zarr.Group,
        meta: StoreMeta,
        location: str,
        *,
        read_only: bool = True,
        fast_reads: bool = True,
        group_json: bytes | None = None,
        recorder: DigestRecorder | None = None,
    ) -> None:
        self._group = group
        self.meta = meta
        self.location = location
        self.read_only = read_only
        self.fast_reads = fast_reads
        self._arrays: dict[str, zarr.Array] = {}
        # Sharded arrays of a complete local directory store opened to read are decoded from
        # their files (`shard_files`), which it maps into memory: not a store a build may still
        # be writing, nor a pinned one (those reads go through the digest-checking store).
        local = is_local(location) and local_path(location).is_dir()
        direct = read_only and fast_reads and local and meta.complete
        self._files = ShardFileReader(local_path(location)) if direct else None
        self._layouts: dict[str, ShardLayout | None] = {}
        # The group's zarr.json as validated (its SHA-256 is the store's digest).
        self.group_json = group_json
        # Digests of the objects this process wrote (writable stores), for `mark_complete`.
        self._recorder = recorder

    @property
    def backend(self) -> Any:
        """The Zarr store object the group lives in (keys relative to the store's root)."""
        return self._group.store

    @property
    def digest(self) -> str | None:
        """``sha256:<hex>`` of the group's zarr.json, which commits to every object through the
        manifest (`softcache.store.manifest`); None for a store without a manifest (incomplete,
        or written before manifests)."""
        if self.meta.manifest is None or self.group_json is None:
            return None
        return digest_of(self.group_json)

    @property
    def read_threads(self) -> int | None:
        """Threads decoding this store's sharded arrays straight from its files (fixed when it
        was opened, `softcache.runtime.threads.read_threads`); None where reads go through
        zarr's codec pipeline (a remote, zip or incomplete store, or direct reads switched off
        when it was opened)."""
        return None if self._files is None else self._files.threads

    # ---- opening -------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        meta: StoreMeta,
        *,
        compression_level: int = 3,
        storage_options: Mapping[str, Any] | None = None,
    ) -> LogitStore:
        """Create an empty store (overwriting whatever is at `path`).

        The metadata goes in first, with `complete = false`, so a half-created store is recognised
        as a partial softcache store rather than as foreign data.
        """
        meta = dataclasses.replace(
            meta,
            complete=False,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            format_version=meta.required_version,
        )
        # Write only what readers accept: the rules and limits every reader checks.
        try:
            parse_meta(json.loads(json.dumps(meta.to_dict())), where=f"store {path}")
        except StoreFormatError as exc:
            raise ConfigError(f"cannot create {exc}") from exc
        backend = DigestRecorder(
            open_location(str(path), read_only=False, storage_options=storage_options)
        )
        # The attribute is written with the group itself, so no instant exists at which the
        # location holds a group that is not recognisably a (partial) softcache store.
        group = zarr.open_group(backend, mode="w", attributes={ATTR_KEY: meta.to_dict()})
        n, rows, chunk = meta.num_rows, meta.shard_rows, meta.chunk_rows
        compressors = [ZstdCodec(level=compression_level), Crc32cCodec()]
        for name, (row_shape, dtype) in row_layout(meta).items():
            shape = (n, *row_shape)
            group.create_array(
                name,
                shape=shape,
                dtype=dtype,
                chunks=(chunk, *shape[1:]),
                shards=(rows, *shape[1:]),
                compressors=compressors,
                fill_value=0,
                dimension_names=(
                    "token" if meta.tokens else "sample",
                    *(("entry",) if len(shape) > 1 else ()),
                ),
            )
        if meta.tokens:
            # Per-sample arrays, written once before any shard (`write_samples`).
            for name, shape, dtype in (
                (OFFSETS, (meta.num_samples + 1,), np.dtype(np.int64)),
                (SAMPLE_HASH, (meta.num_samples,), np.dtype(np.uint64)),
            ):
                group.create_array(
                    name,
                    shape=shape,
                    dtype=dtype,
                    chunks=(min(SAMPLE_CHUNK, max(shape[0], 1)),),
                    compressors=compressors,
                    fill_value=0,
                    dimension_names=("sample",),
                )
        # One element per chunk, so each shard's writer owns exactly one object in the store.
        group.create_array(
            SHARD_DONE,
            shape=(meta.num_shards,),
            dtype=np.uint8,
            chunks=(1,),
            fill_value=0,
            compressors=None,
        )
        return cls(group, meta, str(path), read_only=False, recorder=backend)

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        mode: str = "r",
        require_complete: bool = True,
        storage_options: Mapping[str, Any] | None = None,
        fast_reads: bool = True,
        expect_digest: str | None = None,
    ) -> LogitStore:
        """Open an existing store, after validating its metadata (`softcache.store.validate`).

        Args:
            path: the store's location: a path, `file://`, an fsspec URL or a `.zip` archive.
            mode: `r` to read (the store object is read-only), `r+` to resume a build.
            require_complete: refuse a store whose build has not finished.
            fast_reads: decode a local store's sharded arrays straight from their files
                (`shard_files`) and other reads with zarrs where installed (`read_pipeline`);
                False keeps zarr-python's reference pipeline (`verify` uses it).
            expect_digest: refuse a store whose digest (`sha256:...`, as `info` shows it) is not
                this one, and check every object read against the store's manifest.

        Raises:
            StoreFormatError: not a softcache store, an unknown format version, or metadata that
                breaks a rule of docs/FORMAT.md.
            IncompleteStoreError: `require_complete` and the build did not finish.
            TamperedStoreError: `expect_digest` and the store is not that one.
        """
        where = f"store {path}"
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}; create stores with create()")
        location = str(path)
        if is_local(location) and not local_path(location).exists():
            raise NotAStoreError(f"{where} does not exist")
        read_only = mode == "r"
        backend: Any = open_location(location, read_only=read_only, storage_options=storage_options)
        pin = normalise_digest(expect_digest) if expect_digest is not None else None
        if pin is not None:  # another store is "not the one pinned" before anything else
            group_json = read_object(backend, "zarr.json", MAX_GROUP_JSON, where=where)
            if group_json is not None and has_manifest(group_json) and digest_of(group_json) != pin:
                raise TamperedStoreError(
                    f"{where} has digest {digest_of(group_json)}, not the pinned {pin}: it is "
                    "another store, or was changed after it was published"
                )
        checked = check_store(backend, where=where)
        meta = checked.meta
        if pin is not None:
            backend = _pinned(backend, checked, pin, where)
        recorder = None if read_only else DigestRecorder(backend)
        try:
            group = zarr.open_group(recorder or backend, mode="r" if read_only else "r+")
        except (TamperedStoreError, StoreFormatError):
            raise
        except Exception as exc:  # validated above: only a store changed meanwhile gets here
            raise StoreFormatError(f"{where} cannot be opened as a Zarr group: {exc}") from exc
        store = cls(
            group,
            meta,
            location,
            read_only=read_only,
            group_json=checked.group_json,
            recorder=recorder,
            # A pinned store is read through its digest checks: zarr-python's pipeline, whose
            # every read goes through the checking store (zarrs could read around it).
            fast_reads=fast_reads and pin is None,
        )
        if require_complete and not meta.complete:
            done = int(store.done_mask().sum())
            raise IncompleteStoreError(
                f"{where} is incomplete ({done} of {meta.num_shards} shards written); finish it by "
                "running the same `softcache build` command again"
            )
        return store

    # ---- layout --------------------------------------------------------------------------------

    @property
    def data_array_names(self) -> tuple[str, ...]:
        """The per-row soft-label arrays of this encoding (without `sample_hash`)."""
        return data_array_names(self.meta)

    @property
    def row_array_names(self) -> tuple[str, ...]:
        """Every array sharded by rows (written by `write_shard`).

        Row stores: the soft labels, `view_params` when views are stored, the hashes. Token stores:
        the per-token arrays only (their hashes are per sample).
        """
        if self.meta.tokens:
            return self.data_array_names
        params = (VIEW_PARAMS,) if self.meta.augmentation else ()
        return (*self.data_array_names, *params, SAMPLE_HASH)

    @property
    def sample_array_names(self) -> tuple[str, ...]:
        """Per-sample arrays of a token store, written once by `write_samples` (else empty)."""
        return (OFFSETS, SAMPLE_HASH) if self.meta.tokens else ()

    @property
    def array_names(self) -> tuple[str, ...]:
        return (*self.row_array_names, *self.sample_array_names, SHARD_DONE)

    def array(self, name: str) -> zarr.Array:
        """The Zarr array called `name` (one of `array_names`)."""
        # Cached: every lookup through the group re-reads the array's metadata from the store.
        if name not in self._arrays:
            if self.read_only and self.fast_reads:
                with read_pipeline():  # zarrs where installed (see `read_pipeline`)
                    arr = self._group[name]
            else:
                arr = self._group[name]
            assert isinstance(arr, zarr.Array)
            if not self.read_only:
                # Write every chunk, zeros included, so a missing chunk object always means loss
                # (never "all zeros"), which `verify` can then detect.
                arr = arr.with_config({"write_empty_chunks": True})
            self._arrays[name] = arr
        return self._arrays[name]

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        """Rows [start, stop) of a shard."""
        start = shard * self.meta.shard_rows
        return start, min(start + self.meta.shard_rows, self.meta.num_rows)

    def rows_in(self, shards: Iterable[int]) -> int:
        """Rows held by ``shards`` (each shard counted once per mention)."""
        return sum(stop - start for start, stop in map(self.shard_bounds, shards))

    def row_layout(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-row shape and storage dtype of every array in `row_array_names`."""
        return row_layout(self.meta)

    # ---- writing -------------------------------------------------------------------------------

    def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Rows of array `name` as a numpy array, in storage dtype.

        Raises:
            CorruptChunkError: a chunk failed its checksum or could not be decoded (the message
                is the same whichever codec pipeline read it).
        """
        direct = self._read_files([(name, rows)])
        if direct is not None:
            return direct[0]
        try:
            return np.asarray(self.array(name)[rows])
        except (RuntimeError, ValueError) as exc:
            corrupt = self._corrupt_chunk(exc, f"array {name}, rows {rows.start}..{rows.stop}")
            if corrupt is None:
                raise
            raise corrupt from exc

    def read_many(
        self,
        requests: Iterable[tuple[str, slice]],
        out: Sequence[np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """Several row ranges of several arrays, read concurrently: `read` of each, in order.

        Every chunk of every request is decoded together (by the shard-file reader's threads, or
        in one round of zarr's event loop), so the shards of a stream's read group (every array
        of several blocks) overlap their decoding, where one `read` after another waits for each
        in turn.

        Args:
            requests: `(array name, rows)` pairs.
            out: an array per request to fill (C-contiguous, of the rows' shape and storage
                dtype), so a caller can place several reads in one buffer; None allocates them.

        Returns:
            One numpy array per request, in storage dtype, in the order of `requests` (`out`'s
            arrays where given).

        Raises:
            CorruptChunkError: as `read`.
        """
        pairs = list(requests)
        if out is not None and len(out) != len(pairs):
            raise ValueError(f"{len(out)} output arrays for {len(pairs)} requests")
        direct = self._read_files(pairs, out)
        if direct is not None:
            return direct
        results = self._read_zarr_many(pairs)
        if out is None:
            return results
        for i, (dest, got) in enumerate(zip(out, results, strict=True)):
            if dest.shape != got.shape or dest.dtype != got.dtype:
                raise ValueError(
                    f"out[{i}] is {dest.dtype} {dest.shape}, the rows {got.dtype} {got.shape}"
                )
            dest[...] = got
        return list(out)

    def read_gather(
        self,
        requests: Sequence[tuple[str, Sequence[tuple[int, int]], np.ndarray]],
        out: Sequence[np.ndarray],
        convert: Sequence[Callable[..., np.ndarray] | None] | None = None,
    ) -> None:
        """Rows picked, in any order, out of several row ranges of several arrays, into `out`.

        For request `i = (name, ranges, positions)`: ``out[i][j] = rows[positions[j]]``, where
        ``rows`` is the concatenation of array `name`'s `ranges`: `take` after `read_many`, in
        one step. A local store's chunks are decoded and their picked rows scattered to their
        places on every core (`ShardFileReader.read_gather`), each row written once; other stores
        read the ranges through zarr (`read_many`) and then take the rows.

        Args:
            requests: `(array name, ranges, positions)`: `ranges` `[start, stop)` row ranges;
                `positions` (P,) integer rows of their concatenation.
            out: an array per request, `(P, *row shape)`, of any dtype the stored rows cast to.
            convert: per request, `convert(rows, out=array)` writing the picked rows, converted,
                into `array` (of `out[i]`'s dtype) and returning it (e.g. `decode_values`:
                float16 or bfloat16 bits -> float32); or None (numpy's assignment casting).

        Raises:
            CorruptChunkError: as `read`.
            ValueError: a range outside an array, a position outside its ranges, an `out` array
                of another shape.
        """
        if len(out) != len(requests) or (convert is not None and len(convert) != len(requests)):
            raise ValueError(f"{len(out)} output arrays for {len(requests)} requests")
        requests = [
            (name, ranges, checked_picks(name, self.array(name).shape, ranges, positions, dest, i))
            for i, ((name, ranges, positions), dest) in enumerate(zip(requests, out, strict=True))
        ]
        if self._gather_files(requests, out, convert):
            return
        pairs = [(name, slice(r0, r1)) for name, ranges, _ in requests for r0, r1 in ranges]
        parts = iter(self.read_many(pairs))
        for i, (_, ranges, positions) in enumerate(requests):
            take_rows(
                [next(parts) for _ in ranges], positions, out[i],
                None if convert is None else convert[i],
            )  # fmt: skip

    def _gather_files(
        self,
        requests: Sequence[tuple[str, Sequence[tuple[int, int]], np.ndarray]],
        out: Sequence[np.ndarray],
        convert: Sequence[Callable[..., np.ndarray] | None] | None,
    ) -> bool:
        """`read_gather` from the shard files (`shard_files`); False where zarr must read."""

        def gather(files: ShardFileReader, layouts: list[ShardLayout]) -> bool:
            picks = [(lay, r[1], r[2]) for lay, r in zip(layouts, requests, strict=True)]
            files.read_gather(picks, out, convert)
            return True

        return self._from_files([name for name, _, _ in requests], gather) is not None

    def _from_files(
        self, names: list[str], read: Callable[[ShardFileReader, list[ShardLayout]], _T]
    ) -> _T | None:
        """`read(reader, layouts)` of arrays `names` from the shard files (`shard_files`); None
        where zarr must read: no shard-file reader for this store, direct reads switched off, an
        array or a chunk that reader does not decode. A damaged shard is a `CorruptChunkError`."""
        if self._files is None or not direct_reads_enabled():
            return None
        layouts = []
        for name in names:
            if name not in self._layouts:
                self._layouts[name] = shard_layout(self.array(name))
            layout = self._layouts[name]
            if layout is None:
                return None
            layouts.append(layout)
        try:
            return read(self._files, layouts)
        except UnsupportedChunk:
            return None
        except ShardDecodeError as exc:
            raise CorruptChunkError(
                f"store {self.location}: {exc}; the store is damaged: `softcache verify` names "
                "every damaged shard"
            ) from exc

    def _read_zarr_many(self, pairs: list[tuple[str, slice]]) -> list[np.ndarray]:
        """`read_many` through zarr's codec pipeline."""
        # Resolved here, not in the coroutine: opening an array blocks on zarr's event loop.
        arrays = [self.array(name).async_array for name, _ in pairs]

        async def read_all() -> list[Any]:
            return await asyncio.gather(
                *(arr.getitem(rows) for arr, (_, rows) in zip(arrays, pairs, strict=True))
            )

        try:
            return [np.asarray(out) for out in sync(read_all())]
        except (RuntimeError, ValueError) as exc:
            where = ", ".join(f"{n} rows {r.start}..{r.stop}" for n, r in pairs)
            corrupt = self._corrupt_chunk(exc, f"one of {where}")
            if corrupt is None:
                raise
            raise corrupt from exc

    def _read_files(
        self, requests: list[tuple[str, slice]], out: Sequence[np.ndarray] | None = None
    ) -> list[np.ndarray] | None:
        """`requests` decoded from the shard files (`shard_files`), None where zarr must read."""
        if any(not isinstance(rows, slice) or rows.step not in (None, 1) for _, rows in requests):
            return None

        def read(files: ShardFileReader, layouts: list[ShardLayout]) -> list[np.ndarray]:
            ranges = [(lay, rows) for lay, (_, rows) in zip(layouts, requests, strict=True)]
            return files.read_many(ranges, out)

        return self._from_files([name for name, _ in requests], read)

    def _corrupt_chunk(self, exc: Exception, where: str) -> CorruptChunkError | None:
        """The `CorruptChunkError` a failed read means, or None if it was not a decode failure."""
        text = str(exc).lower()
        if not any(word in text for word in ("checksum", "corrupt", "decompress", "zstd")):
            return None
        return CorruptChunkError(
            f"store {self.location}: {where}: a chunk failed its checksum or could not be "
            f"decoded ({exc}); the store is damaged: `softcache verify` names every damaged shard"
        )

    def done_mask(self) -> np.ndarray:
        """(num_shards,) bool: which shards a writer has recorded as written."""
        return self.read(SHARD_DONE).astype(bool)

    def empty_shard(self, shard: int) -> dict[str, np.ndarray]:
        """Uninitialised host buffers for one shard, ready to fill and pass to `write_shard`."""
        start, stop = self.shard_bounds(shard)
        return {
            name: np.empty((stop - start, *shape), dtype=dtype)
            for name, (shape, dtype) in self.row_layout().items()
        }

    def write_shard(self, shard: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write one whole shard, then record it as done.

        Args:
            shard: the shard number.
            arrays: one entry per name in `row_array_names`, each holding the shard's rows in
                storage dtype (bfloat16 as uint16 bits).
        """
        start, stop = self.shard_bounds(shard)
        for name in self.row_array_names:
            data = arrays[name]
            if data.shape[0] != stop - start:
                raise ValueError(
                    f"shard {shard} of {name}: {data.shape[0]} rows, expected {stop - start}"
                )
            self.array(name)[start:stop] = data
        self.array(SHARD_DONE)[shard] = 1

    def write_samples(self, offsets: np.ndarray, hashes: np.ndarray) -> None:
        """Write a token store's per-sample arrays (before its shards).

        Args:
            offsets: ``(N + 1,)`` int64, non-decreasing from 0 to ``num_tokens``: sample ``i``'s
                tokens are rows ``offsets[i]:offsets[i + 1]``.
            hashes: ``(N,)`` uint64, each sample's input hash.
        """
        meta = self.meta
        offsets = np.asarray(offsets, dtype=np.int64)
        check_offsets(offsets, meta.num_samples, meta.num_tokens)
        hashes = np.asarray(hashes)
        if hashes.shape != (meta.num_samples,):
            raise ValueError(f"hashes must be ({meta.num_samples},), got {hashes.shape}")
        self.array(OFFSETS)[:] = offsets
        self.array(SAMPLE_HASH)[:] = hashes.astype(np.uint64)

    def offsets(self) -> np.ndarray:
        """``(N + 1,)`` int64 CSR offsets of a token store: sample i is rows ``[o[i], o[i+1])``."""
        if not self.meta.tokens:
            raise StoreFormatError(f"store {self.location} has one row per sample, no offsets")
        return self.read(OFFSETS)

    def changed_samples(self, lengths: np.ndarray, hashes: np.ndarray) -> np.ndarray:
        """Indices of the samples of a token store whose length or input hash differs from
        ``lengths`` / ``hashes`` (``(N,)`` each, from `softcache.data.sequences.scan`), ascending."""
        stored_lengths = np.diff(self.offsets())
        return np.flatnonzero((stored_lengths != lengths) | (self.sample_hashes() != hashes))

    def mark_complete(self, dataset_fingerprint: str) -> None:
        """Write the manifest (the SHA-256 of every object), then record the dataset fingerprint,
        the manifest's digest and `complete`: the last write of a build."""
        backend = self._group.store
        specs = array_specs(self.meta)
        encode = {name: self.array(name).metadata.encode_chunk_key for name in specs}
        known = self._recorder.digests if self._recorder is not None else {}
        manifest = compute_manifest(backend, object_keys(specs, encode), known)
        data = manifest.to_bytes()
        sync(backend.set(MANIFEST_KEY, default_buffer_prototype().buffer.from_bytes(data)))
        dataset = {**self.meta.dataset, "fingerprint": dataset_fingerprint}
        self.meta = dataclasses.replace(
            self.meta, dataset=dataset, complete=True, manifest=manifest.summary(data)
        )
        self._group.attrs[ATTR_KEY] = self.meta.to_dict()
        group_json = sync(backend.get("zarr.json", prototype=default_buffer_prototype()))
        self.group_json = group_json.to_bytes() if group_json is not None else None

    # ---- reading -------------------------------------------------------------------------------

    def sample_hashes(self) -> np.ndarray:
        """uint64 input hashes: ``(num_rows,)``, one per row (of the view, when views are
        stored); ``(num_samples,)`` for a token store, one per sample."""
        return self.read(SAMPLE_HASH)

    def read_rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) of every per-row array (`row_array_names`), in storage dtype."""
        return {name: self.read(name, slice(start, stop)) for name in self.row_array_names}

    def top1(self) -> np.ndarray:
        """(N,) int64: the teacher's top-1 class for every row (every token of a token store)."""
        if self.meta.tokens:
            decoded = decode_token_rows(self.read_rows(0, self.meta.num_rows), self.meta)
            return self.meta.codec.top1(decoded).numpy()
        if self.meta.encoding == "dense":
            return self.read(LOGITS).argmax(axis=1).astype(np.int64)
        return self.read(TOPK_INDICES)[:, 0].astype(np.int64)

    def decode_values(self, values: np.ndarray) -> np.ndarray:
        """Stored logit values (`logits` or `topk_values`) as float32."""
        return decode_values(values, self.meta.value_dtype)

    def shard_object_key(self, name: str, shard: int) -> str:
        """The store key of the object holding shard `shard` of array `name`."""
        arr = self.array(name)
        if name == SHARD_DONE:  # one element per chunk: the "shard" is that element
            return f"{arr.path}/{arr.metadata.encode_chunk_key((shard,))}"
        coords = (shard,) + (0,) * (arr.ndim - 1)
        return f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"

    def shard_object_size(self, name: str, shard: int) -> int | None:
        """Bytes of the object holding a shard of `name`, None when missing.

        Zarr reads a missing or empty shard object as fill zeros, so only this tells them from
        data.
        """
        return object_size(self._group.store, self.shard_object_key(name, shard))

    def nbytes_logical(self) -> int:
        """Uncompressed bytes of the per-row arrays (what a raw dump would take)."""
        return sum(self.array(name).nbytes for name in self.row_array_names)

    def nbytes_stored(self) -> int:
        """Bytes the store occupies (compressed): every array, and the manifest."""
        manifest = object_size(self._group.store, MANIFEST_KEY) or 0
        return manifest + sum(self.array(name).nbytes_stored() for name in self.array_names)


def take_rows(
    parts: Sequence[np.ndarray],
    positions: np.ndarray,
    out: np.ndarray,
    convert: Callable[..., np.ndarray] | None = None,
) -> None:
    """``out[:] = concatenate(parts)[positions]``, converted by `convert`, without the
    concatenation's copy where `parts` is one array.

    Args:
        parts: row blocks of one array, in order (the same row shape and dtype).
        positions: (P,) integer rows of their concatenation.
        out: (P, *row shape), C-contiguous, any dtype the rows cast to.
        convert: `convert(rows, out=out)` writes the picked rows, converted, into `out`; None:
            numpy's assignment casting.
    """
    rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
    picked = rows[np.asarray(positions, dtype=np.int64)]
    if convert is None:
        out[...] = picked
    else:
        convert(picked, out=out)


def _pinned(backend: Any, checked: Any, digest: str, where: str) -> VerifiedStore:
    """`backend` seen through the manifest of a store whose digest must be `digest`."""
    meta = checked.meta
    if meta.manifest is None:
        why = "its build has not finished" if not meta.complete else "it predates manifests"
        raise TamperedStoreError(
            f"{where} has no manifest ({why}), so it has no digest to match the pinned {digest}; "
            "ask its producer for a store built by a softcache that records manifests"
        )
    found = digest_of(checked.group_json)
    if found != digest:
        raise TamperedStoreError(
            f"{where} has digest {found}, not the pinned {digest}: it is another store, or was "
            "changed after it was published"
        )
    manifest = read_manifest(backend, meta.manifest, checked.arrays, where=where)
    table = dict(manifest.objects)
    table["zarr.json"] = (digest.removeprefix("sha256:"), len(checked.group_json))
    table[MANIFEST_KEY] = (meta.manifest["sha256"], meta.manifest["size"])
    return VerifiedStore(backend, table, where)


def holds_group(backend: Any) -> bool:
    """Whether a Zarr store object holds a group (or array) at its root."""
    return exists(backend, "zarr.json")
