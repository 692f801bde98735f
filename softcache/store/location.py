"""Where stores live: local folders, `file://`, fsspec URLs (`s3://`, `gs://`, `az://`, `memory://`)
and zip archives (read-only: one file to hand over). An archive holds the store at its root
(`cd s.zarr && zip -r0 ../s.zip .`) or in its single top-level folder (`zip -r s.zip s.zarr`, as
people make them); `PrefixStore` presents the folder as the store.

Credentials and endpoints come from the usual places (the environment, the fsspec backend's config
files) or from `storage_options` (`--storage-option KEY=VALUE` on the command line); nothing is
hard-coded. Readers open stores read-only, so `train`, `info` and `verify` cannot modify a store.
"""

from __future__ import annotations

import zipfile
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import zarr
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.core.sync import sync
from zarr.storage import WrapperStore

from softcache.errors import ConfigError, SoftcacheError

# A published version (`softcache.store.published`): `icechunk:REGISTRY/NAME@VERSION`.
PUBLISHED_PREFIX = "icechunk:"


def is_local(location: str) -> bool:
    """True for a plain path or a `file://` URL."""
    if location.startswith(PUBLISHED_PREFIX):
        return False
    return "://" not in location or location.startswith("file://")


def local_path(location: str) -> Path:
    """The filesystem path of a local location."""
    return Path(urlparse(location).path if location.startswith("file://") else location)


def is_zip(location: str) -> bool:
    return location.rstrip("/").endswith(".zip")


def open_location(
    location: str, *, read_only: bool, storage_options: Mapping[str, Any] | None = None
) -> Store:
    """A Zarr store object for `location`.

    Raises:
        SoftcacheError: a zip archive opened for writing, or a URL whose backend is not installed.
    """
    options = dict(storage_options or {})
    if location.startswith(PUBLISHED_PREFIX):
        if not read_only:
            raise SoftcacheError(
                f"{location} is a published version, which is read-only; publish a new version "
                "with `softcache publish`"
            )
        from softcache.store.published import open_published

        return open_published(location, options)
    if is_zip(location):
        if not read_only:
            raise SoftcacheError(
                f"{location} is a zip archive, which softcache only reads; build into a folder "
                "or bucket, then zip it (`cd STORE && zip -r0 ../store.zip .`)"
            )
        if not is_local(location):
            raise SoftcacheError(
                f"{location}: softcache reads zip archives from local disk only; download it, "
                "or unpack it into the bucket as a store folder"
            )
        path = local_path(location)
        if not path.is_file():
            raise SoftcacheError(f"zip archive {path} does not exist")
        try:
            archive = sync(zarr.storage.ZipStore.open(path, mode="r"))
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise SoftcacheError(f"{path} is not a readable zip archive ({exc})") from exc
        folder = _single_folder(archive)
        return PrefixStore(archive, folder) if folder else archive
    if is_local(location):
        if options:
            raise ConfigError(
                f"storage options {sorted(options)} apply to URLs, not to local paths"
            )
        return zarr.storage.LocalStore(local_path(location), read_only=read_only)
    try:
        return zarr.storage.FsspecStore.from_url(
            location, storage_options=options or None, read_only=read_only
        )
    except (ImportError, ValueError) as exc:
        scheme = urlparse(location).scheme
        raise SoftcacheError(
            f"cannot open {location}: {exc} (is the fsspec backend for '{scheme}://' installed, "
            "e.g. s3fs for s3://?)"
        ) from exc


def _single_folder(archive: Store) -> str | None:
    """The one top-level folder of an archive that holds a Zarr node (`zip -r s.zip s.zarr`);
    None when the archive holds one at its root, or not in exactly one folder."""
    if exists(archive, "zarr.json"):
        return None
    names = {
        name.split("/", 1)[0]
        for name in archive._zf.namelist()  # type: ignore[attr-defined]
        if "/" in name and not name.startswith("__MACOSX/")
    }
    roots = {name for name in archive._zf.namelist() if "/" not in name}  # type: ignore[attr-defined]
    if len(names) == 1 and not roots:
        folder = names.pop()
        if exists(archive, f"{folder}/zarr.json"):
            return folder
    return None


