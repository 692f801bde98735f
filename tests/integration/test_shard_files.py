"""The shard-file reader (`softcache.store.shard_files`) reads what zarr-python reads, bit for bit,
for every store kind and row range, refuses damaged shard files by name, and hands reads it does
not decode back to zarr; the stream's read groups reuse their buffers only when nothing holds them."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st
from numcodecs import Zstd

from softcache.errors import CorruptChunkError
from softcache.runtime.threads import reading_threads
from softcache.store import LOGITS, TOPK_VALUES, LogitStore, decode_values
from softcache.store.shard_files import (
    _MISSING,
    ShardDecodeError,
    ShardFileReader,
    chunk_frames,
    default_threads,
    shard_layout,
    zstd_content_size,
)
from softcache.trainer.plan import EpochPlan
from softcache.trainer.row_labels import _GroupBuffers
from softcache.trainer.stream import SoftLabelStream
from tests.conftest import spec
from tests.helpers import build_row_stores, build_token_store

# Shards of 64 rows in chunks of 16: row ranges can start and stop inside chunks and shards.
KINDS = {
    "dense-fp16": {"chunk_rows": 16},
    "dense-bf16": {"dtype": "bfloat16", "chunk_rows": 16},
    "topk-fp32": {"encoding": "topk", "top_k": 5, "dtype": "float32", "chunk_rows": 16},
    "views": {
        "teacher": spec("conv_teacher"),
        "views": 4,
        "augment": "crop(size=8,scale=0.4:1);flip",
        "chunk_rows": 16,
    },
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("shard-files")
    out = build_row_stores(base, KINDS)
    out["tokens-topk"] = build_token_store(
        base / "tokens.zarr", "--encoding", "topk", "--top-k", "8", "--value-bits", "7",
        "--chunk-rows", "4",
    )  # fmt: skip
    return out


def _readers(path: Path, threads: int | None = None) -> tuple[LogitStore, LogitStore]:
    """The store read from its shard files (on `threads` decoding threads, None: the default),
    and read by zarr-python alone."""
    with reading_threads(threads) as count:
        direct = LogitStore.open(str(path))
    assert direct.read_threads == count, "a local store must be read from its shard files"
    return direct, LogitStore.open(str(path), fast_reads=False)


def _ranges(store: LogitStore) -> list[slice]:
    """Row ranges that start and stop inside chunks, on chunk and shard edges, across shards."""
    n, chunk, shard = store.meta.num_rows, store.meta.chunk_rows, store.meta.shard_rows
    return [
        slice(None),
        slice(0, 0),
        slice(0, 1),
        slice(chunk, 2 * chunk),
        slice(1, chunk + 3),
        slice(shard - 2, shard + chunk + 1),
        slice(shard, min(2 * shard, n)),
        slice(max(n - 5, 0), n),
        slice(max(n - 5, 0), n + 10),  # past the end: clipped, as numpy and zarr clip
        slice(-7, None),
    ]


def _same_bits(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, a.shape, b.dtype, b.shape)
    bits = np.dtype(f"u{a.dtype.itemsize}")
    assert np.array_equal(a.view(bits), b.view(bits)), f"{what} differs"


@pytest.mark.parametrize("kind", [*KINDS, "tokens-topk"])
@pytest.mark.parametrize("threads", [None, 1])  # 1: a training run's batch process here
def test_every_sharded_array_reads_as_zarr_python_reads_it(
    stores: dict[str, Path], kind: str, threads: int | None
) -> None:
    direct, plain = _readers(stores[kind], threads)
    assert direct.meta.shard_rows // direct.meta.chunk_rows == 4
    for name in direct.row_array_names:
        assert shard_layout(direct.array(name)) is not None, f"{kind}: {name} is not read directly"
        for rows in _ranges(direct):
            _same_bits(direct.read(name, rows), plain.read(name, rows), f"{kind} {name} {rows}")
    # Everything at once, into the caller's buffers, in one concurrent read.
    requests = [(n, r) for n in direct.row_array_names for r in _ranges(direct)]
    want = plain.read_many(requests)
    out = [np.full_like(w, 7) for w in want]
    got = direct.read_many(requests, out=out)
    for g, o, w, (n, r) in zip(got, out, want, requests, strict=True):
        assert g is o
        _same_bits(g, w, f"{kind} {n} {r} (read_many)")


def _picked(plain: LogitStore, name: str, ranges: list, positions: np.ndarray) -> np.ndarray:
    """What `read_gather` must give: zarr-python's rows of the ranges, then `take`."""
    rows = [plain.read(name, slice(r0, r1)) for r0, r1 in ranges]
    return np.concatenate(rows)[positions]


