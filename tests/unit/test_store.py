"""Tests for softcache.store: the format's round trip, its refusals, and its value encodings."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from softcache.errors import (
    CorruptChunkError,
    IncompleteStoreError,
    SoftcacheError,
    StoreFormatError,
)
from softcache.store import (
    ATTR_KEY,
    FORMAT_VERSION,
    LOGITS,
    LSE,
    SAMPLE_HASH,
    SHARD_DONE,
    TOPK_INDICES,
    TOPK_VALUES,
    LogitStore,
    StoreMeta,
    decode_values,
    encode_values,
    storage_dtype,
)
from softcache.store.validate import parse_meta
from tests.helpers import NEWER, READABLE


def _spec(name: str) -> str:
    return f"tests.helpers.specs:{name}"


def _meta(**overrides) -> StoreMeta:
    values = {
        "encoding": "dense",
        "num_classes": 7,
        "k": None,
        "num_samples": 50,
        "value_dtype": "float16",
        "temperatures": (),
        "shard_rows": 16,
        "chunk_rows": 8,
        "teacher": {"spec": "m:t", "num_parameters": 1, "state_dict_sha256": "0" * 64},
        "dataset": {"spec": "m:d", "num_samples": 50, "fingerprint": None},
        "build_config": {"batch_size": 4},
    }
    values.update(overrides)
    return StoreMeta(**values)


def _topk_meta(**overrides) -> StoreMeta:
    return _meta(
        **{"encoding": "topk", "k": 3, "temperatures": (1.0, 2.0), "value_dtype": "float32"}
        | overrides
    )


def _fill(store: LogitStore, seed: int = 0) -> dict[str, np.ndarray]:
    """Write every shard with random rows; return the full arrays written."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[np.ndarray]] = {}
    for shard in range(store.meta.num_shards):
        bufs = store.empty_shard(shard)
        for buf in bufs.values():
            if np.issubdtype(buf.dtype, np.floating):
                buf[...] = rng.standard_normal(buf.shape)
            else:
                buf[...] = rng.integers(0, np.iinfo(buf.dtype).max, buf.shape, dtype=buf.dtype)
        store.write_shard(shard, bufs)
        for name, buf in bufs.items():
            written.setdefault(name, []).append(buf)
    return {name: np.concatenate(parts) for name, parts in written.items()}


def _set_attr(path: Path, **changes) -> None:
    """Edit the `softcache` attribute with plain zarr, as a foreign writer would."""
    group = zarr.open_group(str(path), mode="r+")
    attrs = dict(group.attrs[ATTR_KEY])
    attrs.update(changes)
    group.attrs[ATTR_KEY] = attrs


# ---- round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("meta", [_meta(), _topk_meta()], ids=["dense", "topk"])
def test_create_write_open_round_trip(tmp_path: Path, meta: StoreMeta) -> None:
    path = tmp_path / "s.zarr"
    store = LogitStore.create(path, meta)
    assert store.meta.complete is False and store.meta.created  # stamped at creation
    assert not store.done_mask().any()
    written = _fill(store)
    assert store.done_mask().all()
    store.mark_complete("abc123")

    reopened = LogitStore.open(path)
    expected = dataclasses.replace(
        store.meta, dataset={**meta.dataset, "fingerprint": "abc123"}, complete=True
    )
    assert reopened.meta == expected
    assert reopened.meta.format_version == FORMAT_VERSION
    rows = reopened.read_rows(0, meta.num_samples)
    assert set(rows) == set(written)
    for name, data in written.items():
        assert rows[name].dtype == data.dtype
        np.testing.assert_array_equal(rows[name], data)
    np.testing.assert_array_equal(reopened.sample_hashes(), written[SAMPLE_HASH])
    assert reopened.nbytes_stored() > 0


