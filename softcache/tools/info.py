"""`softcache info` and `softcache ls`: what a colleague needs before using someone else's store.

Per-token stores (format_version 3, `layout = "tokens"`) also report their token count, the mean
tokens per sample, their row coding (`token_codec`) and the bytes each token takes on disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from softcache.errors import NotAStoreError, SoftcacheError
from softcache.store import LogitStore
from softcache.store.location import find_stores


def store_info(
    location: str, *, storage_options: Mapping[str, Any] | None = None, metadata_only: bool = False
) -> dict[str, Any]:
    """A summary of a store (complete or not), as plain JSON-able data.

    Args:
        location: the store.
        storage_options: fsspec options for URL stores.
        metadata_only: read metadata objects only (`ls`): a complete store's size comes from
            its manifest when it has one, and its shards are all done by definition; only a
            partial store's `shard_done` record is read.

    Raises:
        StoreFormatError: not a softcache store, an unknown format version, or metadata that
            breaks a rule of the format.
    """
    store = LogitStore.open(location, require_complete=False, storage_options=storage_options)
    meta = store.meta
    complete = metadata_only and meta.complete  # every shard is done by definition
    done = meta.num_shards if complete else int(store.done_mask().sum())
    if metadata_only and meta.manifest is not None:
        stored = int(meta.manifest["bytes"]) + int(meta.manifest["size"])
    else:
        stored = store.nbytes_stored()
    logical = store.nbytes_logical()
    info: dict[str, Any] = {
        "location": location,
        "format_version": meta.format_version,
        "layout": meta.layout,
        "complete": meta.complete,
        "shards_done": done,
        "shards_total": meta.num_shards,
        "encoding": meta.encoding,
        "num_classes": meta.num_classes,
        "k": meta.k,
        "value_dtype": meta.value_dtype,
        "temperatures": list(meta.temperatures),
        "num_samples": meta.num_samples,
        "views": meta.views,
        "augmentation": dict(meta.augmentation) if meta.augmentation else None,
        "shard_rows": meta.shard_rows,
        "teacher": dict(meta.teacher),
        "dataset": dict(meta.dataset),
        "bytes_stored": stored,
        "bytes_per_sample": stored / meta.num_samples if meta.num_samples else None,
        "compression_ratio": logical / stored if stored else None,
        "created": meta.created,
        "softcache_version": meta.softcache_version,
        "digest": store.digest,
        "manifest": dict(meta.manifest) if meta.manifest else None,
        "provenance": dict(meta.provenance) if meta.provenance else None,
    }
    if meta.tokens:
        codec = meta.codec
        info.update(
            num_tokens=meta.num_tokens,
            tokens_per_sample=meta.num_tokens / meta.num_samples if meta.num_samples else None,
            token_codec=codec.to_dict(),
            bytes_per_token=stored / meta.num_tokens if meta.num_tokens else None,
            bytes_per_token_raw=codec.bytes_per_token_raw(),
            tokenizer=_tokenizer_summary(meta.tokenizer_identity),
        )
    return info


def _tokenizer_summary(identity: Any) -> dict[str, Any] | None:
    """The teacher's tokenizer as `info` shows it (without the per-block digests)."""
    if identity is None:
        return None
    return {
        "class": identity.cls,
        "size": identity.size,
        "vocab_sha256": identity.vocab_sha256,
        "special_tokens": {k: list(v) for k, v in identity.special_tokens.items()},
    }


