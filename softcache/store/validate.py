"""Validation of a store's metadata before any data is read: the one gate every reader passes.

A store may come from another team, a half-finished copy or a hand edit, so nothing in it is
trusted. `open_checked` (called by `LogitStore.open`, so by `info`, `ls`, `verify`, `train`,
`merge` and `softcache.open_store`) reads the group's `zarr.json` and each required array's
`zarr.json` with a size cap, checks the `softcache` attribute against docs/FORMAT.md (types,
ranges, the relations between fields, the arrays each layout requires) and each array's metadata
against what the attribute implies (shape, dtype, chunk and shard grid, codec chain, fill value),
and refuses what a reader could not read in bounded memory (`MAX_SHARDS`, `MAX_SHARD_BYTES`).
Zarr parses nothing before this has passed, so an unknown codec, a string where a number belongs
or a shape of 10^12 rows is one line naming the store, the field and what was expected
(`StoreFormatError`), never a traceback or an allocation.

The rules are docs/FORMAT.md's, section *Validation*; this module and that section must agree.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from softcache._version import __version__
from softcache.errors import (
    MissingArrayError,
    NotAStoreError,
    StoreFormatError,
    UnsupportedVersionError,
)
from softcache.store.format import (
    ATTR_KEY,
    FORMAT_VERSION,
    LAYOUTS,
    OFFSETS,
    READABLE_VERSIONS,
    SAMPLE_CHUNK,
    SAMPLE_HASH,
    SHARD_DONE,
    TOKENS_FORMAT_VERSION,
    VIEWS_FORMAT_VERSION,
    StoreMeta,
    row_layout,
)
from softcache.store.token_codec import ID_CODINGS, TOKEN_ENCODINGS, TokenCodec
from softcache.store.token_coding import elias_fano_low_bits
from softcache.store.tokenizer import TokenizerIdentity

# ---- reader limits (not format limits: what softcache agrees to read) ---------------------------

#: Bytes of the group's zarr.json softcache reads (the attribute is a few KiB).
MAX_GROUP_JSON = 16 << 20
#: Bytes of an array's zarr.json softcache reads (a few hundred bytes in practice).
MAX_ARRAY_JSON = 1 << 20
#: Shards (storage objects per array) of a store. 4M shards of the default 4,096 rows are 17
#: billion rows; larger stores use larger shards.
MAX_SHARDS = 1 << 22
#: Decoded bytes of one shard of one array: a reader holds a few shards at a time, so this bounds
#: its memory whatever the metadata claims.
MAX_SHARD_BYTES = 1 << 30
#: Largest class count of a row store: class ids are int32 (FORMAT.md, *Index dtype*).
MAX_CLASSES = (1 << 31) - 1

ROW_ENCODINGS = ("dense", "topk")
VALUE_DTYPES = ("float16", "bfloat16", "float32")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# zstd's level range (negative levels are its fast modes).
_ZSTD_LEVELS = (-131072, 22)


def _show(value: Any) -> str:
    """A value as the message shows it: JSON, cut short."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return type(value) is int  # not bool, not 3.0


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


class _Fields:
    """Reads fields of one JSON object, refusing each violation in one line."""

    def __init__(self, where: str, prefix: str, data: Mapping[str, Any]) -> None:
        self.where = where
        self.prefix = prefix
        self.data = data

    def fail(self, key: str, expected: str, *, absent: bool = False) -> NoReturn:
        found = "missing" if absent else f"{_show(self.data[key])}"
        raise StoreFormatError(f"{self.where}: {self.prefix}{key} is {found}; expected {expected}")

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def present(self, key: str, expected: str) -> Any:
        if key not in self.data:
            self.fail(key, expected, absent=True)
        return self.data[key]

    def int(self, key: str, lo: int, hi: int | None = None, *, default: Any = ...) -> int:
        expected = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        if key not in self.data and default is not ...:
            return default
        value = self.present(key, expected)
        if not _is_int(value) or value < lo or (hi is not None and value > hi):
            self.fail(key, expected)
        return value

    def number(self, key: str, expected: str, *, positive: bool = False) -> float:
        value = self.present(key, expected)
        if not _is_number(value) or (positive and not value > 0):
            self.fail(key, expected)
        return float(value)

    def choice(self, key: str, choices: tuple[Any, ...], *, default: Any = ...) -> Any:
        expected = "one of " + ", ".join(_show(c) for c in choices)
        if key not in self.data and default is not ...:
            return default
        value = self.present(key, expected)
        if not isinstance(value, str) or value not in choices:
            self.fail(key, expected)
        return value

    def string(self, key: str, *, optional: bool = False, nullable: bool = False) -> str | None:
        expected = "a string" + (" or null" if nullable else "")
        if optional and key not in self.data:
            return None
        value = self.present(key, expected)
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            self.fail(key, expected)
        return value

    def boolean(self, key: str) -> bool:
        value = self.present(key, "true or false")
        if type(value) is not bool:
            self.fail(key, "true or false")
        return value

    def obj(self, key: str, *, nullable: bool = False, default: Any = ...) -> Mapping | None:
        expected = "a JSON object" + (" or null" if nullable else "")
        if key not in self.data and default is not ...:
            return default
        value = self.present(key, expected)
        if value is None and nullable:
            return None
        if not isinstance(value, Mapping):
            self.fail(key, expected)
        return value

    def sub(self, key: str, value: Mapping[str, Any]) -> _Fields:
        return _Fields(self.where, f"{self.prefix}{key}.", value)


