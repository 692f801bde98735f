"""Where stores live: local folders, `file://`, fsspec URLs (`s3://`, `gs://`, `az://`, `memory://`)
and zip archives (read-only: one file to hand over).

Credentials and endpoints come from the usual places (the environment, the fsspec backend's config
files) or from `storage_options` (`--storage-option KEY=VALUE` on the command line); nothing is
hard-coded. Readers open stores read-only, so `train`, `info` and `verify` cannot modify a store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import zarr
from zarr.abc.store import Store
from zarr.core.sync import sync

from softcache.errors import ConfigError, SoftcacheError


def is_local(location: str) -> bool:
    """True for a plain path or a `file://` URL."""
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
    if is_zip(location):
        if not read_only:
            raise SoftcacheError(
                f"{location} is a zip archive, which softcache only reads; build into a folder "
                "or bucket, then zip it (`cd STORE && zip -r0 ../store.zip .`)"
            )
        path = local_path(location)
        if not path.is_file():
            raise SoftcacheError(f"zip archive {path} does not exist")
        return sync(zarr.storage.ZipStore.open(path, mode="r"))
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