def info_rows(info: Mapping[str, Any]) -> list[tuple[str, str]]:
    """`store_info` as (label, value) rows for a terminal."""
    if info.get("layout") == "tokens":
        return _token_info_rows(info)
    teacher, dataset = info["teacher"], info["dataset"]
    encoding = info["encoding"] + (f" (k={info['k']})" if info["k"] else "")
    status = (
        "complete"
        if info["complete"]
        else f"INCOMPLETE: {info['shards_done']} of {info['shards_total']} shards written"
    )
    fingerprint = dataset.get("fingerprint") or "-"
    return [
        ("store", info["location"]),
        ("status", status),
        ("digest", _digest_text(info)),
        ("teacher", f"{teacher.get('spec')} ({teacher.get('num_parameters', 0):,} parameters)"),
        ("teacher sha256", str(teacher.get("state_dict_sha256", "-"))),
        *_provenance_rows(info),
        ("dataset", f"{dataset.get('spec')} ({dataset.get('num_samples', 0):,} samples)"),
        ("fingerprint", fingerprint),
        ("encoding", f"{encoding}, {info['value_dtype']}, {info['num_classes']:,} classes"),
        ("temperatures", ", ".join(f"{t:g}" for t in info["temperatures"]) or "- (dense: any)"),
        (
            "samples",
            f"{info['num_samples']:,} x {info['views']} view(s), shards of {info['shard_rows']:,} rows",
        ),
        (
            "augmentation",
            f"{aug['spec']} (seed {aug['seed']}; params {', '.join(aug['param_names'])})"
            if (aug := info.get("augmentation"))
            else "- (one unaugmented view per sample)",
        ),
        ("bytes on disk", f"{info['bytes_stored']:,} ({info['bytes_per_sample']:,.1f} B/sample)"),
        ("compression", f"{info['compression_ratio']:.2f}x"),
        ("created", f"{info['created']} by softcache {info['softcache_version']}"),
        ("format", f"version {info['format_version']}"),
    ]


def _tokenizer_text(summary: Mapping[str, Any] | None) -> str:
    if summary is None:
        return "- (not recorded: train cannot check a student's)"
    return (
        f"{summary['class']}, {summary['size']:,} tokens, vocabulary sha256 "
        f"{summary['vocab_sha256'][:16]}..."
    )


def _token_info_rows(info: Mapping[str, Any]) -> list[tuple[str, str]]:
    """`info_rows` of a per-token store."""
    teacher, dataset, codec = info["teacher"], info["dataset"], info["token_codec"]
    status = (
        "complete"
        if info["complete"]
        else f"INCOMPLETE: {info['shards_done']} of {info['shards_total']} shards written"
    )
    per_sample = info["tokens_per_sample"]
    per_token = info["bytes_per_token"]
    return [
        ("store", info["location"]),
        ("status", status),
        ("digest", _digest_text(info)),
        ("teacher", f"{teacher.get('spec')} ({teacher.get('num_parameters', 0):,} parameters)"),
        ("teacher sha256", str(teacher.get("state_dict_sha256", "-"))),
        *_provenance_rows(info),
        ("dataset", f"{dataset.get('spec')} ({dataset.get('num_samples', 0):,} samples)"),
        ("fingerprint", dataset.get("fingerprint") or "-"),
        ("layout", "tokens (one row per token)"),
        ("encoding", _codec_text(codec)),
        ("vocabulary", f"{codec['vocab_size']:,} tokens"),
        ("tokenizer", _tokenizer_text(info.get("tokenizer"))),
        ("temperature", f"{codec['temperature']:g}"),
        (
            "samples",
            f"{info['num_samples']:,} ({info['num_tokens']:,} tokens, "
            f"{per_sample if per_sample is not None else 0:,.1f} per sample), shards of "
            f"{info['shard_rows']:,} tokens",
        ),
        (
            "bytes on disk",
            f"{info['bytes_stored']:,} ({per_token if per_token is not None else 0:,.1f} B/token, "
            f"{info['bytes_per_token_raw']:,} B/token uncompressed)",
        ),
        ("compression", f"{info['compression_ratio']:.2f}x"),
        ("created", f"{info['created']} by softcache {info['softcache_version']}"),
        ("format", f"version {info['format_version']}"),
    ]


def _digest_text(info: Mapping[str, Any]) -> str:
    """The digest, or why there is none."""
    if info.get("digest"):
        manifest = info["manifest"]
        return f"{info['digest']} ({manifest['objects']:,} objects in its manifest)"
    if not info["complete"]:
        return "- (recorded when the build completes)"
    return "- (no manifest: written before softcache recorded digests)"