# ---- the softcache attribute --------------------------------------------------------------------


def parse_meta(raw: Any, *, where: str) -> StoreMeta:
    """The `softcache` attribute -> `StoreMeta`, after checking every rule of FORMAT.md.

    Raises:
        UnsupportedVersionError: a format version this reader does not know (or not an integer).
        StoreFormatError: any other violation, naming the field and what was expected.
    """
    if not isinstance(raw, Mapping):
        raise StoreFormatError(f"{where}: the '{ATTR_KEY}' attribute is not a JSON object")
    version = raw.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        if type(version) is int and version > max(READABLE_VERSIONS):
            raise UnsupportedVersionError(
                f"{where} uses store format_version {version}, but softcache {__version__} "
                f"reads only versions {', '.join(map(str, READABLE_VERSIONS))}; upgrade "
                f"softcache to a release that supports format_version {version}"
            )
        raise UnsupportedVersionError(
            f"{where} has unknown store format_version {_show(version)}; expected an integer, "
            f"one of {', '.join(map(str, READABLE_VERSIONS))}"
        )
    f = _Fields(where, f"{ATTR_KEY}.", raw)
    layout = raw.get("layout", "rows")
    if layout not in LAYOUTS or (layout == "tokens" and raw.get("token_codec") is None):
        raise StoreFormatError(
            f"{where} has layout {layout!r}; expected one of {LAYOUTS}, with a "
            "token_codec for 'tokens'"
        )
    if (layout == "tokens") != (version == TOKENS_FORMAT_VERSION):
        raise StoreFormatError(
            f"{where} has layout {layout!r} but format_version {version}; per-token "
            f"stores, and only they, are format_version {TOKENS_FORMAT_VERSION}"
        )
    kwargs: dict[str, Any] = {"format_version": version, "layout": layout}
    kwargs["num_samples"] = f.int("num_samples", 0)
    kwargs["shard_rows"] = shard_rows = f.int("shard_rows", 1)
    kwargs["chunk_rows"] = chunk_rows = f.int("chunk_rows", 1, shard_rows)
    if shard_rows % chunk_rows:
        f.fail("chunk_rows", f"a divisor of shard_rows ({shard_rows})")
    kwargs["value_dtype"] = f.choice("value_dtype", VALUE_DTYPES)
    kwargs["complete"] = complete = f.boolean("complete")
    kwargs["created"] = f.string("created") or ""
    kwargs["softcache_version"] = f.string("softcache_version") or ""
    kwargs["teacher"] = _teacher(f)
    kwargs["dataset"] = _dataset(f, kwargs["num_samples"], complete)
    kwargs["build_config"] = f.obj("build_config")
    kwargs["provenance"] = f.obj("provenance", nullable=True, default=None)
    kwargs["manifest"] = _manifest_summary(f) if complete else None
    if layout == "tokens":
        _token_fields(f, kwargs)
    else:
        _row_fields(f, kwargs, version)
    kwargs["tokenizer"] = _tokenizer(f, kwargs)
    meta = StoreMeta(**kwargs)
    _check_size(f, meta)
    return meta


