"""`softcache info` and `softcache ls`: what a colleague needs before using someone else's store.

Per-token stores (format_version 3, `layout = "tokens"`) also report their token count, the mean
tokens per sample, their row coding (`token_codec`) and the bytes each token takes on disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from softcache.errors import NotAStoreError, SoftcacheError
from softcache.store import LogitStore
from softcache.store.location import is_local, is_zip, list_prefix, local_path, open_location


def store_info(
    location: str, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A summary of a store (complete or not), as plain JSON-able data.

    Raises:
        StoreFormatError: not a softcache store, or an unknown format version.
    """
    store = LogitStore.open(location, require_complete=False, storage_options=storage_options)
    meta = store.meta
    done = int(store.done_mask().sum())
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
    }
    if meta.tokens:
        codec = meta.codec
        info.update(
            num_tokens=meta.num_tokens,
            tokens_per_sample=meta.num_tokens / meta.num_samples if meta.num_samples else None,
            token_codec=codec.to_dict(),
            bytes_per_token=stored / meta.num_tokens if meta.num_tokens else None,
            bytes_per_token_raw=codec.bytes_per_token_raw(),
        )
    return info


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
        ("teacher", f"{teacher.get('spec')} ({teacher.get('num_parameters', 0):,} parameters)"),
        ("teacher sha256", str(teacher.get("state_dict_sha256", "-"))),
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
        ("teacher", f"{teacher.get('spec')} ({teacher.get('num_parameters', 0):,} parameters)"),
        ("teacher sha256", str(teacher.get("state_dict_sha256", "-"))),
        ("dataset", f"{dataset.get('spec')} ({dataset.get('num_samples', 0):,} samples)"),
        ("fingerprint", dataset.get("fingerprint") or "-"),
        ("layout", "tokens (one row per token)"),
        ("encoding", _codec_text(codec)),
        ("vocabulary", f"{codec['vocab_size']:,} tokens"),
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
    prefix: str, *, storage_options: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The softcache stores directly under `prefix` (or `prefix` itself), with key metadata.

    Entries that are not softcache stores are skipped; stores that cannot be read (for example a
    newer format version) are listed with their error.
    """
    candidates = [prefix]
    if is_local(prefix):
        root = local_path(prefix)
        if not root.is_dir():
            raise SoftcacheError(f"{prefix} is not a folder")
        candidates += [str(p) for p in sorted(root.iterdir()) if p.is_dir() or is_zip(p.name)]
    else:
        backend = open_location(prefix, read_only=True, storage_options=storage_options)
        candidates += [f"{prefix.rstrip('/')}/{name}" for name in list_prefix(backend)]
    found = []
    for location in candidates:
        try:
            found.append(store_info(location, storage_options=storage_options))
        except NotAStoreError:
            continue
        except SoftcacheError as exc:  # a softcache store it cannot read: say so, don't hide it
            found.append({"location": location, "error": str(exc)})
    return found


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