def _gather(store: LogitStore, ranges: list, positions: np.ndarray, widen: bool = False) -> list:
    """Every row array's picked rows by `store.read_gather` (values widened to float32 with
    `decode_values` where `widen`), into buffers that start out full of sevens."""
    layout = store.row_layout()
    names = store.row_array_names
    values = {n for n in names if n in (LOGITS, TOPK_VALUES)} if widen else set()
    out = [
        np.full((len(positions), *layout[n][0]), 7, np.float32 if n in values else layout[n][1])
        for n in names
    ]
    convert = [
        partial(decode_values, value_dtype=store.meta.value_dtype) if n in values else None
        for n in names
    ]
    store.read_gather([(n, ranges, positions) for n in names], out, convert)
    return out


@pytest.mark.parametrize("kind", [*KINDS, "tokens-topk"])
@pytest.mark.parametrize("threads", [None, 1])
def test_rows_picked_out_of_ranges_read_as_zarr_python_reads_them(
    stores: dict[str, Path], kind: str, threads: int | None
) -> None:
    # The stream's reads: a window's rows in the order the plan consumes them, each chunk
    # scattered to its places (from the shard files) or read then taken (through zarr).
    direct, plain = _readers(stores[kind], threads)
    n, chunk, shard = direct.meta.num_rows, direct.meta.chunk_rows, direct.meta.shard_rows
    ranges = [(shard - 2, min(shard + chunk + 1, n)), (0, chunk), (max(n - 5, 0), n), (3, 3)]
    total = sum(r1 - r0 for r0, r1 in ranges)
    rng = np.random.default_rng(0)
    orders = {
        "shuffled": rng.permutation(total),
        "repeats": rng.integers(0, total, 40),
        "in order": np.arange(total),
        "none": np.zeros(0, dtype=np.int64),
    }
    for what, positions in orders.items():
        for widen in (False, True):
            got = _gather(direct, ranges, positions, widen)
            through_zarr = _gather(plain, ranges, positions, widen)
            for name, g, z in zip(direct.row_array_names, got, through_zarr, strict=True):
                want = _picked(plain, name, ranges, positions)
                if g.dtype == np.float32 and want.dtype != np.float32:
                    want = decode_values(want, direct.meta.value_dtype)
                _same_bits(g, want, f"{kind} {name} {what} widen={widen}")
                _same_bits(z, want, f"{kind} {name} {what} widen={widen}, through zarr")


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_rows_picked_out_of_any_ranges_read_as_zarr_python_reads_them(
    stores: dict[str, Path], data: st.DataObject
) -> None:
    direct, plain = _readers(stores["dense-bf16"])
    n = direct.meta.num_rows
    bounds = st.tuples(st.integers(0, n), st.integers(0, n)).map(lambda r: (min(r), max(r)))
    ranges = data.draw(st.lists(bounds, min_size=1, max_size=4))
    total = sum(r1 - r0 for r0, r1 in ranges)
    positions = np.array(
        data.draw(st.lists(st.integers(0, max(total - 1, 0)), max_size=80 if total else 0)),
        dtype=np.int64,
    )
    for name, got in zip(direct.row_array_names, _gather(direct, ranges, positions), strict=True):
        _same_bits(got, _picked(plain, name, ranges, positions), f"{name} {ranges}")