def test_array_layout_of_a_dense_store(tmp_path: Path) -> None:
    store = LogitStore.create(tmp_path / "s.zarr", _meta(), compression_level=5)
    logits = store.array(LOGITS)
    assert logits.shape == (50, 7) and logits.dtype == np.float16
    assert logits.shards == (16, 7) and logits.chunks == (8, 7)
    assert logits.metadata.dimension_names == ("sample", "entry")
    assert logits.fill_value == 0
    hashes = store.array(SAMPLE_HASH)
    assert hashes.shape == (50,) and hashes.dtype == np.uint64 and hashes.shards == (16,)
    done = store.array(SHARD_DONE)
    assert done.shape == (4,) and done.dtype == np.uint8 and done.chunks == (1,)
    assert done.shards is None  # one object per shard: each writer owns exactly one element
    assert done.compressors == () and done.metadata.dimension_names is None
    # The codecs FORMAT.md promises: zstd then crc32c per inner chunk, crc32c on the shard index.
    meta = json.loads((tmp_path / "s.zarr" / LOGITS / "zarr.json").read_text())
    (sharding,) = meta["codecs"]
    assert sharding["name"] == "sharding_indexed"
    conf = sharding["configuration"]
    assert [c["name"] for c in conf["codecs"]] == ["bytes", "zstd", "crc32c"]
    assert conf["codecs"][1]["configuration"]["level"] == 5
    assert [c["name"] for c in conf["index_codecs"]] == ["bytes", "crc32c"]
    assert conf["index_location"] == "end"


def test_array_layout_of_a_topk_store(tmp_path: Path) -> None:
    store = LogitStore.create(tmp_path / "s.zarr", _topk_meta(value_dtype="bfloat16"))
    assert store.array_names == (TOPK_VALUES, TOPK_INDICES, LSE, SAMPLE_HASH, SHARD_DONE)
    assert store.array(TOPK_VALUES).dtype == np.uint16  # bfloat16 bit patterns
    assert store.array(TOPK_INDICES).dtype == np.uint16
    assert store.array(TOPK_INDICES).shape == (50, 3)
    lse = store.array(LSE)
    assert lse.dtype == np.float32 and lse.shape == (50, 2)  # one column per temperature


