"""A build's output: create the store, or reopen a compatible partial one to resume it.

Shared by every writer of stores (`softcache build` for both layouts, `softcache merge`): a location
holding anything softcache did not write is refused, even with `overwrite`; a partial store is
resumed only when everything that fixes its bytes (`StoreMeta` fields, the teacher, the dataset spec,
the build settings in `_LAYOUT_KEYS`) is unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from softcache.errors import (
    MissingArrayError,
    NotAStoreError,
    SoftcacheError,
    StoreExistsError,
    StoreFormatError,
)
from softcache.store.format import SHARD_DONE, StoreMeta
from softcache.store.location import is_empty, is_local, local_path, open_location
from softcache.store.logit_store import LogitStore, holds_group

# Build settings that change the bytes a store holds; a partial store is resumed only if they match.
_LAYOUT_KEYS = ("batch_size", "amp", "compression_level")


def open_output(
    location: str,
    meta: StoreMeta,
    *,
    overwrite: bool,
    compression_level: int = 3,
    storage_options: Mapping[str, Any] | None = None,
) -> LogitStore:
    """Create the store, or reopen a compatible partial one to resume it.

    Refuses to touch anything it did not write: a location holding other data is an error even
    with `--overwrite`.
    """
    options = storage_options
    backend = open_location(location, read_only=False, storage_options=options)
    if is_local(location):
        _check_local_output(local_path(location))
    if holds_group(backend):
        try:
            existing = LogitStore.open(
                location, mode="r+", require_complete=False, storage_options=options
            )
        except NotAStoreError as exc:
            raise StoreExistsError(
                f"{location} holds a Zarr group that is not a softcache store ({exc}); choose "
                "another --output (softcache does not delete data it did not write, even with "
                "--overwrite)"
            ) from exc
        except MissingArrayError as exc:
            # shard_done is created last: without it, creation was interrupted before any shard
            # could be recorded, so starting afresh loses nothing.
            if SHARD_DONE not in exc.missing and not overwrite:
                raise StoreExistsError(
                    f"{location} is a damaged softcache store ({exc}); pass --overwrite to "
                    "rebuild it"
                ) from exc
        except StoreFormatError as exc:
            if not overwrite:
                raise StoreExistsError(
                    f"{location} holds a softcache store this version cannot resume ({exc}); "
                    "pass --overwrite to replace it, or choose another --output"
                ) from exc
        else:
            if existing.meta.complete and not overwrite:
                raise StoreExistsError(
                    f"{location} is already a complete store; pass --overwrite to rebuild it"
                )
            diffs = _layout_diff(existing.meta, meta)
            if diffs and not overwrite:
                raise StoreExistsError(
                    f"{location} holds a partial build with a different configuration "
                    f"({'; '.join(diffs)}); run the original command to finish it, or pass "
                    "--overwrite to start again"
                )
            if not overwrite:
                return existing
    elif not is_empty(backend):
        raise StoreExistsError(
            f"{location} exists and is not a softcache store; choose another --output "
            "(softcache does not delete data it did not write, even with --overwrite)"
        )
    try:
        # Zarr's create mode replaces whatever group was there.
        return LogitStore.create(
            location, meta, compression_level=compression_level, storage_options=options
        )
    except OSError as exc:
        raise SoftcacheError(f"cannot write the store at {location}: {exc}") from exc


def _check_local_output(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise StoreExistsError(f"{path} exists and is a file, not a store; choose another --output")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SoftcacheError(f"cannot write the store at {path}: {exc}") from exc
    if not os.access(path.parent, os.W_OK):
        raise SoftcacheError(
            f"cannot write the store at {path}: no write permission on {path.parent}"
        )


def _layout_diff(old: StoreMeta, new: StoreMeta) -> list[str]:
    pairs: list[tuple[str, Any, Any]] = [
        (key, getattr(old, key), getattr(new, key))
        for key in (
            "encoding",
            "num_classes",
            "k",
            "num_samples",
            "value_dtype",
            "temperatures",
            "shard_rows",
            "chunk_rows",
            "views",
            "layout",
            "num_tokens",
        )
    ]
    pairs.append(("token_codec", _plain(old.token_codec), _plain(new.token_codec)))
    pairs.append(("augmentation", _plain(old.augmentation), _plain(new.augmentation)))
    pairs.append(("teacher", dict(old.teacher), dict(new.teacher)))
    if old.tokenizer is not None and new.tokenizer is not None:  # a partial store from before
        # tokenizer identity records none: resumed as it is
        pairs.append(("tokenizer", _tokenizer_digests(old), _tokenizer_digests(new)))
    pairs.append(("dataset", old.dataset.get("spec"), new.dataset.get("spec")))
    pairs.extend(
        (key, old.build_config.get(key), new.build_config.get(key)) for key in _LAYOUT_KEYS
    )
    return [f"{key}: stored {a!r}, now {b!r}" for key, a, b in pairs if _norm(a) != _norm(b)]


def _tokenizer_digests(meta: StoreMeta) -> tuple[Any, Any]:
    tokenizer = meta.tokenizer or {}
    return tokenizer.get("vocab_sha256"), tokenizer.get("special_sha256")


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples as lists), so metadata read back compares equal."""
    return json.loads(json.dumps(value))
