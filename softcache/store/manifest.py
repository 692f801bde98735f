"""Tamper evidence: the manifest of a store's objects and the store's digest.

A CRC-32C catches accidents, not edits: anyone can rewrite a chunk and its checksum. So a build,
when it completes (`LogitStore.mark_complete`), records the SHA-256 and size of every object of the
store in a manifest, the Zarr group `manifest/` (its `zarr.json` attribute `softcache_manifest`),
and then, in the same last write that sets `complete`, the SHA-256 of the manifest in the group's
`softcache` attribute (`manifest`). The group's `zarr.json` therefore commits to every byte of the
store, and its SHA-256 is the store's **digest** (`sha256:<hex>`): a consumer pins a store by it as
one pins a container image.

- `verify` recomputes every object's digest and names each that differs, is missing or was added;
- a reader given `expect_digest` (`train --expect-digest`, `softcache.open_store(...,
  expect_digest=...)`) refuses a store whose digest differs, and then reads every object through
  `VerifiedStore`, which checks each object against the manifest before zarr sees a byte of it;
- stores written before manifests have none: they read as before, `verify` says so, and they
  cannot be pinned.

The manifest lists the objects of the arrays FORMAT.md requires (their `zarr.json` and every chunk
object that exists at completion), not the group's own `zarr.json` (which records the manifest's
digest) nor the manifest itself. It holds no time or place, so a resumed build writes the manifest
an uninterrupted one writes.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import json
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import WrapperStore

from softcache.errors import StoreFormatError, TamperedStoreError
from softcache.store.format import MANIFEST
from softcache.store.validate import ArraySpec, parse_json, read_object

MANIFEST_KEY = f"{MANIFEST}/zarr.json"
MANIFEST_ATTR = "softcache_manifest"
MANIFEST_VERSION = 1
DIGEST_PREFIX = "sha256:"
# Objects hashed at once when a manifest is computed or verified (memory: this many objects).
_CONCURRENCY = 8
# Bytes a manifest entry may take (key, digest and size), for the size a reader accepts.
_ENTRY_BYTES = 200


def digest_of(group_json: bytes) -> str:
    """The store digest: ``sha256:`` and the hex SHA-256 of the group's zarr.json bytes."""
    return DIGEST_PREFIX + hashlib.sha256(group_json).hexdigest()


def has_manifest(group_json: bytes) -> bool:
    """Whether a group's zarr.json records a manifest (without validating anything else)."""
    try:
        doc = json.loads(group_json)
        return bool(doc["attributes"]["softcache"]["manifest"])
    except (ValueError, RecursionError, KeyError, TypeError):
        return False


def normalise_digest(digest: str) -> str:
    """``sha256:HEX`` or a bare 64-digit HEX -> ``sha256:hex``; anything else is refused."""
    text = digest.strip().lower()
    hexpart = text.removeprefix(DIGEST_PREFIX)
    if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise StoreFormatError(
            f"{digest!r} is not a store digest; expected 'sha256:' and 64 hex digits (as "
            "`softcache info` shows it)"
        )
    return DIGEST_PREFIX + hexpart


# ---- which objects ------------------------------------------------------------------------------


