"""The store: the format (the only code that knows Zarr array names and attributes), the codec of
each layout, where stores live, and how they are written.

- `format`: `StoreMeta` (the `softcache` group attribute), array names, per-row layouts, value
  dtypes; docs/FORMAT.md is its specification.
- `logit_store`: `LogitStore`, an open store (create, open, read, write shards, complete).
- `row_codec` / `token_codec` (with `token_coding`, its pure encoders): how rows of each layout
  are coded on the device.
- `location`: local folders, zip archives, fsspec URLs, and the walk `ls` makes. `writer`:
  background shard writers. `output`: create or resume a build's output.
- `validate`: the metadata checks every reader runs before reading any data (`LogitStore.open`).
- `manifest`: the SHA-256 of every object, the store's digest, and reads pinned to it.
- `published`: versions of a store under a name, through Icechunk (optional extra).
"""

from softcache.store.format import (
    ATTR_KEY,
    DENSE_ARRAYS,
    FORMAT_VERSION,
    LAYOUTS,
    LOGITS,
    LSE,
    OFFSETS,
    READABLE_VERSIONS,
    SAMPLE_HASH,
    SHARD_DONE,
    TOKEN_COUNTS,
    TOKEN_ENTROPY,
    TOKEN_IDS,
    TOKEN_RESIDUAL,
    TOKEN_SAMPLED_ARRAYS,
    TOKEN_TOPK_ARRAYS,
    TOKEN_VALUES,
    TOKENS_FORMAT_VERSION,
    TOPK_ARRAYS,
    TOPK_INDICES,
    TOPK_VALUES,
    VIEW_PARAMS,
    VIEWS_FORMAT_VERSION,
    StoreMeta,
    check_offsets,
    data_array_names,
    decode_token_rows,
    decode_values,
    encode_values,
    row_layout,
    storage_dtype,
    token_arrays,
    token_fields,
)
from softcache.store.logit_store import LogitStore, holds_group, take_rows

__all__ = [
    "ATTR_KEY",
    "DENSE_ARRAYS",
    "FORMAT_VERSION",
    "LAYOUTS",
    "LOGITS",
    "LSE",
    "OFFSETS",
    "READABLE_VERSIONS",
    "SAMPLE_HASH",
    "SHARD_DONE",
    "TOKENS_FORMAT_VERSION",
    "TOKEN_COUNTS",
    "TOKEN_ENTROPY",
    "TOKEN_IDS",
    "TOKEN_RESIDUAL",
    "TOKEN_SAMPLED_ARRAYS",
    "TOKEN_TOPK_ARRAYS",
    "TOKEN_VALUES",
    "TOPK_ARRAYS",
    "TOPK_INDICES",
    "TOPK_VALUES",
    "VIEWS_FORMAT_VERSION",
    "VIEW_PARAMS",
    "LogitStore",
    "StoreMeta",
    "check_offsets",
    "data_array_names",
    "decode_token_rows",
    "decode_values",
    "encode_values",
    "holds_group",
    "row_layout",
    "storage_dtype",
    "take_rows",
    "token_arrays",
    "token_fields",
]