def test_a_corrupted_chunk_fails_loudly(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = LogitStore.create(path, _meta())
    _fill(store)
    shard_file = path / LOGITS / "c" / "1" / "0"
    data = bytearray(shard_file.read_bytes())
    data[40] ^= 0x01
    shard_file.write_bytes(bytes(data))
    reopened = LogitStore.open(path, require_complete=False)
    reopened.read_rows(0, 16)  # other shards still read
    with pytest.raises(ValueError, match="checksum"):
        reopened.read_rows(16, 32)


def test_read_many_reads_what_read_reads_and_names_a_corrupted_chunk(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _fill(LogitStore.create(path, _meta()))
    store = LogitStore.open(path, require_complete=False)
    requests = [(LOGITS, slice(16, 32)), (SAMPLE_HASH, slice(0, 16)), (LOGITS, slice(3, 40))]
    for got, (name, rows) in zip(store.read_many(requests), requests, strict=True):
        want = store.read(name, rows)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert store.read_many([]) == []

    shard_file = path / LOGITS / "c" / "1" / "0"
    data = bytearray(shard_file.read_bytes())
    data[40] ^= 0x01
    shard_file.write_bytes(bytes(data))
    damaged = LogitStore.open(path, require_complete=False)
    with pytest.raises(CorruptChunkError, match=r"logits rows 16\.\.32.*softcache verify"):
        damaged.read_many([(SAMPLE_HASH, slice(16, 32)), (LOGITS, slice(16, 32))])


def test_an_all_zero_shard_is_still_written(tmp_path: Path) -> None:
    """FORMAT.md: every shard object is written, zeros included (absent means never written)."""
    path = tmp_path / "s.zarr"
    store = LogitStore.create(path, _meta())
    bufs = store.empty_shard(1)
    for buf in bufs.values():
        buf[...] = 0
    store.write_shard(1, bufs)
    assert (path / LOGITS / "c" / "1" / "0").is_file()
    assert (path / SAMPLE_HASH / "c" / "1").is_file()
    assert (path / SHARD_DONE / "c" / "1").is_file()
    assert not (path / LOGITS / "c" / "0" / "0").exists()  # shard 0 was never written
    assert store.done_mask().tolist() == [False, True, False, False]


def test_write_shard_checks_row_count(tmp_path: Path) -> None:
    store = LogitStore.create(tmp_path / "s.zarr", _meta())
    bufs = store.empty_shard(0)
    bufs[LOGITS] = bufs[LOGITS][:-1]
    with pytest.raises(ValueError, match="15 rows, expected 16"):
        store.write_shard(0, bufs)
    assert not store.done_mask().any()


def test_last_shard_is_short(tmp_path: Path) -> None:
    store = LogitStore.create(tmp_path / "s.zarr", _meta())
    assert store.meta.num_shards == 4
    assert store.shard_bounds(3) == (48, 50)
    assert store.empty_shard(3)[LOGITS].shape == (2, 7)


def test_meta_dict_round_trip_is_json() -> None:
    meta = _topk_meta()
    data = json.loads(json.dumps(meta.to_dict()))
    assert data["temperatures"] == [1.0, 2.0]
    assert parse_meta(data, where="x") == meta


def test_a_built_bfloat16_topk_store_through_the_api(make_store) -> None:
    from tests.helpers import specs

    path, result = make_store(
        encoding="topk",
        top_k=4,
        dtype="bfloat16",
        temperatures=(1.0, 2.0),
        teacher=_spec("wide_teacher"),
    )
    assert result.shards_total == 5 and result.shards_written == 5 and result.shards_skipped == 0
    store = LogitStore.open(path)
    assert store.meta.value_dtype == "bfloat16" and store.meta.index_dtype == np.uint16
    rows = store.read_rows(0, 300)
    ref = specs.reference_logits(specs.wide_teacher(), specs.inputs(), 64, 24)
    top, ids = torch.topk(ref, 4, dim=1)
    np.testing.assert_array_equal(rows[TOPK_INDICES], ids.numpy().astype(np.uint16))
    np.testing.assert_array_equal(
        store.decode_values(rows[TOPK_VALUES]), top.to(torch.bfloat16).float().numpy()
    )
    np.testing.assert_array_equal(rows[LSE][:, 1], torch.logsumexp(ref / 2.0, dim=1).numpy())
    assert result.bytes_stored == store.nbytes_stored()


# ---- refusals -------------------------------------------------------------------------------


def test_incomplete_store_is_refused_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = LogitStore.create(path, _meta())
    bufs = store.empty_shard(0)
    for buf in bufs.values():
        buf[...] = 1
    store.write_shard(0, bufs)
    with pytest.raises(IncompleteStoreError, match=r"incomplete \(1 of 4 shards written\)"):
        LogitStore.open(path)
    partial = LogitStore.open(path, require_complete=False)
    assert partial.done_mask().tolist() == [True, False, False, False]


@pytest.mark.parametrize("version", [NEWER, 17])
def test_newer_format_version_is_refused_naming_it(tmp_path: Path, version: int) -> None:
    path = tmp_path / "s.zarr"
    LogitStore.create(path, _meta()).mark_complete("f")
    _set_attr(path, format_version=version)
    with pytest.raises(StoreFormatError) as info:
        LogitStore.open(path)
    message = str(info.value)
    assert f"format_version {version}" in message
    assert f"reads only versions {READABLE}" in message
    assert "upgrade softcache" in message


@pytest.mark.parametrize("version", [0, "1", None, 1.5])
def test_unknown_format_version_is_refused(tmp_path: Path, version: object) -> None:
    path = tmp_path / "s.zarr"
    LogitStore.create(path, _meta()).mark_complete("f")
    _set_attr(path, format_version=version)
    with pytest.raises(StoreFormatError, match="unknown store format_version"):
        LogitStore.open(path)


def test_new_optional_attributes_and_arrays_are_ignored(tmp_path: Path) -> None:
    """The compatibility rule: additions within a version do not break old readers."""
    path = tmp_path / "s.zarr"
    store = LogitStore.create(path, _meta())
    written = _fill(store)
    store.mark_complete("f")
    _set_attr(path, some_future_key={"x": 1})
    zarr.open_group(str(path), mode="r+").create_array("future_array", shape=(3,), dtype="i4")
    reopened = LogitStore.open(path)
    np.testing.assert_array_equal(reopened.read_rows(0, 50)[LOGITS], written[LOGITS])


def test_missing_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    LogitStore.create(path, _meta()).mark_complete("f")
    shutil.rmtree(path / SAMPLE_HASH)
    with pytest.raises(StoreFormatError, match=f"missing array.*{SAMPLE_HASH}"):
        LogitStore.open(path)


def test_malformed_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    LogitStore.create(path, _meta()).mark_complete("f")
    group = zarr.open_group(str(path), mode="r+")
    attrs = dict(group.attrs[ATTR_KEY])
    del attrs["num_classes"]
    group.attrs[ATTR_KEY] = attrs
    with pytest.raises(
        StoreFormatError, match=r"softcache.num_classes is missing; expected an integer"
    ):
        LogitStore.open(path)


def test_zarr_group_without_softcache_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "foreign.zarr"
    zarr.open_group(str(path), mode="w").create_array("x", shape=(2,), dtype="i4")
    with pytest.raises(StoreFormatError, match="no 'softcache' metadata"):
        LogitStore.open(path)


def test_missing_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreFormatError, match="does not exist"):
        LogitStore.open(tmp_path / "nope.zarr")


def test_plain_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(StoreFormatError, match="not a Zarr group"):
        LogitStore.open(tmp_path)


def test_regular_file_is_refused_read_only(tmp_path: Path) -> None:
    path = tmp_path / "file.zarr"
    path.write_text("not a store")
    with pytest.raises(StoreFormatError):
        LogitStore.open(path)
    assert path.read_text() == "not a store"


def test_regular_file_is_refused_read_write(tmp_path: Path) -> None:
    path = tmp_path / "file.zarr"
    path.write_text("not a store")
    with pytest.raises(StoreFormatError):
        LogitStore.open(path, mode="r+", require_complete=False)
    assert path.read_text() == "not a store"


# ---- value encodings ------------------------------------------------------------------------


def _bf16_bits_torch(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(max_dims=2, max_side=16),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    )
)
def test_bfloat16_encoding_rounds_to_nearest_and_decodes_exactly(x: np.ndarray) -> None:
    bits = encode_values(x, "bfloat16")
    assert bits.dtype == np.uint16 and bits.shape == x.shape
    # Bit for bit what torch's bfloat16 cast gives (round to nearest, ties to even).
    np.testing.assert_array_equal(bits, _bf16_bits_torch(x))
    y = decode_values(bits, "bfloat16")
    assert y.dtype == np.float32
    # Within half a bfloat16 ulp (8 significand bits) of the input, where it did not overflow.
    finite = np.isfinite(y)
    err = np.abs(y[finite].astype(np.float64) - x[finite].astype(np.float64))
    half_ulp = np.ldexp(1.0, np.frexp(np.abs(x[finite]).astype(np.float64))[1] - 9)
    tiny = np.ldexp(1.0, -134)  # half the spacing of bfloat16 subnormals (2**-133)
    assert np.all(err <= np.maximum(half_ulp, tiny))
    # Decoding is exact: re-encoding gives back the same bits.
    np.testing.assert_array_equal(encode_values(y, "bfloat16"), bits)