def test_picked_rows_are_refused_when_asked_for_outside_the_array(
    stores: dict[str, Path],
) -> None:
    direct, plain = _readers(stores["dense-fp16"])
    n = direct.meta.num_rows
    out = [np.empty((2, direct.meta.num_classes), np.float16)]
    for store in (direct, plain):
        with pytest.raises(ValueError, match="not a range inside"):
            store.read_gather([(LOGITS, [(0, n + 1)], np.array([0, 1]))], out)
        with pytest.raises(ValueError, match=r"positions must be in \[0, 4\)"):
            store.read_gather([(LOGITS, [(0, 4)], np.array([0, 4]))], out)
        with pytest.raises(ValueError, match="shape"):
            store.read_gather([(LOGITS, [(0, 4)], np.array([0]))], out)


def test_a_token_stores_per_sample_arrays_are_left_to_zarr(stores: dict[str, Path]) -> None:
    direct, plain = _readers(stores["tokens-topk"])
    for name in direct.sample_array_names:
        assert shard_layout(direct.array(name)) is None  # regular chunks, not shards
        _same_bits(direct.read(name), plain.read(name), name)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_row_range_reads_as_zarr_python_reads_it(
    stores: dict[str, Path], data: st.DataObject
) -> None:
    direct, plain = _readers(stores["topk-fp32"])
    n = direct.meta.num_rows
    start = data.draw(st.integers(0, n))
    stop = data.draw(st.integers(start, n))
    for name in direct.row_array_names:
        rows = slice(start, stop)
        _same_bits(direct.read(name, rows), plain.read(name, rows), f"{name} {rows}")


