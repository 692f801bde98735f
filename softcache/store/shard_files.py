"""Reading a local store's sharded arrays straight from their shard files, on every core.

Why: zarr's codec pipelines (zarrs and zarr-python alike) decode each chunk into a buffer of their
own and copy it into the array they return; on this machine the fresh memory costs as much as the
decode itself (page faults), and a stream's shard reads took 1.2-1.5x the zstd decode of the same
frames on all cores. This reader decodes each chunk's zstd frame straight into the output array
(chunks wholly inside a request; edge chunks go through one chunk-sized buffer), one thread-pool
task per chunk over every core (zstd and crc32c release the GIL), from the files mapped into
memory (no copy of the compressed bytes first). The store stays plain
Zarr v3: this is one more reader of it, and the tests hold it to zarr-python's bytes.

It reads only what softcache writes (docs/FORMAT.md): a sharded array whose shard index sits at
the end of each shard file (bytes + crc32c), whose inner chunks are bytes (little endian) + zstd +
crc32c, and whose chunks and shards hold whole rows; in a store that is a directory on this
machine. Anything else (another layout, a zip archive, object storage, a store pinned to a digest,
a zstd frame that does not state its size) is read by zarr's codec pipeline, as is everything
with `SOFTCACHE_DIRECT_READS=0`.

A store is untrusted input. Before a chunk is decoded, its shard's index must pass its crc32c and
point inside the file, the chunk must pass its own crc32c, and its zstd frame must declare exactly
the chunk's size; every buffer is sized from the array's validated metadata, never from what a
file claims. A failure raises `ShardDecodeError` naming the shard file and the chunk. A missing
shard file or chunk reads as the fill value, as zarr reads it (`softcache verify` reports it).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from crc32c import crc32c
from numcodecs import Zstd
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.metadata import ArrayV3Metadata

from softcache.runtime.threads import read_threads

# A shard index entry (offset, nbytes) of a chunk never written.
_MISSING = 2**64 - 1
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CRC_BYTES = 4
_ENV = "SOFTCACHE_DIRECT_READS"


class ShardDecodeError(RuntimeError):
    """A shard file is corrupt: its index or a chunk failed a check, or zstd could not decode it."""


class UnsupportedChunk(Exception):
    """A chunk this reader does not decode (a zstd frame without its size): read it with zarr."""


def direct_reads_enabled() -> bool:
    """Whether reads may use this reader (`SOFTCACHE_DIRECT_READS=0` switches it off)."""
    return os.environ.get(_ENV, "1") != "0"


@dataclass(frozen=True)
class ShardLayout:
    """How one sharded array lies in its files.

    Attributes:
        shape: the array's shape; rows along axis 0.
        dtype: the array's (little-endian) numpy dtype.
        shard_rows: rows per shard file.
        chunk_rows: rows per inner chunk.
        fill_value: what a missing chunk reads as.
        path: the array's directory, relative to the store's root.
        key: the shard file of shard `s`, relative to `path`.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    shard_rows: int
    chunk_rows: int
    fill_value: Any
    path: str
    key: Callable[[int], str]

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * math.prod(self.shape[1:]) * self.dtype.itemsize

    @property
    def index_bytes(self) -> int:
        """The shard index: (offset, nbytes) uint64 per chunk, then its crc32c."""
        return 16 * self.chunks_per_shard + _CRC_BYTES


