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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from softcache._version import __version__
from softcache.errors import StoreFormatError
from softcache.store.token_codec import TokenCodec
from softcache.store.tokenizer import TokenizerIdentity

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
# The group holding the store's manifest (SHA-256 of every object; `softcache.store.manifest`).
MANIFEST = "manifest"
# Samples per chunk of the per-sample arrays of a tokens store (offsets, sample_hash).
SAMPLE_CHUNK = 65536

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
            `view_params` holds (`softcache.data.augment.parse_augment(spec)` rebuilds it).
        layout: `rows` (one row per sample or view) or `tokens` (one row per token of a
            sequence, format_version 3: `offsets` (N+1,) maps sample i to rows
            `offsets[i]:offsets[i+1]`; `encoding` is then `topk` or `sampled`).
        num_tokens: rows of a `tokens` store (T, the real tokens of all samples); 0 otherwise.
        token_codec: how a `tokens` store codes its rows (`TokenCodec.to_dict`); None otherwise.
        provenance: what identifies the inputs beyond the specs as given (the resolved teacher
            and dataset modules or models, package versions); None in older stores.
        manifest: written with `complete`: {"sha256", "size", "objects", "bytes"} of the
            store's manifest (`softcache.store.manifest`); None before completion and in
            stores written before manifests.
        tokenizer: a `tokens` store whose teacher came with a tokenizer: its identity
            (`softcache.store.tokenizer.TokenizerIdentity.to_dict`); None otherwise and in
            older stores.
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
    provenance: Mapping[str, Any] | None = None
    manifest: Mapping[str, Any] | None = None
    tokenizer: Mapping[str, Any] | None = None

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
    def tokenizer_identity(self) -> TokenizerIdentity | None:
        """The teacher's tokenizer as recorded, None when the store records none."""
        return None if self.tokenizer is None else TokenizerIdentity.from_dict(self.tokenizer)

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


# Array name of each row field of a token store (`softcache.store.token_codec`).
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


def decode_values(
    values: np.ndarray, value_dtype: str, out: np.ndarray | None = None
) -> np.ndarray:
    """Storage dtype -> float32 (the inverse of `encode_values`, exact).

    Args:
        values: stored values (bfloat16 as uint16 bits), any shape.
        value_dtype: the store's value dtype.
        out: a float32 array of `values`' shape to write into (C-contiguous), or None.

    Returns:
        float32 values (`out` where given).
    """
    if out is not None and (out.shape != values.shape or out.dtype != np.float32):
        raise ValueError(
            f"out is {out.dtype} {out.shape}, the values decode to float32 {values.shape}"
        )
    if value_dtype == "bfloat16":
        if out is None:
            return (values.astype(np.uint32) << 16).view(np.float32)
        bits = out.view(np.uint32)
        bits[...] = values
        bits <<= 16
        return out
    if values.dtype == np.float16:
        # numpy widens float16 one element at a time (0.35 G values/s here); torch's cast is
        # vectorised (F16C): 4x faster per batch, the same values (widening is exact; a
        # signalling NaN comes out quiet, and stores hold no NaN).
        if not values.flags.writeable:  # torch.from_numpy warns on read-only memory
            values = values.copy()
        source = torch.from_numpy(np.ascontiguousarray(values))
        if out is None:
            return source.float().numpy()
        torch.from_numpy(out).copy_(source)
        return out
    if out is None:
        return values.astype(np.float32)
    out[...] = values
    return out


def storage_dtype(value_dtype: str) -> np.dtype:
    """The numpy dtype a value dtype is stored as."""
    return np.dtype(_STORAGE_DTYPES[value_dtype])