def test_the_read_never_goes_through_zarr(
    stores: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    direct, plain = _readers(stores["dense-fp16"])

    def refuse(*args, **kwargs):
        raise AssertionError("read through zarr's codec pipeline")

    monkeypatch.setattr(LogitStore, "_read_zarr_many", refuse)
    _same_bits(direct.read_many([(LOGITS, slice(None))])[0], plain.read(LOGITS), LOGITS)
    positions = np.arange(direct.meta.num_rows)[::-1].copy()
    _same_bits(
        _gather(direct, [(0, direct.meta.num_rows)], positions)[0],
        plain.read(LOGITS)[positions],
        "gather",
    )
    monkeypatch.setenv("SOFTCACHE_DIRECT_READS", "0")
    with pytest.raises(AssertionError, match="codec pipeline"):
        direct.read_many([(LOGITS, slice(None))])
    with pytest.raises(AssertionError, match="codec pipeline"):
        _gather(direct, [(0, 4)], np.arange(4))


def test_a_store_a_build_may_still_write_is_read_by_zarr(
    stores: dict[str, Path], tmp_path: Path
) -> None:
    path = Path(shutil.copytree(stores["dense-fp16"], tmp_path / "partial.zarr"))
    group = json.loads((path / "zarr.json").read_text())
    group["attributes"]["softcache"]["complete"] = False
    (path / "zarr.json").write_text(json.dumps(group))
    partial = LogitStore.open(str(path), require_complete=False)
    assert partial._files is None
    assert LogitStore.open(str(path), mode="r+", require_complete=False)._files is None
    _same_bits(partial.read(LOGITS), _readers(stores["dense-fp16"])[1].read(LOGITS), "partial")


def test_zip_and_pinned_stores_are_read_by_zarr(stores: dict[str, Path], tmp_path: Path) -> None:
    archive = shutil.make_archive(str(tmp_path / "dense"), "zip", stores["dense-fp16"])
    zipped = LogitStore.open(archive)
    assert zipped._files is None
    direct, plain = _readers(stores["dense-fp16"])
    _same_bits(zipped.read(LOGITS), plain.read(LOGITS), "zip")
    pinned = LogitStore.open(str(stores["dense-fp16"]), expect_digest=direct.digest)
    assert pinned._files is None  # its reads go through the digest-checking store


# ---- damaged shard files --------------------------------------------------------------------------


def _copy(stores: dict[str, Path], tmp_path: Path) -> tuple[Path, Path, int]:
    """A copy of the dense store, the file of its logits' shard 1, and chunks per shard."""
    path = Path(shutil.copytree(stores["dense-fp16"], tmp_path / "copy.zarr"))
    store = LogitStore.open(str(path))
    layout = shard_layout(store.array(LOGITS))
    assert layout is not None
    return path, path / store.shard_object_key(LOGITS, 1), layout.chunks_per_shard


def _chunks(data: bytes, per: int) -> list[bytes | None]:
    """Each chunk's bytes (zstd frame + crc32c) of a shard file; None where missing."""
    index = np.frombuffer(data[-16 * per - 4 : -4], dtype="<u8").reshape(per, 2)
    return [None if o == _MISSING else data[int(o) : int(o + n)] for o, n in index]


def _shard_file(chunks: list[bytes | None]) -> bytes:
    """A shard file of `chunks`, with a valid index and index checksum."""
    body, index = b"", []
    for chunk in chunks:
        index += [_MISSING, _MISSING] if chunk is None else [len(body), len(chunk)]
        body += chunk or b""
    raw = np.array(index, dtype="<u8").tobytes()
    return body + raw + struct.pack("<I", crc32c(raw))


def _flip_a_bit_in_chunk_0(shard: Path, per: int) -> None:
    """Flip one bit in the middle of the shard file's first chunk (its checksum left stale)."""
    data = bytearray(shard.read_bytes())
    data[len(_chunks(bytes(data), per)[0] or b"") // 2] ^= 0x10
    shard.write_bytes(bytes(data))


def _with_crc(frame: bytes) -> bytes:
    return frame + struct.pack("<I", crc32c(frame))


def _read_fails(path: Path, *words: str) -> None:
    store = LogitStore.open(str(path))
    with pytest.raises(CorruptChunkError) as info:
        store.read(LOGITS)
    with pytest.raises(CorruptChunkError):
        store.read_many([(LOGITS, slice(None))])
    n = store.meta.num_rows
    with pytest.raises(CorruptChunkError) as picked:
        store.read_gather(
            [(LOGITS, [(0, n)], np.arange(n)[::-1].copy())],
            [np.empty((n, store.meta.num_classes), np.float16)],
        )
    for word in ("logits/c/1/0", "softcache verify", *words):
        assert word in str(info.value), (word, str(info.value))
        assert word in str(picked.value), (word, str(picked.value))


def test_chunk_frames_are_the_files_frames_and_decode_to_the_rows(
    stores: dict[str, Path], tmp_path: Path
) -> None:
    path, shard, per = _copy(stores, tmp_path)
    store = LogitStore.open(str(path))
    layout = shard_layout(store.array(LOGITS))
    assert layout is not None
    frames = chunk_frames(path, layout, 1)
    assert frames == [c[:-4] for c in _chunks(shard.read_bytes(), per) if c is not None]
    decoded = np.frombuffer(b"".join(Zstd().decode(f) for f in frames), dtype=layout.dtype)
    rows = store.meta.shard_rows
    want = LogitStore.open(str(path), fast_reads=False).read(LOGITS, slice(rows, 2 * rows))
    _same_bits(decoded.reshape(want.shape), want, "frames")
    shard.unlink()
    assert chunk_frames(path, layout, 1) == []
    shard.write_bytes(b"\x00" * 7)
    with pytest.raises(ShardDecodeError, match="shorter than its index"):
        chunk_frames(path, layout, 1)


def test_a_flipped_bit_in_a_chunk_is_refused(stores: dict[str, Path], tmp_path: Path) -> None:
    path, shard, per = _copy(stores, tmp_path)
    _flip_a_bit_in_chunk_0(shard, per)
    _read_fails(path, "chunk 0", "fails its checksum")


def test_a_damaged_chunk_no_picked_row_is_in_is_not_decoded(
    stores: dict[str, Path], tmp_path: Path
) -> None:
    path, shard, per = _copy(stores, tmp_path)
    _flip_a_bit_in_chunk_0(shard, per)  # shard 1, chunk 0
    store, plain = LogitStore.open(str(path)), LogitStore.open(str(path), fast_reads=False)
    rows, chunk = store.meta.shard_rows, store.meta.chunk_rows
    ranges = [(0, 2 * rows)]
    around = np.r_[0:rows, rows + chunk : 2 * rows]  # every row but the damaged chunk's
    got = _gather(store, ranges, around[::-1].copy())[0]
    want = np.concatenate(
        [plain.read(LOGITS, slice(0, rows)), plain.read(LOGITS, slice(rows + chunk, 2 * rows))]
    )
    _same_bits(got, want[::-1], "around the damaged chunk")
    with pytest.raises(CorruptChunkError, match="chunk 0"):
        _gather(store, ranges, np.array([5, rows + chunk - 1]))


def test_a_truncated_shard_file_is_refused(stores: dict[str, Path], tmp_path: Path) -> None:
    path, shard, _ = _copy(stores, tmp_path)
    shard.write_bytes(shard.read_bytes()[:-100])
    _read_fails(path, "index fails its checksum")
    shard.write_bytes(b"\x00" * 7)
    _read_fails(path, "shorter than its index")


def test_an_index_pointing_outside_the_file_is_refused(
    stores: dict[str, Path], tmp_path: Path
) -> None:
    path, shard, per = _copy(stores, tmp_path)
    data = shard.read_bytes()
    index = np.frombuffer(data[-16 * per - 4 : -4], dtype="<u8").reshape(per, 2).copy()
    index[per - 1, 1] = len(data) * 4  # its checksum recomputed: only the bounds catch it
    raw = index.tobytes()
    shard.write_bytes(data[: -16 * per - 4] + raw + struct.pack("<I", crc32c(raw)))
    _read_fails(path, f"chunk {per - 1}", "outside the file")


def test_a_frame_of_another_size_is_refused_before_it_is_decoded(
    stores: dict[str, Path], tmp_path: Path
) -> None:
    # A valid frame with a valid checksum, of a size the chunk is not: never decoded into the
    # output (it would leave rows unwritten) or into a buffer of the frame's own claimed size.
    path, shard, per = _copy(stores, tmp_path)
    chunks = _chunks(shard.read_bytes(), per)
    chunks[1] = _with_crc(Zstd().encode(b"\x01" * 100))
    shard.write_bytes(_shard_file(chunks))
    _read_fails(path, "chunk 1", "holds 100 bytes")


def test_a_frame_zstd_cannot_decode_is_refused(stores: dict[str, Path], tmp_path: Path) -> None:
    path, shard, per = _copy(stores, tmp_path)
    chunks = _chunks(shard.read_bytes(), per)
    frame = (chunks[0] or b"")[:-4]
    chunks[0] = _with_crc(frame[:-20])  # a checksum over a truncated frame: zstd must refuse it
    shard.write_bytes(_shard_file(chunks))
    _read_fails(path, "chunk 0", "zstd cannot decode it")


def test_missing_chunks_and_shards_read_as_zarr_reads_them(
    stores: dict[str, Path], tmp_path: Path
) -> None:
    path, shard, per = _copy(stores, tmp_path)
    chunks: list[bytes | None] = list(_chunks(shard.read_bytes(), per))
    chunks[0] = None
    shard.write_bytes(_shard_file(chunks))
    store = LogitStore.open(str(path))
    shutil.rmtree(path / "logits" / "c" / "0")  # shard 0's file and its directory
    direct, plain = store, LogitStore.open(str(path), fast_reads=False)
    got = direct.read(LOGITS)
    _same_bits(got, plain.read(LOGITS), "fill values")
    rows = direct.meta.shard_rows
    assert not got[: rows + direct.meta.chunk_rows].any()  # shard 0 and chunk 0 of shard 1
    assert got[rows + direct.meta.chunk_rows :].any()


def test_the_decoding_threads_are_shared_among_a_machines_ranks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cpus = default_threads()
    assert cpus >= 1 and ShardFileReader(tmp_path).threads == cpus
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_threads() == max(1, cpus // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cpus * 4))
    assert default_threads() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "not a number")
    assert default_threads() == cpus
    assert ShardFileReader(tmp_path, threads=3).threads == 3
    monkeypatch.setenv("SOFTCACHE_READ_THREADS", "5")  # the user's number, ranks or not
    assert default_threads() == 5 and ShardFileReader(tmp_path).threads == 5
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("SOFTCACHE_READ_THREADS", bad)
        with pytest.raises(ValueError, match="SOFTCACHE_READ_THREADS"):
            default_threads()


def test_the_frame_header_parser_reads_every_size_field() -> None:
    zstd = Zstd()
    for size in (1, 255, 256, 300, 65_791, 65_792, 1 << 20):
        frame = memoryview(zstd.encode(b"\x05" * size))
        assert zstd_content_size(frame) == size
    assert zstd_content_size(memoryview(b"not a zstd frame")) is None
    # A frame that states no size (content-size flag 0, not single-segment): one window byte.
    assert zstd_content_size(memoryview(b"\x28\xb5\x2f\xfd\x00\x58" + b"\x00" * 8)) is None


# ---- the stream's read groups ---------------------------------------------------------------------


def test_a_read_group_is_reused_only_once_nothing_refers_to_it() -> None:
    layout = {"a": ((4,), np.dtype(np.float16)), "b": ((), np.dtype(np.uint64))}
    pool = _GroupBuffers(layout)
    group = pool.get(10)
    assert group["a"].shape == (10, 4) and group["b"].dtype == np.uint64
    ident = id(group["a"])
    assert id(pool.get(10)["a"]) != ident  # the stream's dict of it is alive
    batch = group["a"][2:4]  # a batch sliced from it
    del group
    assert id(pool.get(10)["a"]) != ident  # a view of its buffer is in use
    tensor = torch.from_numpy(batch)
    del batch
    assert id(pool.get(10)["a"]) != ident  # a tensor over that view is
    del tensor
    assert id(pool.get(10)["a"]) == ident  # free again
    assert id(pool.get(11)["a"]) != ident  # another size


@pytest.mark.parametrize("kind", ["dense-fp16", "views"])
def test_epochs_over_reused_groups_deliver_what_zarr_reads(
    stores: dict[str, Path], kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three epochs over one stream (its groups' buffers reused) and three over a stream that
    # reads with zarr-python into fresh buffers deliver the same batches.
    def epochs(direct: bool) -> list:
        monkeypatch.setenv("SOFTCACHE_DIRECT_READS", "1" if direct else "0")
        store = LogitStore.open(str(stores[kind]))
        meta = store.meta
        plan = EpochPlan(
            num_samples=meta.num_samples, block_rows=meta.shard_samples, batch_size=16,
            window_blocks=2,
        )  # fmt: skip
        stream = SoftLabelStream(store, prefetch_blocks=2, assemble_ahead=0)
        out = []
        for epoch in range(3):
            plan.set_epoch(epoch)
            # Each batch copied and dropped before the next, as a training loop does: the
            # groups' buffers are handed out again epoch after epoch.
            out += [_copied(soft) for soft in stream.batches(plan)]
        return out

    fast, plain = epochs(True), epochs(False)
    assert len(fast) == len(plain) > 3
    for a, b in zip(fast, plain, strict=True):
        assert np.array_equal(a.indices, b.indices) and np.array_equal(a.sample_hash, b.sample_hash)
        for name in ("logits", "topk_values", "topk_indices", "view_params"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or np.array_equal(np.asarray(x), np.asarray(y)), name


def _copied(soft: Any) -> Any:
    """A batch of soft labels with its arrays copied out of the stream's buffers."""
    return dataclasses.replace(
        soft,
        **{
            f.name: getattr(soft, f.name).clone()
            if isinstance(getattr(soft, f.name), torch.Tensor)
            else np.copy(getattr(soft, f.name))
            for f in dataclasses.fields(soft)
            if getattr(soft, f.name) is not None
        },
    )


def test_chunks_larger_than_a_kept_buffer_read_the_same(
    stores: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A thread keeps its chunk buffers between reads only up to `_SCRATCH_KEEP`; a larger chunk
    # is decoded into a fresh buffer and reads the same.
    from softcache.store import shard_files

    monkeypatch.setattr(shard_files, "_SCRATCH_KEEP", 64)
    direct, plain = _readers(stores["dense-bf16"])
    n = direct.meta.num_rows
    positions = np.random.default_rng(1).permutation(n - 3)
    for widen in (False, True):
        got = _gather(direct, [(3, n)], positions, widen)[0]
        want = _picked(plain, LOGITS, [(3, n)], positions)
        _same_bits(got, decode_values(want, "bfloat16") if widen else want, f"widen={widen}")
    _same_bits(direct.read(LOGITS, slice(3, n - 2)), plain.read(LOGITS, slice(3, n - 2)), "edges")