def test_bfloat16_decode_is_exact_for_every_bit_pattern() -> None:
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    values = decode_values(bits, "bfloat16")
    expected = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(values.view(np.uint32), expected.view(np.uint32))
    finite = np.isfinite(values)
    np.testing.assert_array_equal(encode_values(values[finite], "bfloat16"), bits[finite])


def test_bfloat16_encoding_keeps_nan_a_nan() -> None:
    x = np.array([0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF], dtype=np.uint32).view(np.float32)
    assert np.isnan(decode_values(encode_values(x, "bfloat16"), "bfloat16")).all()


@pytest.mark.parametrize(
    ("value_dtype", "dtype"),
    [("float16", np.float16), ("float32", np.float32), ("bfloat16", np.uint16)],
)
def test_storage_dtypes(value_dtype: str, dtype: type) -> None:
    assert storage_dtype(value_dtype) == np.dtype(dtype)
    x = np.array([[1.5, -2.25, 0.0]], dtype=np.float32)
    stored = encode_values(x, value_dtype)
    assert stored.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(decode_values(stored, value_dtype), x)  # exact in all three


@pytest.mark.parametrize(
    ("num_classes", "dtype"),
    [(10, np.uint16), (65535, np.uint16), (65536, np.uint16), (65537, np.int32)],
)
def test_index_dtype_boundary(num_classes: int, dtype: type) -> None:
    assert _topk_meta(num_classes=num_classes).index_dtype == np.dtype(dtype)


def test_wide_store_gets_int32_indices(tmp_path: Path) -> None:
    store = LogitStore.create(tmp_path / "s.zarr", _topk_meta(num_classes=70_000))
    assert store.array(TOPK_INDICES).dtype == np.int32


def test_errors_are_softcache_errors() -> None:
    assert issubclass(StoreFormatError, SoftcacheError)
    assert issubclass(IncompleteStoreError, SoftcacheError)