def shard_layout(arr: zarr.Array) -> ShardLayout | None:
    """`arr`'s layout if this reader decodes it (see the module docstring), else None."""
    codecs = arr.metadata.codecs if isinstance(arr.metadata, ArrayV3Metadata) else ()
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding = codecs[0]
    inner = [type(c) for c in sharding.codecs]
    index = [type(c) for c in sharding.index_codecs]
    if inner != [BytesCodec, ZstdCodec, Crc32cCodec] or index != [BytesCodec, Crc32cCodec]:
        return None
    if sharding.index_location != ShardingCodecIndexLocation.end:
        return None
    dtype = np.dtype(arr.dtype)
    if dtype.kind not in "biuf" or sys.byteorder != "little":
        return None
    for codec in (sharding.codecs[0], sharding.index_codecs[0]):
        endian = getattr(codec, "endian", None)
        if endian is not None and endian.value != "little" and dtype.itemsize > 1:
            return None
    shape, shards, chunks = tuple(arr.shape), arr.shards, tuple(sharding.chunk_shape)
    if shards is None or not shape or shards[1:] != shape[1:] or chunks[1:] != shape[1:]:
        return None
    if chunks[0] < 1 or shards[0] % chunks[0]:
        return None
    encode = arr.metadata.encode_chunk_key
    tail = (0,) * (len(shape) - 1)
    return ShardLayout(
        shape=shape,
        dtype=dtype,
        shard_rows=int(shards[0]),
        chunk_rows=int(chunks[0]),
        fill_value=arr.fill_value,
        path=arr.path,
        key=lambda shard: encode((shard, *tail)),
    )


def chunk_frames(root: Path, layout: ShardLayout, shard: int) -> list[bytes]:
    """The zstd frames of one shard file's written chunks, in chunk order, without their crc32c.

    The shard's index is checked as for a read (`ShardDecodeError` where it fails); the frames
    are not decoded. An empty list for a missing file.
    """
    shard_file = _ShardFile.open(root, layout, shard, f"{layout.path} shard {shard}")
    if shard_file is None:
        return []
    try:
        return [
            shard_file.data[offset : offset + nbytes - _CRC_BYTES]
            for offset, nbytes in shard_file.index.tolist()
            if offset != _MISSING
        ]
    finally:
        shard_file.close()


def zstd_content_size(frame: memoryview) -> int | None:
    """The decompressed size a zstd frame's header declares, None where it declares none.

    Reads the frame header (RFC 8878, 3.1.1): magic, descriptor, then the optional window
    descriptor and dictionary id, then the frame content size field.
    """
    if len(frame) < 6 or bytes(frame[:4]) != _ZSTD_MAGIC:
        return None
    descriptor = frame[4]
    single_segment = (descriptor >> 5) & 1
    size_flag = descriptor >> 6
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3]
    width = (single_segment, 2, 4, 8)[size_flag]
    if width == 0 or len(frame) < pos + width:
        return None
    size = int.from_bytes(frame[pos : pos + width], "little")
    return size + 256 if width == 2 else size


