"""The store format: the only module that knows Zarr array names and attributes.

A softcache store is a Zarr v3 group (specified in docs/FORMAT.md, the contract between teams):

- group attribute `softcache`: a JSON object of metadata (`StoreMeta`), written first with
  `complete = false` and rewritten with `complete = true` as the very last step of a build;
- data arrays, sharded along rows (`shard_rows` per shard file, `chunk_rows` per compressed inner
  chunk), each inner chunk zstd-compressed and followed by a crc32c checksum, so a flipped bit is a
  read error rather than a wrong soft label:
  `logits` (N, C) for `dense`; `topk_values` (N, k), `topk_indices` (N, k), `lse` (N, len(T)) for
  `topk`; and `sample_hash` (N,) uint64 for every encoding;
- with stored augmentation views (format_version 2): every sample has `views` consecutive rows (row
  `i * views + v` is view v of sample i, so N above counts rows) and `view_params` (N, P) float64
  holds the parameters that recreate each view's input; `sample_hash` is the hash of that input;
- `shard_done` (num_shards,) uint8, one element per chunk: the resume record. Each shard's writer
  sets only its own element, after its data is written. With `write_empty_chunks=False` an all-zero
  shard and a never-written shard look alike, so completion is read from here, never from the data.

bfloat16 values are stored as their uint16 bit patterns (numpy has no bfloat16); `value_dtype` in the
metadata says so, and `decode_values` turns them back into float32.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from softcache import __version__
from softcache.errors import (
    IncompleteStoreError,
    MissingArrayError,
    NotAStoreError,
    StoreFormatError,
    UnsupportedVersionError,
)
from softcache.location import exists, is_local, local_path, object_size, open_location
from softcache.token_codec import TokenCodec

FORMAT_VERSION = 1
# Stores with stored augmentation views (`view_params`): readers of version 1 would misread their rows
# as samples, so they carry version 2; a store without views stays version 1, readable by all.
VIEWS_FORMAT_VERSION = 2
# Per-token stores of language models (`layout = "tokens"`): one row per token, CSR style. Their rows
# are tokens, not samples, so readers of versions 1 and 2 must refuse them.
TOKENS_FORMAT_VERSION = 3
READABLE_VERSIONS = (FORMAT_VERSION, VIEWS_FORMAT_VERSION, TOKENS_FORMAT_VERSION)
LAYOUTS = ("rows", "tokens")
ATTR_KEY = "softcache"
LOGITS = "logits"
TOPK_VALUES = "topk_values"
TOPK_INDICES = "topk_indices"
LSE = "lse"
SAMPLE_HASH = "sample_hash"
SHARD_DONE = "shard_done"
VIEW_PARAMS = "view_params"
DENSE_ARRAYS = (LOGITS,)
TOPK_ARRAYS = (TOPK_VALUES, TOPK_INDICES, LSE)
# The per-token layout (format_version 3).
OFFSETS = "offsets"
TOKEN_IDS = "token_ids"
TOKEN_VALUES = "token_values"
TOKEN_RESIDUAL = "token_residual"
TOKEN_COUNTS = "token_counts"
TOKEN_ENTROPY = "token_entropy"
TOKEN_TOPK_ARRAYS = (TOKEN_IDS, TOKEN_VALUES, TOKEN_RESIDUAL)
TOKEN_SAMPLED_ARRAYS = (TOKEN_IDS, TOKEN_COUNTS, TOKEN_ENTROPY)
# Samples per chunk of the per-sample arrays of a tokens store (offsets, sample_hash).
_SAMPLE_CHUNK = 65536

# The numpy dtype each value_dtype is stored as.
_STORAGE_DTYPES = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}


@dataclass(frozen=True)
class StoreMeta:
    """The `softcache` group attribute: what another team needs to trust and read a store.

    Attributes:
        encoding: `dense` or `topk`.
        num_classes: C, the width of the teacher's output.
        k: kept entries per row for `topk`; None for `dense`.
        num_samples: dataset items; the store holds `num_rows = num_samples * views` rows.
        value_dtype: float16, bfloat16 or float32.
        temperatures: temperatures whose normalisers `lse` holds (empty for `dense`).
        shard_rows: rows per shard (the unit of writing, resume and streaming).
        chunk_rows: rows per compressed inner chunk.
        teacher: {"spec", "num_parameters", "state_dict_sha256"}.
        dataset: {"spec", "num_samples", "fingerprint"} (fingerprint set when complete).
        build_config: the full build configuration.
        format_version: the store format version.
        softcache_version: the version that wrote the store.
        created: ISO-8601 UTC creation time.
        complete: true once every shard is written and the fingerprint recorded.
        views: stored views per sample (1 without augmentation).
        augmentation: None, or {"spec", "param_names", "seed"}: the augmentation whose parameters
            `view_params` holds (`softcache.augment.parse_augment(spec)` rebuilds it).
        layout: `rows` (one row per sample or view) or `tokens` (one row per token of a
            sequence, format_version 3: `offsets` (N+1,) maps sample i to rows
            `offsets[i]:offsets[i+1]`; `encoding` is then `topk` or `sampled`).
        num_tokens: rows of a `tokens` store (T, the real tokens of all samples); 0 otherwise.
        token_codec: how a `tokens` store codes its rows (`TokenCodec.to_dict`); None otherwise.
    """

    encoding: str
    num_classes: int
    k: int | None
    num_samples: int
    value_dtype: str
    temperatures: tuple[float, ...]
    shard_rows: int
    chunk_rows: int
    teacher: Mapping[str, Any]
    dataset: Mapping[str, Any]
    build_config: Mapping[str, Any]
    format_version: int = FORMAT_VERSION
    softcache_version: str = __version__
    created: str = ""
    complete: bool = False
    views: int = 1
    augmentation: Mapping[str, Any] | None = None
    layout: str = "rows"
    num_tokens: int = 0
    token_codec: Mapping[str, Any] | None = None

    @property
    def tokens(self) -> bool:
        """Whether this is a per-token store (one row per token, `offsets` per sample)."""
        return self.layout == "tokens"

    @property
    def codec(self) -> TokenCodec:
        """The row coding of a `tokens` store."""
        if self.token_codec is None:
            raise StoreFormatError("this store has no per-token layout (token_codec is missing)")
        return TokenCodec.from_dict(self.token_codec)

    @property
    def num_rows(self) -> int:
        """Rows of every per-row array: one per (sample, view), or one per token."""
        return self.num_tokens if self.tokens else self.num_samples * self.views

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_rows)

    @property
    def shard_samples(self) -> int:
        """Samples per shard (a shard holds all `views` rows of each of its samples)."""
        return self.shard_rows // self.views

    @property
    def num_params(self) -> int:
        """P, the width of `view_params` (0 without augmentation)."""
        return len(self.augmentation["param_names"]) if self.augmentation else 0

    @property
    def index_dtype(self) -> np.dtype:
        """uint16 when every class id fits, else int32."""
        return np.dtype(np.uint16 if self.num_classes <= 65536 else np.int32)

    @property
    def required_version(self) -> int:
        """The lowest format version that can describe this store."""
        if self.tokens:
            return TOKENS_FORMAT_VERSION
        return VIEWS_FORMAT_VERSION if self.augmentation else FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["temperatures"] = list(self.temperatures)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str) -> StoreMeta:
        """Parse the attribute, refusing format versions this reader does not know."""
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            if isinstance(version, int) and version > max(READABLE_VERSIONS):
                raise UnsupportedVersionError(
                    f"{where} uses store format_version {version}, but softcache {__version__} "
                    f"reads only versions {', '.join(map(str, READABLE_VERSIONS))}; upgrade "
                    f"softcache to a release that supports format_version {version}"
                )
            raise UnsupportedVersionError(f"{where} has unknown store format_version {version!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            kwargs = {k: v for k, v in data.items() if k in names}
            kwargs["temperatures"] = tuple(float(t) for t in data.get("temperatures", ()))
            meta = cls(**kwargs)
        except TypeError as exc:
            raise StoreFormatError(f"{where} has malformed softcache metadata: {exc}") from exc
        if meta.layout not in LAYOUTS or (meta.tokens and meta.token_codec is None):
            raise StoreFormatError(
                f"{where} has layout {meta.layout!r}; expected one of {LAYOUTS}, with a "
                "token_codec for 'tokens'"
            )
        if meta.tokens != (meta.format_version == TOKENS_FORMAT_VERSION):
            raise StoreFormatError(
                f"{where} has layout {meta.layout!r} but format_version {version}; per-token "
                f"stores, and only they, are format_version {TOKENS_FORMAT_VERSION}"
            )
        if meta.tokens:
            codec = meta.codec
            seen = (meta.encoding, meta.num_classes, meta.k)
            if seen != (codec.encoding, codec.vocab_size, codec.width):
                raise StoreFormatError(
                    f"{where}: encoding, num_classes and k {seen} disagree with its token_codec "
                    f"{(codec.encoding, codec.vocab_size, codec.width)}"
                )
        return meta


class LogitStore:
    """An open softcache store.

    Use `LogitStore.create` to start a build and `LogitStore.open` to read or resume one.
    """

    def __init__(
        self, group: zarr.Group, meta: StoreMeta, location: str, *, read_only: bool = True
    ) -> None:
        self._group = group
        self.meta = meta
        self.location = location
        self.read_only = read_only
        self._arrays: dict[str, zarr.Array] = {}

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
        backend = open_location(str(path), read_only=False, storage_options=storage_options)
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
                    chunks=(min(_SAMPLE_CHUNK, max(shape[0], 1)),),
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
        return cls(group, meta, str(path), read_only=False)

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        mode: str = "r",
        require_complete: bool = True,
        storage_options: Mapping[str, Any] | None = None,
    ) -> LogitStore:
        """Open an existing store.

        Args:
            path: the store's location: a path, `file://`, an fsspec URL or a `.zip` archive.
            mode: `r` to read (the store object is read-only), `r+` to resume a build.
            require_complete: refuse a store whose build has not finished.

        Raises:
            StoreFormatError: not a softcache store, or an unknown format version.
            IncompleteStoreError: `require_complete` and the build did not finish.
        """
        where = f"store {path}"
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}; create stores with create()")
        location = str(path)
        if is_local(location) and not local_path(location).exists():
            raise NotAStoreError(f"{where} does not exist")
        read_only = mode == "r"
        backend = open_location(location, read_only=read_only, storage_options=storage_options)
        if not holds_group(backend):
            raise NotAStoreError(f"{where} does not exist or is not a Zarr group (no zarr.json)")
        try:
            group = zarr.open_group(backend, mode="r" if read_only else "r+")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as exc:
            raise NotAStoreError(f"{where} is not a Zarr group: {exc}") from exc
        attrs = group.attrs.asdict()
        if ATTR_KEY not in attrs:
            raise NotAStoreError(f"{where} is a Zarr group but has no '{ATTR_KEY}' metadata")
        raw = attrs[ATTR_KEY]
        if not isinstance(raw, Mapping):
            raise StoreFormatError(f"{where}: the '{ATTR_KEY}' attribute is not a JSON object")
        meta = StoreMeta.from_dict(raw, where=where)
        store = cls(group, meta, location, read_only=read_only)
        missing = [name for name in store.array_names if name not in group]
        if missing:
            raise MissingArrayError(
                f"{where} is missing array(s) {', '.join(missing)}", missing=tuple(missing)
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
        """Rows of array `name` as a numpy array, in storage dtype."""
        return np.asarray(self.array(name)[rows])

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
        ``lengths`` / ``hashes`` (``(N,)`` each, from `softcache.sequences.scan`), ascending."""
        stored_lengths = np.diff(self.offsets())
        return np.flatnonzero((stored_lengths != lengths) | (self.sample_hashes() != hashes))

    def mark_complete(self, dataset_fingerprint: str) -> None:
        """Record the dataset fingerprint and set `complete`: the last write of a build."""
        dataset = {**self.meta.dataset, "fingerprint": dataset_fingerprint}
        self.meta = dataclasses.replace(self.meta, dataset=dataset, complete=True)
        self._group.attrs[ATTR_KEY] = self.meta.to_dict()

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
        """Bytes the store occupies (compressed), summed over every array."""
        return sum(self.array(name).nbytes_stored() for name in self.array_names)


