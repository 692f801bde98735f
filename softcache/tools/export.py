"""Export a top-k token store to axolotl's KD column layout, as a Hugging Face `datasets` dataset.

axolotl's knowledge-distillation plugin trains from a dataset whose rows carry, besides
``input_ids`` / ``labels`` / ``attention_mask``, three ``(L, k)`` columns per sample
(`axolotl/integrations/kd/chat_template.py`, ``transform_logprobs``):

- ``target_token_ids``: the teacher's top-k ids at each position;
- ``target_logprobs``: their log-probabilities, renormalised over the k kept ids;
- ``target_mask``: 1 where the position has a target, 0 elsewhere.

Position ``p`` of axolotl's columns is the teacher's distribution *of token p* (vLLM's prompt
log-probabilities, whose position 0 has none: it is padded with ``-inf``, ids ``0..k-1`` and mask
0); softcache's row ``offsets[i] + j`` is the distribution of the token after position ``j``. So
softcache row ``j`` becomes axolotl position ``j + 1``, and softcache's last row of a sample (the
prediction after its last token) has no place and is left out. ``labels`` are the input ids (every
position trains; axolotl's trainer shifts). Sampled stores have no top-k and are refused.

`datasets` is imported when `export_axolotl` runs (``pip install datasets``). On the command
line: ``softcache export-axolotl STORE --dataset SPEC --output DIR`` (`export_axolotl_store`).
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from softcache.data.hashing import hash_rows
from softcache.data.sequences import item_tokens
from softcache.errors import ConfigError, DatasetMismatchError, SoftcacheError, StoreExistsError
from softcache.runtime.specs import dataset_from
from softcache.store import LogitStore, decode_token_rows


def export_axolotl_store(
    location: str,
    dataset: Any,
    output: str | Path,
    *,
    storage_options: Mapping[str, Any] | None = None,
    expect_digest: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """`export_axolotl` from a store's location and a dataset spec: what ``softcache
    export-axolotl`` runs.

    Args:
        location: the store (a folder, a URL, a ``.zip``).
        dataset: the dataset spec (or the dataset) the store was built from.
        output: the folder to write; an existing one is refused unless ``overwrite``, and then
            replaced only if it holds a saved `datasets` dataset (its ``state.json``).
        storage_options: fsspec options for a store URL.
        expect_digest: refuse a store whose digest is not this one (`LogitStore.open`).
        overwrite: replace an earlier export at ``output``.

    Returns:
        ``{"store", "output", "samples", "k"}``.
    """
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise StoreExistsError(
                f"{out} already exists; pass --overwrite to replace an earlier export, or choose "
                "another --output"
            )
        if not (out / "state.json").is_file():
            raise StoreExistsError(
                f"{out} is not a saved `datasets` dataset (no state.json); --overwrite replaces "
                "only an earlier export: choose another --output"
            )
        shutil.rmtree(out)
    store = LogitStore.open(location, storage_options=storage_options, expect_digest=expect_digest)
    samples = export_axolotl(store, dataset_from(dataset, "dataset"), out)
    return {"store": location, "output": str(out), "samples": samples, "k": store.meta.k}


def export_axolotl(store: LogitStore, dataset: Any, output: str | Path) -> int:
    """Write ``store``'s rows with ``dataset``'s inputs as a `datasets` dataset on disk.

    Args:
        store: a complete top-k token store.
        dataset: the map-style sequence dataset the store was built from (checked by length and
            hash, sample by sample).
        output: the folder `datasets.Dataset.save_to_disk` writes (`datasets.load_from_disk`
            reads it).

    Returns:
        The number of samples written.

    Raises:
        ConfigError: not a top-k token store, or `datasets` is not installed.
        DatasetMismatchError: the dataset is not the one the store was built from.
    """
    meta = store.meta
    if not meta.tokens or meta.codec.encoding != "topk":
        raise ConfigError(
            f"store {store.location} is a {'sampled' if meta.tokens else 'row'} store; the axolotl "
            "export needs a top-k token store (softcache build --lm --encoding topk)"
        )
    if len(dataset) != meta.num_samples:
        raise DatasetMismatchError(
            f"the dataset has {len(dataset)} samples but store {store.location} was built from "
            f"{meta.num_samples}; give the dataset the store was built from"
        )
    try:
        datasets = importlib.import_module("datasets")
    except ImportError as exc:
        raise ConfigError(
            f"the axolotl export writes a Hugging Face dataset, and `datasets` does not import "
            f"here ({exc}); install it with: pip install datasets"
        ) from exc
    # A private cache: `from_generator` would otherwise keep a copy under ~/.cache, keyed by a
    # fingerprint of its arguments that another store could share.
    with tempfile.TemporaryDirectory() as cache:
        try:
            table = datasets.Dataset.from_generator(
                _rows, gen_kwargs={"store": store, "dataset": dataset}, cache_dir=cache
            )
        except datasets.exceptions.DatasetGenerationError as exc:
            if isinstance(exc.__cause__, SoftcacheError):  # ours, raised inside the generator
                raise exc.__cause__ from None
            raise
        table.save_to_disk(str(output))
        return len(table)


def _rows(store: LogitStore, dataset: Any) -> Iterator[dict[str, Any]]:
    """One axolotl row per sample, reading the store a shard range at a time."""
    meta = store.meta
    k = meta.codec.width
    offsets = store.offsets()
    hashes = store.sample_hashes()
    cached: tuple[int, int, dict[str, torch.Tensor]] | None = None
    for i in range(len(dataset)):
        ids, _ = item_tokens(dataset[i], i)
        r0, r1 = int(offsets[i]), int(offsets[i + 1])
        if len(ids) != r1 - r0 or int(hash_rows(ids.reshape(1, -1))[0]) != int(hashes[i]):
            raise DatasetMismatchError(
                f"sample {i} differs from the one store {store.location} was built from; give "
                "the dataset the store was built from, in its order"
            )
        if cached is None or not cached[0] <= r0 <= r1 <= cached[1]:
            start = (r0 // meta.shard_rows) * meta.shard_rows
            stop = min(max(r1, start + meta.shard_rows), meta.num_rows)
            cached = (start, stop, decode_token_rows(store.read_rows(start, stop), meta))
        start, _, decoded = cached
        values = decoded["values"][r0 - start : r1 - start, :k]
        indices = decoded["indices"][r0 - start : r1 - start, :k]
        logprobs = values - torch.logsumexp(values, dim=1, keepdim=True)
        n = len(ids)
        pad = [[-float("inf")] * k] if n else []
        yield {
            "input_ids": ids.tolist(),
            "attention_mask": [1] * n,
            "labels": ids.tolist(),
            "target_token_ids": ([list(range(k))] if n else []) + indices[: n - 1].tolist(),
            "target_logprobs": pad + logprobs[: n - 1].tolist(),
            "target_mask": ([[0] * k] if n else []) + [[1] * k] * max(n - 1, 0),
        }