class ShardFileReader:
    """Row ranges of sharded arrays of the store at `root`, decoded into the arrays returned.

    Args:
        root: the store's directory.
        threads: decoding threads (default: `default_threads()` when the reader is made: the
            CPUs this process may run on, shared out among the processes `torchrun` started on
            this machine, unless the user or a training run chose otherwise).
    """

    def __init__(self, root: Path, threads: int | None = None) -> None:
        self.root = root
        self.threads = threads or default_threads()
        self._zstd = Zstd()

    def read_many(
        self,
        requests: Sequence[tuple[ShardLayout, slice]],
        out: Sequence[np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """Each request's rows, as `zarr.Array[rows]` would return them.

        Args:
            requests: `(layout, rows)` pairs; `rows` a slice with step 1 (None bounds allowed).
            out: an array per request to decode into (C-contiguous, of the result's shape and
                dtype); None allocates them.

        Returns:
            One C-contiguous array per request, of its layout's dtype, shape `(rows, *shape[1:])`.

        Raises:
            ShardDecodeError: a shard's index or a chunk is corrupt.
            UnsupportedChunk: a chunk this reader does not decode (read the request with zarr).
            ValueError: a slice with a step other than 1.
        """
        outs: list[np.ndarray] = []
        tasks: list[Callable[[], None]] = []
        files: dict[tuple[str, int], _ShardFile | None] = {}
        try:
            for i, (layout, rows) in enumerate(requests):
                start, stop, step = rows.indices(layout.shape[0])
                if step != 1:
                    raise ValueError(f"rows must be a slice with step 1, got {rows}")
                shape = (max(stop - start, 0), *layout.shape[1:])
                if out is None:
                    dest = np.empty(shape, layout.dtype)
                else:
                    dest = out[i]
                    if dest.shape != shape or dest.dtype != layout.dtype:
                        raise ValueError(
                            f"out[{i}] is {dest.dtype} {dest.shape}, the rows {layout.dtype} {shape}"
                        )
                    if not dest.flags.c_contiguous:
                        raise ValueError(f"out[{i}] is not C-contiguous")
                outs.append(dest)
                first, last = start // layout.chunk_rows, -(-stop // layout.chunk_rows)
                what = f"{layout.path} rows {start}..{stop}"
                for chunk in range(first, last if stop > start else first):
                    source = self._chunk(files, layout, chunk, what)
                    tasks.append(_ChunkTask(source, chunk * layout.chunk_rows, start, stop, dest))
            self._run(tasks)
        finally:
            _close(files)
        return outs

    def read_gather(
        self,
        requests: Sequence[tuple[ShardLayout, Sequence[tuple[int, int]], np.ndarray]],
        out: Sequence[np.ndarray],
        convert: Sequence[Callable[..., np.ndarray] | None] | None = None,
    ) -> None:
        """Rows picked out of row ranges, each decoded chunk scattered straight to its places.

        For request `i = (layout, ranges, positions)`: ``out[i][j] = rows[positions[j]]`` where
        ``rows`` is the concatenation of the array's `ranges`; as `take` after `read_many`, but
        each chunk is decoded into a buffer of this thread's (in cache) and its picked rows go
        straight to their places in `out[i]`: the rows are written once, where a read then a
        gather writes them twice and reads them once more. Chunks with no picked row are not
        decoded.

        Args:
            requests: `(layout, ranges, positions)`: `ranges` `[start, stop)` row ranges inside
                the array; `positions` (P,) integer rows of their concatenation, any order,
                repeats allowed.
            out: an array per request of shape `(P, *layout.shape[1:])`, any dtype the rows
                cast to (numpy's assignment casting), written at every row.
            convert: per request, `convert(rows, out=array)` writing the picked rows, converted,
                into `array` (of `out[i]`'s dtype and the rows' shape) and returning it (e.g.
                `decode_values`: bfloat16 bits or float16 -> float32); or None.

        Raises:
            ShardDecodeError: a shard's index or a chunk is corrupt.
            UnsupportedChunk: a chunk this reader does not decode (read the request with zarr).
            ValueError: a range outside the array, a position outside the ranges, or an `out`
                array of another shape.
        """
        tasks: list[Callable[[], None]] = []
        files: dict[tuple[str, int], _ShardFile | None] = {}
        try:
            for i, (layout, ranges, positions) in enumerate(requests):
                dest = out[i]
                fn = None if convert is None else convert[i]
                picks = checked_picks(layout.path, layout.shape, ranges, positions, dest, i)
                order = np.argsort(picks, kind="stable")
                picks = picks[order]
                distinct = picks.size < 2 or bool((picks[1:] != picks[:-1]).all())
                base = 0
                for r0, r1 in ranges:
                    what = f"{layout.path} rows {r0}..{r1}"
                    for chunk in range(r0 // layout.chunk_rows, -(-r1 // layout.chunk_rows)):
                        c0 = chunk * layout.chunk_rows
                        lo, hi = max(c0, r0), min(c0 + layout.chunk_rows, r1)
                        # The picked rows inside this chunk: a run of the sorted positions.
                        a, z = np.searchsorted(picks, (base + lo - r0, base + hi - r0))
                        if a == z:
                            continue
                        source = self._chunk(files, layout, chunk, what)
                        whole = distinct and z - a == layout.chunk_rows
                        tasks.append(
                            _GatherTask(
                                source, None if whole else picks[a:z] - (base - r0 + c0),
                                order[a:z], dest, fn,
                            )
                        )  # fmt: skip
                    base += r1 - r0
            self._run(tasks)
        finally:
            _close(files)

    def _chunk(
        self,
        files: dict[tuple[str, int], _ShardFile | None],
        layout: ShardLayout,
        chunk: int,
        what: str,
    ) -> _Chunk:
        """Chunk `chunk` of an array; its shard file is opened (and its index checked) once per
        read, in `files`. `what` (the array and rows read) begins its errors' messages."""
        shard, inner = divmod(chunk, layout.chunks_per_shard)
        if (layout.path, shard) not in files:
            files[layout.path, shard] = _ShardFile.open(self.root, layout, shard, what)
        return _Chunk(self._zstd, layout, files[layout.path, shard], inner, what)

    def _run(self, tasks: list[Callable[[], None]]) -> None:
        if len(tasks) <= 1 or self.threads == 1:
            for task in tasks:
                task()
            return
        pool = _executor(self.threads)
        futures: list[Future[None]] = [pool.submit(task) for task in tasks]
        error: BaseException | None = None
        for future in futures:  # wait for every task: none may write into an array after return
            exc = future.exception()
            if exc is not None and (error is None or isinstance(error, UnsupportedChunk)):
                error = exc
        if error is not None:
            raise error


def default_threads() -> int:
    """Decoding threads for this process: `softcache.runtime.threads.read_threads` (the user's
    `SOFTCACHE_READ_THREADS`, else a training run's choice, else the CPUs this process may run
    on, shared out among a machine's DDP ranks).

    Raises:
        ValueError: `SOFTCACHE_READ_THREADS` is not a whole number >= 1.
    """
    return read_threads()


# One pool of decoding threads per process and size, shared by every store it opens.
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _executor(threads: int) -> ThreadPoolExecutor:
    # Keyed by process too: a forked child (a DataLoader worker) inherits the pool objects but
    # not their threads.
    key = (os.getpid(), threads)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="softcache-shards")
        return _POOLS[key]


class _ShardFile:
    """One shard file, mapped into memory, and its checked index: `(offset, nbytes)` per chunk.

    Mapped rather than read: chunks are checked and decoded straight from the page cache, where
    reading them first copied every compressed byte (a third of the decode's time here). A file
    cut short while it is mapped would fault on access (SIGBUS); softcache never rewrites a
    complete store's shards in place, and a trainer's batch process that dies so is named by the
    trainer.
    """

    def __init__(self, data: mmap.mmap, index: np.ndarray, name: str) -> None:
        self.data = data
        self.index = index
        self.name = name

    @classmethod
    def open(cls, root: Path, layout: ShardLayout, shard: int, what: str) -> _ShardFile | None:
        """The shard's file with its index checked, None where the file does not exist.

        `what` (the array and rows read) begins its errors' messages.
        """
        name = f"{layout.path}/{layout.key(shard)}"
        try:
            fd = os.open(root / name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            need = layout.index_bytes
            if size < need:
                raise ShardDecodeError(
                    f"{what}: shard file {name} is corrupt: {size} bytes, shorter than its index ({need})"
                )
            data = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)  # the mapping keeps the file
        try:
            raw = data[size - need : size]
            if crc32c(raw[:-_CRC_BYTES]) != _crc_of(raw):
                raise ShardDecodeError(
                    f"{what}: shard file {name} is corrupt: its index fails its checksum"
                )
            index = np.frombuffer(raw, dtype="<u8", count=2 * layout.chunks_per_shard)
            index = index.reshape(-1, 2)
            missing = index == _MISSING
            end = index[:, 0].astype(object) + index[:, 1].astype(object)
            bad = (missing[:, 0] != missing[:, 1]) | (
                ~missing[:, 0] & ((index[:, 1] <= _CRC_BYTES) | (end > size - need))
            )
            if bad.any():
                chunk = int(np.flatnonzero(bad)[0])
                raise ShardDecodeError(
                    f"{what}: shard file {name} is corrupt: its index places chunk {chunk} at "
                    f"{index[chunk].tolist()}, outside the file's {size - need} bytes of chunks"
                )
        except BaseException:
            data.close()
            raise
        return cls(data, index, name)

    def close(self) -> None:
        # A view still held (none should be) keeps the mapping until it goes.
        with contextlib.suppress(BufferError):
            self.data.close()


class _Chunk:
    """One inner chunk of a shard file, checked and decoded on request (see the module doc).

    `what` (the array and rows read) begins its errors' messages.
    """

    def __init__(
        self, zstd: Zstd, layout: ShardLayout, shard_file: _ShardFile | None, inner: int, what: str
    ) -> None:
        self.zstd, self.layout, self.file, self.inner, self.what = (
            zstd, layout, shard_file, inner, what,
        )  # fmt: skip

    def decode(self, dest: np.ndarray) -> None:
        """The chunk's rows into `dest` (`chunk_bytes` uint8, C-contiguous): its decoded bytes,
        or the fill value where the chunk or its shard file was never written."""
        layout = self.layout
        entry = None if self.file is None else self.file.index[self.inner]
        if entry is None or int(entry[0]) == _MISSING:
            dest.view(layout.dtype)[...] = layout.fill_value
            return
        assert self.file is not None
        where = f"{self.what}: shard file {self.file.name}, chunk {self.inner}"
        offset, nbytes = int(entry[0]), int(entry[1])
        with memoryview(self.file.data) as data:
            frame = data[offset : offset + nbytes - _CRC_BYTES]
            try:
                if crc32c(frame) != _crc_of(data[offset + nbytes - _CRC_BYTES : offset + nbytes]):
                    raise ShardDecodeError(f"{where} is corrupt: it fails its checksum")
                size = zstd_content_size(frame)
                if size is None:
                    raise UnsupportedChunk(f"{where}: a zstd frame that does not state its size")
                if size != layout.chunk_bytes:
                    raise ShardDecodeError(
                        f"{where} is corrupt: its zstd frame holds {size} bytes, the chunk "
                        f"{layout.chunk_bytes}"
                    )
                try:
                    self.zstd.decode(frame, out=dest)
                except RuntimeError as exc:
                    raise ShardDecodeError(
                        f"{where} is corrupt: zstd cannot decode it ({exc})"
                    ) from exc
            finally:
                frame.release()

    def rows(self, buffer: np.ndarray) -> np.ndarray:
        """`buffer` (a decoded chunk) as the chunk's rows."""
        layout = self.layout
        return buffer.view(layout.dtype).reshape(layout.chunk_rows, *layout.shape[1:])


class _ChunkTask:
    """Decode one chunk into the rows `[start, stop)` of an array's, held by `out`: straight
    into `out` where the chunk lies wholly inside, through this thread's buffer where not."""

    def __init__(self, chunk: _Chunk, c0: int, start: int, stop: int, out: np.ndarray) -> None:
        self.chunk, self.c0, self.start, self.stop, self.out = chunk, c0, start, stop, out

    def __call__(self) -> None:
        layout = self.chunk.layout
        lo, hi = max(self.c0, self.start), min(self.c0 + layout.chunk_rows, self.stop)
        target = self.out[lo - self.start : hi - self.start]
        if lo == self.c0 and hi - lo == layout.chunk_rows:
            self.chunk.decode(target.reshape(-1).view(np.uint8))
            return
        buffer = _scratch(layout.chunk_bytes)
        self.chunk.decode(buffer)
        target[...] = self.chunk.rows(buffer)[lo - self.c0 : hi - self.c0]


class _GatherTask:
    """Decode one chunk into this thread's buffer and write its picked rows to their places.

    `rows`: the picked rows inside the chunk (None: every row, in order); `places`: the row of
    `out` each goes to; `convert`: writes the picked rows, converted, into a buffer of this
    thread's (`convert(rows, out=buffer)`) before they are written.
    """

    def __init__(
        self,
        chunk: _Chunk,
        rows: np.ndarray | None,
        places: np.ndarray,
        out: np.ndarray,
        convert: Callable[..., np.ndarray] | None,
    ) -> None:
        self.chunk, self.rows, self.places, self.out, self.convert = (
            chunk, rows, places, out, convert,
        )  # fmt: skip

    def __call__(self) -> None:
        buffer = _scratch(self.chunk.layout.chunk_bytes)
        self.chunk.decode(buffer)
        picked = self.chunk.rows(buffer)
        if self.rows is not None:
            picked = picked[self.rows]
        if self.convert is not None:
            dtype = self.out.dtype
            converted = _scratch(picked.size * dtype.itemsize, slot=1).view(dtype)
            picked = self.convert(picked, out=converted.reshape(picked.shape))
        # numpy's scatter holds the GIL, yet beats torch's (which lets it go) by 1.4-2x here.
        self.out[self.places] = picked


# Each thread's chunk buffers, reused: a fresh one per chunk is paid for in page faults, and one
# that stays in the cache is what makes scattering a chunk's rows cheap.
_SCRATCH = threading.local()


# Larger buffers are not kept: a thread holds at most this much per slot between reads.
_SCRATCH_KEEP = 16 << 20


def _scratch(nbytes: int, slot: int = 0) -> np.ndarray:
    """This thread's buffer `slot` (0: a decoded chunk, 1: its rows converted), `nbytes` uint8;
    sized from validated metadata, never from a file. One over `_SCRATCH_KEEP` is a fresh one."""
    if nbytes > _SCRATCH_KEEP:
        return np.empty(nbytes, np.uint8)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buffer = buffers.get(slot)
    if buffer is None or buffer.nbytes < nbytes:
        buffer = buffers[slot] = np.empty(nbytes, np.uint8)
    return buffer[:nbytes]


def checked_picks(
    name: str,
    shape: tuple[int, ...],
    ranges: Sequence[tuple[int, int]],
    positions: np.ndarray,
    out: np.ndarray,
    i: int = 0,
) -> np.ndarray:
    """A pick's `positions` as int64, once the request is known to fit (ValueError where not).

    Args:
        name: the array's name (for the message).
        shape: the array's shape.
        ranges: `[start, stop)` row ranges, each inside the array.
        positions: (P,) integer rows of their concatenation.
        out: the request's output array, `(P, *shape[1:])`.
        i: the request's number (for the message).
    """
    total = 0
    for r0, r1 in ranges:
        if not 0 <= r0 <= r1 <= shape[0]:
            raise ValueError(f"{name}: rows {r0}..{r1} are not a range inside its {shape[0]} rows")
        total += r1 - r0
    picks = np.asarray(positions)
    if picks.ndim != 1 or (picks.size and picks.dtype.kind not in "iu"):
        raise ValueError(f"positions must be 1-D integers, got {picks.dtype} {picks.shape}")
    if picks.size and (int(picks.min()) < 0 or int(picks.max()) >= total):
        raise ValueError(f"positions must be in [0, {total}), the rows of {list(ranges)}")
    if out.shape != (picks.size, *shape[1:]):
        raise ValueError(
            f"out[{i}] has shape {out.shape}, the picked rows {(picks.size, *shape[1:])}"
        )
    return picks.astype(np.int64, copy=False)


def _close(files: dict[tuple[str, int], _ShardFile | None]) -> None:
    """Unmap the shard files a read opened."""
    for shard_file in files.values():
        if shard_file is not None:
            shard_file.close()


def _crc_of(data: bytes | memoryview) -> int:
    """The little-endian crc32c stored in the last four bytes of `data`."""
    return int(struct.unpack_from("<I", data, len(data) - _CRC_BYTES)[0])


__all__ = [
    "ShardDecodeError",
    "ShardFileReader",
    "ShardLayout",
    "UnsupportedChunk",
    "checked_picks",
    "chunk_frames",
    "default_threads",
    "direct_reads_enabled",
    "shard_layout",
    "zstd_content_size",
]