def object_keys(specs: Mapping[str, ArraySpec], encode: Mapping[str, Any]) -> Iterator[str]:
    """Every object key the arrays `specs` can have: each `zarr.json`, then its chunk objects.

    `encode[name]` is the array's `metadata.encode_chunk_key`.
    """
    for name, spec in specs.items():
        yield f"{name}/zarr.json"
        grid = [
            -(-size // chunk) if chunk else 0
            for size, chunk in zip(spec.shape, spec.chunk, strict=True)
        ]
        for coords in itertools.product(*(range(n) for n in grid)):
            yield f"{name}/{encode[name](coords)}"


# ---- the manifest document -------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """Object key -> (hex SHA-256, size)."""

    objects: dict[str, tuple[str, int]]

    def to_bytes(self) -> bytes:
        """The manifest group's zarr.json, deterministic (sorted, no time or place)."""
        doc = {
            "zarr_format": 3,
            "node_type": "group",
            "attributes": {
                MANIFEST_ATTR: {
                    "version": MANIFEST_VERSION,
                    "algorithm": "sha256",
                    "objects": {
                        key: {"sha256": h, "size": n}
                        for key, (h, n) in sorted(self.objects.items())
                    },
                }
            },
        }
        return (json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n").encode()

    def summary(self, data: bytes) -> dict[str, Any]:
        """What the `softcache` attribute records of the manifest (`data` its bytes)."""
        return {
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "objects": len(self.objects),
            "bytes": sum(n for _, n in self.objects.values()),
        }

    @classmethod
    def parse(cls, data: bytes, *, where: str) -> Manifest:
        doc = parse_json(data, MANIFEST_KEY, where=where)
        body = doc.get("attributes", {}).get(MANIFEST_ATTR) if isinstance(doc, dict) else None
        if not isinstance(body, dict) or body.get("version") != MANIFEST_VERSION:
            raise StoreFormatError(
                f"{where}: {MANIFEST_KEY} is not a version-{MANIFEST_VERSION} softcache manifest"
            )
        if body.get("algorithm") != "sha256" or not isinstance(body.get("objects"), dict):
            raise StoreFormatError(f"{where}: {MANIFEST_KEY}: expected sha256 digests of objects")
        objects: dict[str, tuple[str, int]] = {}
        for key, entry in body["objects"].items():
            h = entry.get("sha256") if isinstance(entry, dict) else None
            n = entry.get("size") if isinstance(entry, dict) else None
            if not (isinstance(h, str) and len(h) == 64 and type(n) is int and n >= 0):
                raise StoreFormatError(
                    f"{where}: {MANIFEST_KEY}: entry {key!r} is {str(entry)[:60]}; expected "
                    '{"sha256": 64 hex digits, "size": bytes}'
                )
            objects[key] = (h, n)
        return cls(objects)


def manifest_limit(specs: Mapping[str, ArraySpec]) -> int:
    """The most bytes a manifest of these arrays can take (what a reader agrees to read)."""
    count = 0
    for spec in specs.values():
        grid = 1
        for size, chunk in zip(spec.shape, spec.chunk, strict=True):
            grid *= -(-size // chunk) if chunk else 0
        count += 1 + grid
    return 4096 + _ENTRY_BYTES * count


def read_manifest(
    store: Any, summary: Mapping[str, Any], specs: Mapping[str, ArraySpec], *, where: str
) -> Manifest:
    """Read and check the manifest a complete store's attribute records.

    Raises:
        TamperedStoreError: the manifest is missing or is not the one the attribute records.
        StoreFormatError: it is larger than its arrays allow, or malformed.
    """
    recorded = int(summary["size"])
    limit = manifest_limit(specs)
    if recorded > limit:
        raise StoreFormatError(
            f"{where}: softcache.manifest.size is {recorded:,}; expected at most {limit:,} bytes "
            "for the store's objects"
        )
    try:
        size = int(sync(store.getsize(MANIFEST_KEY)))
    except (FileNotFoundError, NotADirectoryError, KeyError):
        size = None
    if size is None:
        raise TamperedStoreError(
            f"{where}: {MANIFEST_KEY} is missing, though the store records a manifest"
        )
    if size != recorded:
        raise TamperedStoreError(
            f"{where}: {MANIFEST_KEY} differs from the manifest the store records ({size:,} "
            f"bytes, recorded {recorded:,}): it was changed after the build"
        )
    data = read_object(store, MANIFEST_KEY, recorded, where=where)
    if data is None:
        raise TamperedStoreError(f"{where}: {MANIFEST_KEY} vanished while being read")
    found = hashlib.sha256(data).hexdigest()
    if found != summary["sha256"]:
        raise TamperedStoreError(
            f"{where}: {MANIFEST_KEY} differs from the manifest the store records (sha256 "
            f"{found[:16]}..., recorded {summary['sha256'][:16]}...): it was changed after the "
            "build"
        )
    return Manifest.parse(data, where=where)


# ---- hashing objects ---------------------------------------------------------------------------------


async def _hash_object(store: Any, key: str, gate: asyncio.Semaphore) -> tuple[str, int] | None:
    async with gate:
        buffer = await store.get(key, prototype=default_buffer_prototype())
        if buffer is None:
            return None
        data = buffer.to_bytes()
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        return digest, len(data)


def hash_objects(store: Any, keys: Iterable[str]) -> dict[str, tuple[str, int] | None]:
    """Key -> (hex SHA-256, size), None for a missing object; `_CONCURRENCY` at a time."""

    async def run() -> dict[str, tuple[str, int] | None]:
        gate = asyncio.Semaphore(_CONCURRENCY)
        keys_list = list(keys)
        results = await asyncio.gather(*(_hash_object(store, k, gate) for k in keys_list))
        return dict(zip(keys_list, results, strict=True))

    return sync(run())


def compute_manifest(
    store: Any, keys: Iterable[str], known: Mapping[str, tuple[str, int]]
) -> Manifest:
    """The manifest of the objects `keys` that exist: `known` digests (recorded as they were
    written, by this process) are taken as they are, the rest are read back and hashed."""
    keys = list(keys)
    todo = [k for k in keys if k not in known]
    hashed = hash_objects(store, todo)
    objects = {k: known[k] for k in keys if k in known}
    objects.update({k: v for k, v in hashed.items() if v is not None})
    return Manifest(objects)


# ---- stores that record or check digests ------------------------------------------------------------


class DigestRecorder(WrapperStore[Any]):
    """A writable store that records the SHA-256 of every object it writes (`digests`), so that
    completing a build need not read back what this process wrote."""

    def __init__(self, store: Any, digests: dict[str, tuple[str, int]] | None = None) -> None:
        super().__init__(store)
        self.digests: dict[str, tuple[str, int]] = {} if digests is None else digests

    def _with_store(self, store: Any) -> DigestRecorder:
        return DigestRecorder(store, self.digests)

    async def set(self, key: str, value: Buffer) -> None:
        self.digests.pop(key, None)
        await self._store.set(key, value)
        data = value.to_bytes()
        self.digests[key] = (hashlib.sha256(data).hexdigest(), len(data))

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        for key, value in values:
            await self.set(key, value)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        self.digests.pop(key, None)  # unknown whether it was written: read it back at the end
        await self._store.set_if_not_exists(key, value)

    async def delete(self, key: str) -> None:
        self.digests.pop(key, None)
        await self._store.delete(key)

    async def delete_dir(self, prefix: str) -> None:
        for key in [k for k in self.digests if k.startswith(prefix)]:
            self.digests.pop(key, None)
        await self._store.delete_dir(prefix)

    async def clear(self) -> None:
        self.digests.clear()
        await self._store.clear()

    def __getstate__(self) -> dict[str, Any]:  # a Dask worker records its own writes
        return {"_store": self._store, "digests": {}}


class VerifiedStore(WrapperStore[Any]):
    """A read-only view of a store that hands out only objects whose SHA-256 matches `objects`.

    Every object is read whole and checked before any byte of it is returned (a ranged read is
    served from the checked object); the last few checked objects are kept, so a shard read chunk
    by chunk is fetched once. An object the table does not list reads as missing if it is absent,
    and is refused if it exists (something was added after the build).
    """

    def __init__(self, store: Any, objects: Mapping[str, tuple[str, int]], where: str) -> None:
        super().__init__(store)
        self.objects = objects
        self.where = where
        self._cache: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._cache_bytes = 0

    def _with_store(self, store: Any) -> VerifiedStore:
        return VerifiedStore(store, self.objects, self.where)

    def __getstate__(self) -> dict[str, Any]:
        return {"_store": self._store, "objects": self.objects, "where": self.where}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_store"], state["objects"], state["where"])  # type: ignore[misc]

    async def _checked(self, key: str) -> bytes | None:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        expected = self.objects.get(key)
        if expected is None:
            try:
                present = await self._store.exists(key)
            except (KeyError, FileNotFoundError):  # some stores raise for keys they cannot hold
                present = False
            if present:
                raise TamperedStoreError(
                    f"{self.where}: object {key} is not in the store's manifest: it was added "
                    "after the build"
                )
            return None
        digest, size = expected
        buffer = await self._store.get(key, prototype=default_buffer_prototype())
        if buffer is None:
            raise TamperedStoreError(
                f"{self.where}: object {key} is missing, though the manifest lists it"
            )
        data = buffer.to_bytes()
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            raise TamperedStoreError(
                f"{self.where}: object {key} does not match the manifest (sha256 differs): it "
                "was changed after the build; restore the store from its producer"
            )
        self._cache[key] = data
        self._cache_bytes += len(data)
        while self._cache_bytes > _CACHE_BYTES and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= len(old)
        return data

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        data = await self._checked(key)
        if data is None:
            return None
        return prototype.buffer.from_bytes(_slice(data, byte_range))

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return [await self.get(key, prototype, rng) for key, rng in key_ranges]

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, prototype, rng in requests:
            yield key, await self.get(key, prototype, rng)

    async def getsize(self, key: str) -> int:
        if key in self.objects:
            return self.objects[key][1]
        return await self._store.getsize(key)


# Bytes of checked objects a `VerifiedStore` keeps (a few shards).
_CACHE_BYTES = 256 << 20


def _slice(data: bytes, byte_range: ByteRequest | None) -> bytes:
    if byte_range is None:
        return data
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start : byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset :]
    if isinstance(byte_range, SuffixByteRequest):
        return data[len(data) - byte_range.suffix :] if byte_range.suffix else b""
    raise TypeError(f"unknown byte range {byte_range!r}")  # pragma: no cover
