"""Published stores: versions of a store under a name, through Icechunk (optional extra).

A registry is a folder or bucket prefix; the name `NAME` is the Icechunk repository
`REGISTRY/NAME`, each version an immutable tag on a snapshot of its `main` branch. The location
`icechunk:REGISTRY/NAME@VERSION` (or without `@VERSION`: the latest commit) is a store every reader
opens (`info`, `verify`, `train --store`, `open_store`) through a read-only session of that tag.

This module opens published versions for reading (any reader, through `open_location`) and
holds what publishing shares with it (the repository of a location, the commit lock);
`softcache.tools.publish` publishes, lists and exports versions. Icechunk is imported only when
such a location or command is used.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from softcache.errors import ConfigError, SoftcacheError

PREFIX = "icechunk:"
MAIN = "main"


def is_published(location: str) -> bool:
    """Whether a location names a published store (`icechunk:REPOSITORY[@VERSION]`)."""
    return location.startswith(PREFIX)


def split(location: str) -> tuple[str, str | None]:
    """`icechunk:REPO@VERSION` -> (REPO, VERSION); VERSION None for the latest commit."""
    rest = location[len(PREFIX) :] if is_published(location) else location
    head, sep, version = rest.rpartition("@")
    if sep and "/" not in version and head:
        return head.rstrip("/"), version
    return rest.rstrip("/"), None


def published_location(registry: str, name: str, version: str | None = None) -> str:
    """The location consumers open: `icechunk:REGISTRY/NAME@VERSION`."""
    return f"{PREFIX}{registry.rstrip('/')}/{name}" + (f"@{version}" if version else "")


def icechunk_module() -> Any:
    try:
        import icechunk
    except ImportError as exc:
        raise SoftcacheError(
            "publishing and reading published stores needs Icechunk: pip install "
            "'softcache[icechunk]'"
        ) from exc
    global _LOGS_SET
    if not _LOGS_SET:
        # Its warning that local storage lacks conditional writes is answered by `commit_lock`.
        icechunk.set_logs_filter("error")
        _LOGS_SET = True
    return icechunk


_LOGS_SET = False


@contextlib.contextmanager
def commit_lock(repository: str) -> Iterator[None]:
    """On local disk, which has no conditional writes, one commit at a time (an exclusive
    `flock` on a file beside the repository), so a racing publisher sees the moved branch and
    gets Icechunk's conflict instead of overwriting it. Object stores need none: Icechunk's
    writes there are conditional."""
    if "://" in repository and not repository.startswith("file://"):
        yield
        return
    path = urlparse(repository).path if repository.startswith("file://") else repository
    lock = Path(os.path.abspath(path)).parent / f".{Path(path).name}.softcache-lock"
    with open(lock, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _storage(repository: str, options: Mapping[str, Any] | None) -> Any:
    """The Icechunk storage of a repository location (a path, file://, or s3://)."""
    ic = icechunk_module()
    options = dict(options or {})
    if "://" not in repository or repository.startswith("file://"):
        path = urlparse(repository).path if repository.startswith("file://") else repository
        return ic.local_filesystem_storage(os.path.abspath(path))
    url = urlparse(repository)
    if url.scheme != "s3":
        raise ConfigError(
            f"{repository}: softcache publishes to local folders and s3:// (Icechunk also "
            "supports GCS and Azure; ask for them)"
        )
    client = options.get("client_kwargs", {}) or {}
    endpoint = options.get("endpoint_url") or client.get("endpoint_url")
    region = (
        client.get("region_name")
        or options.get("region")
        or os.environ.get("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION"))
    )
    kwargs: dict[str, Any] = {
        "bucket": url.netloc,
        "prefix": url.path.strip("/") or None,
        "region": region,
        "endpoint_url": endpoint,
        "allow_http": bool(endpoint and endpoint.startswith("http://")),
        "force_path_style": bool(endpoint),
    }
    if options.get("anon"):
        kwargs["anonymous"] = True
    elif options.get("key"):
        kwargs["access_key_id"] = options["key"]
        kwargs["secret_access_key"] = options.get("secret")
        kwargs["session_token"] = options.get("token")
    else:
        kwargs["from_env"] = True
    return ic.s3_storage(**kwargs)


def open_repository(repository: str, options: Mapping[str, Any] | None, *, create: bool) -> Any:
    """The Icechunk repository at `repository`, created first when `create` and it is missing.

    Two publishers may create the same new repository at once: on object storage the loser's
    create fails on Icechunk's conditional write of the branch ("branch update conflict"), on
    local disk it may find the winner's half-written files. Either way the repository then
    exists (or is about to), so a failed create is retried as an open for a few seconds before
    its error is reported.
    """
    ic = icechunk_module()
    storage = _storage(repository, options)
    try:
        if ic.Repository.exists(storage):
            return ic.Repository.open(storage)
        if not create:
            raise SoftcacheError(
                f"nothing is published at {repository} (no Icechunk repository there)"
            )
        try:
            return ic.Repository.create(storage)
        except ic.IcechunkError as exc:
            return _open_after_racing_create(ic, storage, exc)
    except ic.IcechunkError as exc:
        raise SoftcacheError(
            f"cannot open the published store {repository}: {short_error(exc)}"
        ) from exc


def _open_after_racing_create(ic: Any, storage: Any, create_error: BaseException) -> Any:
    """Open the repository another publisher created while our create failed, or re-raise."""
    for attempt in range(20):
        time.sleep(0.05 * (attempt + 1))
        try:
            if ic.Repository.exists(storage):
                return ic.Repository.open(storage)
        except ic.IcechunkError:
            continue  # the other create is still writing its first snapshot
    raise create_error


def short_error(exc: BaseException) -> str:
    """An Icechunk error's first line (its messages carry a context trace)."""
    text = str(exc).strip().splitlines()
    return (text[0].strip().lstrip("x").strip() if text else type(exc).__name__)[:200]


def open_published(location: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """A read-only Zarr store of a published version (`icechunk:REPO@VERSION`)."""
    ic = icechunk_module()
    repository, version = split(location)
    repo = open_repository(repository, storage_options, create=False)
    try:
        if version is None:
            return repo.readonly_session(branch=MAIN).store
        return repo.readonly_session(tag=version).store
    except ic.IcechunkError as exc:
        known = ", ".join(sorted(repo.list_tags())) or "none"
        raise SoftcacheError(
            f"version {version!r} of {repository} is not published (versions: {known})"
        ) from exc