def holds_group(backend: Any) -> bool:
    """Whether a Zarr store object holds a group (or array) at its root."""
    return exists(backend, "zarr.json")


# Array name of each row field of a token store (`softcache.token_codec`).
_TOKEN_FIELDS = {
    "ids": TOKEN_IDS,
    "values": TOKEN_VALUES,
    "residual": TOKEN_RESIDUAL,
    "counts": TOKEN_COUNTS,
    "entropy": TOKEN_ENTROPY,
}


def data_array_names(meta: StoreMeta) -> tuple[str, ...]:
    """The per-row soft-label arrays of a store's encoding and layout."""
    if meta.tokens:
        return TOKEN_SAMPLED_ARRAYS if meta.encoding == "sampled" else TOKEN_TOPK_ARRAYS
    return DENSE_ARRAYS if meta.encoding == "dense" else TOPK_ARRAYS


def token_arrays(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Row fields of a token store (`TokenCodec.encode`) keyed by their array names."""
    return {_TOKEN_FIELDS[field]: value for field, value in fields.items()}


def token_fields(arrays: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `token_arrays`: a token store's arrays keyed by field name."""
    names = {name: field for field, name in _TOKEN_FIELDS.items()}
    return {names[name]: value for name, value in arrays.items() if name in names}


def decode_token_rows(arrays: Mapping[str, np.ndarray], meta: StoreMeta) -> dict[str, Any]:
    """Rows of a token store's arrays (`LogitStore.read_rows`) -> the loss's tensors.

    See `TokenCodec.decode` for the keys, shapes and dtypes.
    """
    return meta.codec.decode(token_fields(arrays))


def check_offsets(offsets: np.ndarray, num_samples: int, num_tokens: int) -> None:
    """Raise StoreFormatError unless ``offsets`` is a valid CSR index of N samples over T rows."""
    if offsets.shape != (num_samples + 1,):
        raise StoreFormatError(f"offsets must be ({num_samples + 1},), got {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != num_tokens or (np.diff(offsets) < 0).any():
        raise StoreFormatError(
            f"offsets must rise from 0 to num_tokens = {num_tokens}; got {offsets[0]} .. "
            f"{offsets[-1]}, {int((np.diff(offsets) < 0).sum())} decreasing step(s)"
        )


def row_layout(meta: StoreMeta) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-row shape and storage dtype of every array `write_shard` takes, for a store's meta.

    Row stores: the soft labels, `view_params` with views, and `sample_hash`. Token stores: the
    per-token arrays (their `sample_hash` is per sample, written by `write_samples`).
    """
    if meta.tokens:
        return token_arrays(meta.codec.field_layout())
    vdt = storage_dtype(meta.value_dtype)
    layout: dict[str, tuple[tuple[int, ...], np.dtype]]
    if meta.encoding == "dense":
        layout = {LOGITS: ((meta.num_classes,), vdt)}
    else:
        assert meta.k is not None
        layout = {
            TOPK_VALUES: ((meta.k,), vdt),
            TOPK_INDICES: ((meta.k,), meta.index_dtype),
            LSE: ((len(meta.temperatures),), np.dtype(np.float32)),
        }
    if meta.augmentation:
        layout[VIEW_PARAMS] = ((meta.num_params,), np.dtype(np.float64))
    layout[SAMPLE_HASH] = ((), np.dtype(np.uint64))
    return layout


def encode_values(values: np.ndarray, value_dtype: str) -> np.ndarray:
    """float32 logits -> storage dtype (bfloat16 as its uint16 bit pattern, round to nearest even)."""
    if value_dtype == "bfloat16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
        rounded = ((bits + rounding) >> 16).astype(np.uint16)
        # Rounding would carry a NaN's payload into the exponent (even to zero): keep it a NaN.
        return np.where(np.isnan(values), np.uint16(0x7FC0), rounded).astype(np.uint16)
    return values.astype(_STORAGE_DTYPES[value_dtype])


def decode_values(values: np.ndarray, value_dtype: str) -> np.ndarray:
    """Storage dtype -> float32 (the inverse of `encode_values`, exact)."""
    if value_dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


def storage_dtype(value_dtype: str) -> np.dtype:
    """The numpy dtype a value dtype is stored as."""
    return np.dtype(_STORAGE_DTYPES[value_dtype])
