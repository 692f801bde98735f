"""`softcache publish`, `versions` and `export`: versions of a store under a name.

A team publishes its store under a name, version after version; a consumer pins a version and
keeps reading exactly those bytes whatever is published later. Icechunk (a transactional,
versioned storage engine for Zarr, on local disk and object storage) does the hard part
(`softcache.store.published` opens its repositories and reads versions):

- a **registry** is a folder or bucket prefix; the name `NAME` is the Icechunk repository
  `REGISTRY/NAME`, and each version is an immutable **tag** on a snapshot of its `main` branch;
- **publishing** (`publish`) copies every object of a complete store, as bytes (so the published
  version has the store's digest), into a writable session of `main`, replacing the previous
  version's objects, commits, and tags the snapshot with the version. The commit is atomic: a
  reader sees the old snapshot or the new one, never a mixture; a second publisher whose session
  began before the first committed is told of the conflict (`PublishConflictError`) and nothing of
  its attempt becomes visible; an existing version is never replaced (tags are immutable);
- `versions` lists a name's versions and their digests; `export` copies a version out as a plain
  store for readers without Icechunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from softcache.errors import ConfigError, PublishConflictError, SoftcacheError
from softcache.store import LogitStore
from softcache.store.location import is_empty, open_location
from softcache.store.manifest import MANIFEST_KEY, Manifest, digest_of, read_manifest
from softcache.store.published import (
    MAIN,
    PREFIX,
    commit_lock,
    icechunk_module,
    is_published,
    open_repository,
    published_location,
    short_error,
)
from softcache.store.validate import array_specs

# Objects copied at once when publishing or exporting.
_CONCURRENCY = 16


@dataclass(frozen=True)
class PublishResult:
    """What `publish` did."""

    location: str
    version: str
    digest: str
    snapshot: str
    objects: int


def publish(
    source: str,
    registry: str,
    name: str,
    version: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    source_options: Mapping[str, Any] | None = None,
    message: str | None = None,
    before_commit: Callable[[], None] | None = None,
) -> PublishResult:
    """Publish the complete store `source` as version `version` of `name` in `registry`.

    Every object is read through the source's manifest (an object changed since its build
    stops the publication), copied as bytes, committed atomically and tagged.

    Args:
        before_commit: called after the copy, before the commit (tests synchronise racing
            publishers with it).

    Raises:
        PublishConflictError: another publisher committed `name` meanwhile, or `version` exists.
        SoftcacheError: the source is incomplete, has no manifest, or is damaged.
    """
    ic = icechunk_module()
    if not version or "@" in version or "/" in version:
        raise ConfigError(f"version {version!r} must be a non-empty name without '@' or '/'")
    if not name or "@" in name or name.startswith("/"):
        raise ConfigError(f"name {name!r} must be a non-empty name without '@'")
    plain = LogitStore.open(source, storage_options=source_options)
    if plain.digest is None:
        raise SoftcacheError(
            f"store {source} has no manifest, so its bytes cannot be pinned; rebuild it (or "
            "`softcache merge` it) with this softcache to publish it"
        )
    store = LogitStore.open(source, storage_options=source_options, expect_digest=plain.digest)
    assert store.meta.manifest is not None
    repository = f"{registry.rstrip('/')}/{name}"
    repo = open_repository(repository, storage_options, create=True)
    if version in set(repo.list_tags()):
        raise PublishConflictError(
            f"version {version} of {repository} is already published; versions are immutable: "
            "publish under a new version"
        )
    manifest: Manifest = read_manifest(
        store.backend, store.meta.manifest, array_specs(store.meta), where=f"store {source}"
    )
    # Metadata first (Icechunk creates a node from its zarr.json before its chunks).
    keys = ["zarr.json", MANIFEST_KEY, *sorted(manifest.objects)]
    keys.sort(key=lambda k: (not k.endswith("zarr.json"), k.count("/"), k))
    session = repo.writable_session(MAIN)
    target = session.store
    sync(_replace_all(store.backend, target, keys))
    if before_commit is not None:
        before_commit()
    text = message or f"publish {name} {version} ({plain.digest})"
    with commit_lock(repository):
        try:
            snapshot = session.commit(text, metadata={"version": version, "digest": plain.digest})
        except ic.ConflictError as exc:
            raise PublishConflictError(
                f"another publisher committed to {repository} while this one copied; nothing "
                f"of version {version} was published: run the command again ({short_error(exc)})"
            ) from exc
        try:
            repo.create_tag(version, snapshot_id=snapshot)
        except ic.IcechunkError as exc:
            raise PublishConflictError(
                f"version {version} of {repository} was published by another publisher "
                f"meanwhile ({short_error(exc)}); its bytes are theirs: publish under a new version"
            ) from exc
    return PublishResult(
        published_location(registry, name, version), version, plain.digest, snapshot, len(keys)
    )


async def _replace_all(source: Any, target: Any, keys: list[str]) -> None:
    """Empty `target`, then copy `keys` from `source` (metadata first, then the rest at once)."""
    await target.delete_dir("")
    proto = default_buffer_prototype()
    gate = asyncio.Semaphore(_CONCURRENCY)

    async def copy(key: str) -> None:
        async with gate:
            value = await source.get(key, prototype=proto)
            if value is not None:
                await target.set(key, value)

    metadata = [k for k in keys if k.endswith("zarr.json")]
    for key in metadata:  # parents before children
        await copy(key)
    await asyncio.gather(*(copy(k) for k in keys if not k.endswith("zarr.json")))


def versions(
    repository: str, storage_options: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The published versions of a name: version, snapshot, digest and commit time."""
    location = repository[len(PREFIX) :] if is_published(repository) else repository
    repo = open_repository(location, storage_options, create=False)
    out = []
    for tag in sorted(repo.list_tags()):
        snapshot = repo.lookup_tag(tag)
        info = repo.lookup_snapshot(snapshot)
        store = repo.readonly_session(tag=tag).store
        group = sync(store.get("zarr.json", prototype=default_buffer_prototype()))
        out.append(
            {
                "version": tag,
                "location": f"{PREFIX}{location}@{tag}",
                "snapshot": snapshot,
                "digest": digest_of(group.to_bytes()) if group is not None else None,
                "written": info.written_at.isoformat(timespec="seconds"),
            }
        )
    return out


def export(
    location: str,
    output: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    output_options: Mapping[str, Any] | None = None,
) -> str:
    """Copy a published version out as a plain store at `output` (which must be empty).

    Returns:
        The digest of the exported store (the published version's).
    """
    published = LogitStore.open(location, storage_options=storage_options)
    digest = published.digest
    if digest is None:
        raise SoftcacheError(f"{location} has no manifest; nothing softcache published")
    pinned = LogitStore.open(location, storage_options=storage_options, expect_digest=digest)
    target = open_location(output, read_only=False, storage_options=output_options)
    if not is_empty(target):
        raise SoftcacheError(f"{output} is not empty; export into a new folder or prefix")
    keys = sorted(pinned.backend.objects)  # the verified table: every object, metadata too
    proto = default_buffer_prototype()

    async def copy() -> None:
        gate = asyncio.Semaphore(_CONCURRENCY)

        async def one(key: str) -> None:
            async with gate:
                value = await pinned.backend.get(key, prototype=proto)
                if value is not None:
                    await target.set(key, value)

        await asyncio.gather(*(one(k) for k in keys))

    sync(copy())
    return digest