def _teacher(f: _Fields) -> Mapping[str, Any]:
    teacher = f.obj("teacher")
    assert teacher is not None
    t = f.sub("teacher", teacher)
    t.string("spec", optional=True, nullable=True)
    t.int("num_parameters", 0, default=0)
    t.string("state_dict_sha256", optional=True, nullable=True)
    return teacher


def _dataset(f: _Fields, num_samples: int, complete: bool) -> Mapping[str, Any]:
    dataset = f.obj("dataset")
    assert dataset is not None
    d = f.sub("dataset", dataset)
    d.string("spec", optional=True, nullable=True)
    if d.has("num_samples") and (given := d.int("num_samples", 0)) != num_samples:
        raise StoreFormatError(
            f"{f.where}: softcache.num_samples is {num_samples} but softcache.dataset."
            f"num_samples is {given}; expected them equal"
        )
    fingerprint = d.string("fingerprint", optional=True, nullable=True)
    if complete and not fingerprint:
        d.fail("fingerprint", "the dataset fingerprint of a complete store", absent=True)
    return dataset


def _manifest_summary(f: _Fields) -> Mapping[str, Any] | None:
    """The `manifest` key (complete stores written since manifests exist; None before)."""
    summary = f.obj("manifest", nullable=True, default=None)
    if summary is None:
        return None
    m = f.sub("manifest", summary)
    digest = m.string("sha256")
    if not _HEX64.fullmatch(digest or ""):
        m.fail("sha256", "64 lowercase hex digits")
    m.int("size", 1)
    m.int("objects", 0)
    m.int("bytes", 0)
    return summary


def _row_fields(f: _Fields, kwargs: dict[str, Any], version: int) -> None:
    kwargs["encoding"] = encoding = f.choice("encoding", ROW_ENCODINGS)
    kwargs["num_classes"] = classes = f.int("num_classes", 1, MAX_CLASSES)
    if encoding == "dense":
        if f.present("k", "null for a dense store") is not None:
            f.fail("k", "null for a dense store")
        kwargs["k"] = None
        temperatures = f.present("temperatures", "[] for a dense store")
        if temperatures != []:
            f.fail("temperatures", "[] for a dense store")
        kwargs["temperatures"] = ()
    else:
        kwargs["k"] = f.int("k", 1, classes)
        temperatures = f.present("temperatures", "a non-empty list of positive numbers")
        if (
            not isinstance(temperatures, list)
            or not temperatures
            or len(temperatures) > 1024
            or not all(_is_number(t) and t > 0 for t in temperatures)
        ):
            f.fail("temperatures", "a non-empty list of positive numbers (at most 1024)")
        kwargs["temperatures"] = tuple(float(t) for t in temperatures)
    kwargs["views"] = views = f.int("views", 1, default=1)
    if kwargs["shard_rows"] % views:
        f.fail("shard_rows", f"a multiple of views ({views})")
    augmentation = f.obj("augmentation", nullable=True, default=None)
    if augmentation is not None:
        a = f.sub("augmentation", augmentation)
        a.string("spec")
        names = a.present("param_names", "a list of strings")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            a.fail("param_names", "a list of strings")
        if len(names) > 4096:
            a.fail("param_names", "at most 4096 names")
        a.int("seed", 0)
    if views > 1 and augmentation is None:
        f.fail("augmentation", f"an augmentation object, since views = {views}")
    wanted = VIEWS_FORMAT_VERSION if augmentation is not None else FORMAT_VERSION
    if version != wanted:
        f.fail(
            "format_version",
            f"{wanted}: version {VIEWS_FORMAT_VERSION} is a row store with an augmentation, "
            f"{FORMAT_VERSION} one without",
        )
    kwargs["augmentation"] = augmentation
    if f.int("num_tokens", 0, 0, default=0):
        f.fail("num_tokens", "0 for a row store")
    if f.get("token_codec") is not None:
        f.fail("token_codec", "null for a row store")


_CODEC_TYPES: dict[str, tuple[str, tuple[type, ...]]] = {
    "encoding": ("a string", (str,)),
    "width": ("an integer", (int,)),
    "vocab_size": ("an integer", (int,)),
    "temperature": ("a number", (int, float)),
    "ids": ("a string", (str,)),
    "ef_low_bits": ("an integer", (int,)),
    "value_bits": ("an integer", (int,)),
    "residual_bits": ("an integer", (int,)),
    "log_floor": ("a number", (int, float)),
    "seed": ("an integer", (int,)),
}