class PrefixStore(WrapperStore[Store]):
    """A read-only view of the objects under `prefix/` of a store, as a store of their own."""

    def __init__(self, store: Store, prefix: str) -> None:
        super().__init__(store)
        self.prefix = prefix.strip("/") + "/"

    def _with_store(self, store: Store) -> PrefixStore:
        return PrefixStore(store, self.prefix)

    def __str__(self) -> str:
        return f"{self._store}/{self.prefix}"

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        return await self._store.get(self.prefix + key, prototype, byte_range)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        ranges = [(self.prefix + key, rng) for key, rng in key_ranges]
        return await self._store.get_partial_values(prototype, ranges)

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, prototype, rng in requests:
            yield key, await self.get(key, prototype, rng)

    async def exists(self, key: str) -> bool:
        return await self._store.exists(self.prefix + key)

    async def getsize(self, key: str) -> int:
        return await self._store.getsize(self.prefix + key)

    async def is_empty(self, prefix: str) -> bool:
        return await self._store.is_empty(self.prefix + prefix)

    async def list(self) -> AsyncGenerator[str, None]:
        async for key in self._store.list_prefix(self.prefix):
            if not key.endswith("/"):  # an archive's folder entries are not objects
                yield key.removeprefix(self.prefix)

    async def list_prefix(self, prefix: str) -> AsyncGenerator[str, None]:
        async for key in self._store.list_prefix(self.prefix + prefix):
            if not key.endswith("/"):
                yield key.removeprefix(self.prefix)

    async def list_dir(self, prefix: str) -> AsyncGenerator[str, None]:
        async for name in self._store.list_dir((self.prefix + prefix).rstrip("/")):
            if name:
                yield name


def exists(store: Store, key: str) -> bool:
    """Whether `key` exists in a store."""
    return bool(sync(store.exists(key)))


def is_empty(store: Store) -> bool:
    """Whether a store holds no objects at all."""
    return bool(sync(store.is_empty("")))


def object_size(store: Store, key: str) -> int | None:
    """Size of an object in bytes, or None when it does not exist."""
    try:
        return int(sync(store.getsize(key)))
    except (FileNotFoundError, KeyError):
        return None


def list_prefix(store: Store, prefix: str = "") -> list[str]:
    """Immediate children (folders and objects) under a prefix."""

    async def collect() -> list[str]:
        return [k async for k in store.list_dir(prefix)]

    return sorted(sync(collect()))


def find_stores(
    location: str,
    *,
    max_depth: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[str]:
    """Locations that may hold a store, at or under `location` (a folder or a bucket prefix).

    A folder holding a `zarr.json` is a candidate and is not searched further (a store's own
    folders are its arrays); so is a `.zip` archive. Other folders are searched down to
    `max_depth` levels below `location` (None: any depth). Only listings are read, never an
    object's content.
    """
    if is_zip(location):
        yield location
        return
    if is_local(location):
        root = local_path(location)
        if not root.is_dir():
            raise SoftcacheError(f"{location} is not a folder")
        yield from _walk_local(root, location.rstrip("/") or location, 0, max_depth)
        return
    backend = open_location(location, read_only=True, storage_options=storage_options)
    yield from _walk_remote(backend, "", location.rstrip("/"), 0, max_depth)


def _walk_local(path: Path, shown: str, depth: int, max_depth: int | None) -> Iterator[str]:
    if (path / "zarr.json").is_file():
        yield shown
        return
    if max_depth is not None and depth >= max_depth:
        return
    try:
        children = sorted(path.iterdir())
    except OSError:
        return  # unreadable folder: nothing to list there
    for child in children:
        name = f"{shown}/{child.name}" if shown != "/" else f"/{child.name}"
        if child.is_dir() and not child.is_symlink():
            yield from _walk_local(child, name, depth + 1, max_depth)
        elif is_zip(child.name) and child.is_file():
            yield name


def _walk_remote(
    backend: Any, key: str, shown: str, depth: int, max_depth: int | None
) -> Iterator[str]:
    children = _remote_children(backend, key)
    if ("zarr.json", False) in children:
        yield shown
        return
    if max_depth is not None and depth >= max_depth:
        return
    for name, is_dir in children:
        child = f"{key}/{name}" if key else name
        if is_dir:
            yield from _walk_remote(backend, child, f"{shown}/{name}", depth + 1, max_depth)
        elif is_zip(name):
            yield f"{shown}/{name}"


def _remote_children(backend: Any, key: str) -> list[tuple[str, bool]]:
    """(name, is a folder) of every entry directly under `key` of an fsspec-backed store."""
    path = f"{backend.path.rstrip('/')}/{key}".rstrip("/")

    async def ls() -> list[dict[str, Any]]:
        try:
            return await backend.fs._ls(path, detail=True)
        except FileNotFoundError:
            return []

    out = []
    for entry in sync(ls()):
        name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
        if str(entry["name"]).rstrip("/") == path.rstrip("/"):
            continue  # a file lists as itself
        out.append((name, entry.get("type") == "directory"))
    return sorted(out)


def list_keys(store: Store) -> list[str]:
    """Every object key of a store, sorted."""

    async def collect() -> list[str]:
        return [k async for k in store.list()]

    return sorted(sync(collect()))


def parse_storage_options(pairs: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings -> a dict (values `true`/`false`/numbers are converted).

    Nested keys use dots: `client_kwargs.endpoint_url=http://...` -> {"client_kwargs": {...}}.
    """
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--storage-option {pair!r} is not KEY=VALUE")
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        target = options
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return options