def _provenance_rows(info: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What identifies the teacher and the dataset beyond their specs, and the packages."""
    prov = info.get("provenance")
    if not prov:
        return []
    rows = []
    for what in ("teacher", "dataset"):
        resolved = prov.get(what)
        if isinstance(resolved, Mapping) and resolved:
            rows.append((f"{what} source", _resolved_text(resolved)))
    packages = prov.get("packages")
    if isinstance(packages, Mapping) and packages:
        rows.append(("packages", ", ".join(f"{k} {v}" for k, v in sorted(packages.items()))))
    return rows


def _resolved_text(resolved: Mapping[str, Any]) -> str:
    """``module tests.helpers.specs (file .../specs.py, sha256 ab12...)`` and the like."""
    parts = []
    if resolved.get("module"):
        parts.append(f"module {resolved['module']}")
    if resolved.get("model"):
        parts.append(f"model {resolved['model']}")
    if resolved.get("file"):
        parts.append(f"file {resolved['file']}")
    if resolved.get("sha256"):
        parts.append(f"sha256 {str(resolved['sha256'])[:16]}...")
    if resolved.get("kind") == "object":
        parts.append(f"object {resolved.get('type')}")
    return ", ".join(parts) or "-"


def _codec_text(codec: Mapping[str, Any]) -> str:
    """``topk (k=8, 7-bit sqrt values, 8-bit log residual, ids elias_fano)`` and the like."""
    ids = f"ids {codec['ids']}"
    if codec["encoding"] == "sampled":
        return f"sampled ({codec['width']} draws, {ids})"
    if codec["value_bits"]:
        values = (
            f"{codec['value_bits']}-bit sqrt values, {codec['residual_bits']}-bit log residual "
            f"(floor {codec['log_floor']:g})"
        )
    else:
        values = "float16 log-probabilities"
    return f"topk (k={codec['width']}, {values}, {ids})"


def list_stores(
    prefix: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    max_depth: int | None = None,
) -> list[dict[str, Any]]:
    """The softcache stores at or under `prefix`, at any depth (or down to `max_depth` folder
    levels below it), with key metadata.

    Only metadata is read (`store_info(metadata_only=True)`): each store's `zarr.json` files,
    validated, and a partial store's `shard_done` record. Entries that are not softcache stores
    are skipped; stores that cannot be read (a newer format version, damaged metadata, missing
    arrays) are listed with their error.
    """
    found = []
    for location in find_stores(prefix, max_depth=max_depth, storage_options=storage_options):
        try:
            found.append(store_info(location, storage_options=storage_options, metadata_only=True))
        except NotAStoreError:
            continue
        except (SoftcacheError, OSError) as exc:  # a store it cannot read: say so, don't hide it
            found.append({"location": location, "error": _one_line(str(exc))})
    return found


def _one_line(message: str) -> str:
    lines = message.strip().splitlines()
    return lines[0] if lines else message


def ls_line(info: Mapping[str, Any]) -> str:
    """One line of `softcache ls`."""
    if "error" in info:
        return f"{info['location']}  ERROR: {info['error']}"
    status = (
        "complete" if info["complete"] else f"partial {info['shards_done']}/{info['shards_total']}"
    )
    if info.get("layout") == "tokens":
        codec = info["token_codec"]
        values = (
            f"sqrt{codec['value_bits']}"
            if codec["value_bits"]
            else ("float16" if codec["encoding"] == "topk" else "counts")
        )
        per_token = info["bytes_per_token"] or 0.0
        return (
            f"{info['location']}  tokens {codec['encoding']}-{codec['width']} {values}  "
            f"{info['num_samples']:,} samples  {info['num_tokens']:,} tokens  "
            f"{codec['vocab_size']:,} vocab  {per_token:,.1f} B/token  {status}  "
            f"teacher={info['teacher'].get('spec')}  dataset={info['dataset'].get('spec')}"
        )
    encoding = info["encoding"] + (f"-{info['k']}" if info["k"] else "")
    return (
        f"{info['location']}  {encoding} {info['value_dtype']}  {info['num_samples']:,} samples  "
        f"{info['num_classes']:,} classes  {info['bytes_per_sample']:,.1f} B/sample  {status}  "
        f"teacher={info['teacher'].get('spec')}  dataset={info['dataset'].get('spec')}"
    )