def _token_fields(f: _Fields, kwargs: dict[str, Any]) -> None:
    raw = f.obj("token_codec")
    assert raw is not None
    c = f.sub("token_codec", raw)
    for key, (expected, types) in _CODEC_TYPES.items():
        if key in raw and (type(raw[key]) not in types or not _finite(raw[key])):
            c.fail(key, expected)
    c.choice("encoding", TOKEN_ENCODINGS)
    c.choice("ids", ID_CODINGS, default=None)
    try:  # the remaining ranges: "malformed token_codec ..."
        codec = TokenCodec.from_dict(raw)
    except StoreFormatError as exc:
        why = exc.__cause__ if exc.__cause__ is not None else exc
        raise StoreFormatError(
            f"{f.where}: malformed token_codec (softcache.token_codec): {why}"
        ) from None
    wanted_low = elias_fano_low_bits(codec.vocab_size, codec.width)
    if "ef_low_bits" in raw and codec.ef_low_bits != wanted_low:
        c.fail("ef_low_bits", f"{wanted_low}, floor(log2(vocab_size / width))")
    kwargs["token_codec"] = raw
    kwargs["encoding"] = f.present("encoding", f"{codec.encoding!r}, token_codec.encoding")
    kwargs["num_classes"] = f.present("num_classes", f"{codec.vocab_size}")
    kwargs["k"] = f.present("k", f"{codec.width}")
    seen = (kwargs["encoding"], kwargs["num_classes"], kwargs["k"])
    if seen != (codec.encoding, codec.vocab_size, codec.width) or not all(
        type(v) is type(w) for v, w in zip(seen, (codec.encoding, 1, 1), strict=True)
    ):
        raise StoreFormatError(
            f"{f.where}: encoding, num_classes and k {seen} disagree with its token_codec "
            f"{(codec.encoding, codec.vocab_size, codec.width)}"
        )
    temperatures = f.present("temperatures", f"[{codec.temperature}]")
    if temperatures != [codec.temperature] or not all(_is_number(t) for t in temperatures):
        f.fail("temperatures", f"[{codec.temperature}], the token_codec's temperature")
    kwargs["temperatures"] = (float(codec.temperature),)
    kwargs["views"] = f.int("views", 1, 1, default=1)
    if f.get("augmentation") is not None:
        f.fail("augmentation", "null for a per-token store")
    kwargs["num_tokens"] = f.int("num_tokens", 0)


def _tokenizer(f: _Fields, kwargs: dict[str, Any]) -> Mapping[str, Any] | None:
    """The teacher's tokenizer identity (token stores; optional, absent in older stores)."""
    raw = f.obj("tokenizer", nullable=True, default=None)
    if raw is None:
        return None
    if kwargs["layout"] != "tokens":
        f.fail("tokenizer", "null for a row store")
    try:
        identity = TokenizerIdentity.from_dict(raw)
    except StoreFormatError as exc:
        raise StoreFormatError(f"{f.where}: softcache.{exc}") from None
    if identity.logit_width is not None and identity.logit_width != kwargs["num_classes"]:
        f.sub("tokenizer", raw).fail(
            "logit_width", f"null or num_classes ({kwargs['num_classes']}), the teacher's width"
        )
    return raw


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _check_size(f: _Fields, meta: StoreMeta) -> None:
    """Refuse a store no reader could hold a shard of: too many shards, or too large ones."""
    if meta.num_shards > MAX_SHARDS:
        f.fail(
            "shard_rows",
            f"at most {MAX_SHARDS:,} shards of the store's {meta.num_rows:,} rows "
            f"(this would be {meta.num_shards:,}); softcache reads no more",
        )
    sample_chunks = -(-(meta.num_samples + 1) // SAMPLE_CHUNK) if meta.tokens else 0
    if sample_chunks > MAX_SHARDS:
        f.fail("num_samples", f"at most {MAX_SHARDS * SAMPLE_CHUNK - 1:,} samples in a token store")
    for name, (shape, dtype) in row_layout(meta).items():
        row_bytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
        if float(row_bytes) * meta.shard_rows > MAX_SHARD_BYTES:
            f.fail(
                "shard_rows",
                f"shards of at most {MAX_SHARD_BYTES >> 20} MiB per array; array {name} has "
                f"{row_bytes:,} bytes per row, so {meta.shard_rows:,} rows would be "
                f"{row_bytes * meta.shard_rows:,} bytes",
            )


# ---- arrays -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArraySpec:
    """What FORMAT.md says one array's metadata must be, given the store's attribute.

    `kind`: `sharded` (per-row arrays: one shard of `shard_rows` per object, inner chunks of
    `chunk_rows`, bytes + zstd + crc32c), `samples` (a token store's per-sample arrays: regular
    chunks, bytes + zstd + crc32c) or `done` (`shard_done`: one element per object, bytes only).
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    kind: str
    chunk: tuple[int, ...]
    inner: tuple[int, ...] = ()


def array_specs(meta: StoreMeta) -> dict[str, ArraySpec]:
    """Every array the store must hold, in `LogitStore.array_names` order."""
    specs: dict[str, ArraySpec] = {}
    for name, (row, dtype) in row_layout(meta).items():
        if meta.tokens and name == SAMPLE_HASH:
            continue
        specs[name] = ArraySpec(
            name,
            (meta.num_rows, *row),
            np.dtype(dtype),
            "sharded",
            (meta.shard_rows, *row),
            (meta.chunk_rows, *row),
        )
    if meta.tokens:
        sample_arrays: tuple[tuple[str, int, Any], ...] = (
            (OFFSETS, meta.num_samples + 1, np.int64),
            (SAMPLE_HASH, meta.num_samples, np.uint64),
        )
        for name, length, dtype in sample_arrays:
            chunk = (min(SAMPLE_CHUNK, max(length, 1)),)
            specs[name] = ArraySpec(name, (length,), np.dtype(dtype), "samples", chunk)
    specs[SHARD_DONE] = ArraySpec(SHARD_DONE, (meta.num_shards,), np.dtype(np.uint8), "done", (1,))
    return specs


_ARRAY_KEYS = {
    "zarr_format",
    "node_type",
    "shape",
    "data_type",
    "chunk_grid",
    "chunk_key_encoding",
    "fill_value",
    "codecs",
    "attributes",
    "dimension_names",
    "storage_transformers",
}


def check_array(doc: Any, spec: ArraySpec, *, where: str) -> None:
    """Refuse array metadata (a parsed zarr.json) that is not what FORMAT.md prescribes."""
    name = f"array {spec.name}"
    if not isinstance(doc, Mapping):
        raise StoreFormatError(f"{where}: {name}: zarr.json is not a JSON object")
    f = _Fields(where, f"{spec.name}/zarr.json: ", doc)
    for key in doc:
        if key not in _ARRAY_KEYS:
            raise StoreFormatError(
                f"{where}: {spec.name}/zarr.json: key {_show(key)} is not part of the format "
                f"(expected only {', '.join(sorted(_ARRAY_KEYS))})"
            )
    if f.present("zarr_format", "3") != 3 or type(doc["zarr_format"]) is not int:
        f.fail("zarr_format", "3")
    if f.present("node_type", '"array"') != "array":
        f.fail("node_type", '"array"')
    _expect(f, "shape", list(spec.shape), _shape_text(spec))
    _expect(f, "data_type", spec.dtype.name, f"{spec.dtype.name!r}")
    _expect(
        f,
        "chunk_grid",
        {"name": "regular", "configuration": {"chunk_shape": list(spec.chunk)}},
        f"a regular grid of chunk_shape {list(spec.chunk)}",
    )
    encoding = f.present("chunk_key_encoding", '{"name": "default", separator "/"}')
    if encoding not in (
        {"name": "default", "configuration": {"separator": "/"}},
        {"name": "default"},
    ):
        f.fail("chunk_key_encoding", '{"name": "default", separator "/"}')
    fill = f.present("fill_value", "0")
    if type(fill) not in (int, float) or fill != 0:
        f.fail("fill_value", "0")
    if doc.get("storage_transformers", []) != []:
        f.fail("storage_transformers", "[] (none)")
    attributes = doc.get("attributes", {})
    if not isinstance(attributes, Mapping):
        f.fail("attributes", "a JSON object")
    names = doc.get("dimension_names")
    if names is not None and (
        not isinstance(names, list)
        or len(names) != len(spec.shape)
        or not all(n is None or isinstance(n, str) for n in names)
    ):
        f.fail("dimension_names", f"null or a list of {len(spec.shape)} names")
    problem = _codec_problem(f.present("codecs", "a list of codecs"), spec)
    if problem is not None:
        field, found, expected = problem
        raise StoreFormatError(
            f"{where}: {spec.name}/zarr.json: {field} is {_show(found)}; expected {expected}"
        )


def _expect(f: _Fields, key: str, value: Any, expected: str) -> None:
    found = f.present(key, expected)
    if found != value or not _same_types(found, value):
        f.fail(key, expected)


def _same_types(a: Any, b: Any) -> bool:
    """Equal JSON values compare equal across bool / int / float in Python: not here."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_types(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_types(a[k], b[k]) for k in a)
    return type(a) is type(b)


def _shape_text(spec: ArraySpec) -> str:
    what = {
        "sharded": "rows by row shape",
        "samples": "per sample",
        "done": "one element per shard",
    }[spec.kind]
    return f"{list(spec.shape)} ({what}, from the softcache attribute)"


_BYTES = "bytes, little endian"
_ZSTD = "zstd with an integer level in [-131072, 22] and a boolean checksum"
_CRC = "crc32c"


def _codec_problem(codecs: Any, spec: ArraySpec) -> tuple[str, Any, str] | None:
    """The first place where `codecs` is not the chain FORMAT.md prescribes for `spec`:
    (field path, what is there, what was expected); None when it is."""
    itemsize = spec.dtype.itemsize
    if spec.kind == "done":
        return _chain_problem("codecs", codecs, [(_is_bytes_of(itemsize), _BYTES)])
    chain = [(_is_bytes_of(itemsize), _BYTES), (_is_zstd, _ZSTD), (_is_crc, _CRC)]
    if spec.kind == "samples":
        return _chain_problem("codecs", codecs, chain)
    wanted = "sharding_indexed (one codec)"
    if not isinstance(codecs, list) or len(codecs) != 1:
        return "codecs", codecs, f"[{wanted}]"
    sharding = codecs[0]
    if not isinstance(sharding, Mapping) or sharding.get("name") != "sharding_indexed":
        return "codecs[0]", sharding, wanted
    if set(sharding) != {"name", "configuration"} or not isinstance(
        sharding["configuration"], Mapping
    ):
        return "codecs[0]", sharding, "name and configuration only"
    config = sharding["configuration"]
    where = "codecs[0].configuration"
    allowed = {"chunk_shape", "codecs", "index_codecs", "index_location"}
    if not set(config) <= allowed:
        extra = sorted(set(config) - allowed)[0]
        return f"{where}.{extra}", config[extra], "absent (not part of the format)"
    inner = config.get("chunk_shape")
    if inner != list(spec.inner) or not _same_types(inner, list(spec.inner)):
        return f"{where}.chunk_shape", inner, f"{list(spec.inner)} (chunk_rows by row shape)"
    problem = _chain_problem(f"{where}.codecs", config.get("codecs"), chain)
    if problem is not None:
        return problem
    index = [(_is_bytes_of(8), _BYTES), (_is_crc, _CRC)]
    problem = _chain_problem(f"{where}.index_codecs", config.get("index_codecs"), index)
    if problem is not None:
        return problem
    if config.get("index_location", "end") != "end":
        return f"{where}.index_location", config["index_location"], '"end"'
    return None


def _chain_problem(where: str, codecs: Any, chain: list[tuple[Any, str]]) -> tuple | None:
    names = ", ".join(text.split(",")[0].split(" with")[0] for _, text in chain)
    if not isinstance(codecs, list) or len(codecs) != len(chain):
        return where, codecs, f"[{names}]"
    for i, (ok, text) in enumerate(chain):
        if not ok(codecs[i]):
            return f"{where}[{i}]", codecs[i], text
    return None


def _is_bytes_of(itemsize: int) -> Any:
    return lambda codec: _is_bytes(codec, itemsize)


def _is_bytes(codec: Any, itemsize: int) -> bool:
    if not isinstance(codec, Mapping) or codec.get("name") != "bytes":
        return False
    if not set(codec) <= {"name", "configuration"}:
        return False
    config = codec.get("configuration", {})
    if config in ({}, None):
        return itemsize == 1  # no byte order: only for one-byte types
    return config == {"endian": "little"} or (itemsize == 1 and config == {"endian": "big"})


def _is_zstd(codec: Any) -> bool:
    if not isinstance(codec, Mapping) or codec.get("name") != "zstd":
        return False
    config = codec.get("configuration")
    if set(codec) != {"name", "configuration"} or not isinstance(config, Mapping):
        return False
    level = config.get("level")
    return (
        set(config) <= {"level", "checksum"}
        and type(level) is int
        and _ZSTD_LEVELS[0] <= level <= _ZSTD_LEVELS[1]
        and type(config.get("checksum", False)) is bool
    )


def _is_crc(codec: Any) -> bool:
    return (
        isinstance(codec, Mapping)
        and codec.get("name") == "crc32c"
        and set(codec) <= {"name", "configuration"}
        and codec.get("configuration", {}) in ({}, None)
    )


# ---- reading metadata objects -------------------------------------------------------------------


def read_object(store: Store, key: str, limit: int, *, where: str) -> bytes | None:
    """An object's bytes, None when it does not exist; refused (not read) above `limit` bytes."""
    try:
        size = int(sync(store.getsize(key)))
    except (FileNotFoundError, NotADirectoryError, KeyError):
        return None
    if size > limit:
        raise StoreFormatError(
            f"{where}: {key} is {size:,} bytes; expected at most {limit:,} (softcache reads no "
            "larger metadata)"
        )
    buffer = sync(store.get(key, prototype=default_buffer_prototype()))
    if buffer is None:
        return None
    data = buffer.to_bytes()
    if len(data) > limit:  # changed since its size was read
        raise StoreFormatError(f"{where}: {key} grew past {limit:,} bytes while being read")
    return data


def parse_json(data: bytes, key: str, *, where: str) -> Any:
    """JSON bytes -> a value; malformed JSON is a `StoreFormatError` naming the object."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise StoreFormatError(f"{where}: {key} is not valid JSON ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:120]


@dataclass(frozen=True)
class Checked:
    """A store whose metadata passed `check_store`: its parsed attribute and the raw group
    metadata (whose SHA-256 is the store's digest, `softcache.store.manifest`)."""

    meta: StoreMeta
    group_json: bytes
    arrays: dict[str, ArraySpec]


def check_store(store: Store, *, where: str) -> Checked:
    """Validate a store's metadata (group and arrays) without reading any data.

    Raises:
        NotAStoreError: no group, or a Zarr group without the `softcache` attribute.
        UnsupportedVersionError / StoreFormatError: the metadata breaks a rule of FORMAT.md.
        MissingArrayError: arrays the attribute requires are missing (an interrupted creation).
    """
    group_json = read_object(store, "zarr.json", MAX_GROUP_JSON, where=where)
    if group_json is None:
        raise NotAStoreError(f"{where} does not exist or is not a Zarr group (no zarr.json)")
    doc = parse_json(group_json, "zarr.json", where=where)
    if not isinstance(doc, Mapping) or doc.get("node_type") != "group":
        kind = doc.get("node_type") if isinstance(doc, Mapping) else None
        raise NotAStoreError(f"{where} is not a Zarr group (zarr.json has node_type {_show(kind)})")
    if doc.get("zarr_format") != 3 or type(doc.get("zarr_format")) is not int:
        raise StoreFormatError(
            f"{where}: zarr.json: zarr_format is {_show(doc.get('zarr_format'))}; expected 3"
        )
    attrs = doc.get("attributes", {})
    if not isinstance(attrs, Mapping) or ATTR_KEY not in attrs:
        raise NotAStoreError(f"{where} is a Zarr group but has no '{ATTR_KEY}' metadata")
    meta = parse_meta(attrs[ATTR_KEY], where=where)
    specs = array_specs(meta)
    docs: dict[str, Any] = {}
    for name in specs:
        data = read_object(store, f"{name}/zarr.json", MAX_ARRAY_JSON, where=where)
        if data is not None:
            docs[name] = parse_json(data, f"{name}/zarr.json", where=where)
    missing = [name for name in specs if name not in docs]
    if missing:
        raise MissingArrayError(
            f"{where} is missing array(s) {', '.join(missing)}", missing=tuple(missing)
        )
    for name, spec in specs.items():
        check_array(docs[name], spec, where=where)
    return Checked(meta, group_json, specs)
