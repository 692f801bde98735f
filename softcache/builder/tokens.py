"""`softcache build --lm`: run a causal-LM teacher over token sequences, one store row per token.

The store's rows are the real tokens of every sample, in dataset order (CSR: `offsets` maps
sample i to rows ``offsets[i]:offsets[i+1]``; the alignment convention is in
`softcache.sequences`). Shards are ranges of ``shard_rows`` tokens, so samples of any length
share them.

The build:

1. scans the dataset's inputs (no teacher) for every sample's length and hash, which fixes
   ``offsets`` and the number of rows, and writes both before any shard;
2. for each shard not yet recorded, runs the teacher over the samples that overlap its token
   range, in batches of ``batch_size`` samples that never cross the shard's sample list, codes
   the real tokens' logits on the device (`softcache.token_codec`) and writes the shard's rows.
   A sample that straddles shards is run by each of them (a sample longer than a shard once per
   shard it touches: keep ``shard_rows`` well above the longest sample), so every shard is
   computed alone: a resumed shard sees the same batches, and for ``sampled`` the same
   generator seed ``(seed, shard)``, and so holds the bytes an uninterrupted build writes.

With ``workers`` or ``dask_scheduler`` the shards are Dask tasks, as in a row build (ranges of
whole shards; each worker loads the teacher once and checks its weights hash); the store is the
one a single process writes. Resume works as for row stores (`softcache.build`): killed at any moment, the same command skips
the recorded shards. If the dataset changed in between (another length or hash for any sample),
it refuses to mix the two.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from softcache._version import __version__
from softcache.builder.rows import (
    BuildResult,
    load_teacher,
    run_on_cluster,
    state_dict_sha256,
    worker_inputs,
)
from softcache.config import BuildConfig
from softcache.data.hashing import fingerprint
from softcache.data.sequences import causal_logits, collate_sequences, offsets_of, scan
from softcache.errors import DatasetFormatError, DatasetMismatchError, TeacherOutputError
from softcache.runtime.devices import autocast, resolve_device
from softcache.runtime.progress import Progress
from softcache.runtime.specs import instantiate
from softcache.store import LogitStore, StoreMeta, token_arrays
from softcache.store.output import open_output
from softcache.store.token_codec import TokenCodec
from softcache.store.writer import ShardWriter


def build_tokens(
    config: BuildConfig, *, progress: bool = True, client: Any | None = None
) -> BuildResult:
    """Run a causal-LM teacher over a sequence dataset and write (or finish) a per-token store.

    Args:
        config: the build configuration, with ``lm = True``.
        progress: show progress bars on stderr.
        client: a `distributed.Client` to compute the shards on (overrides `config.workers` and
            `config.dask_scheduler`); its workers must import softcache and the specs.

    Returns:
        A `BuildResult` (``samples_computed`` counts the tokens this run coded).

    Raises:
        SoftcacheError: bad specs, items or teacher output, or a partial store built from
            other data; shards written before the error stay written.
    """
    device = resolve_device(config.device)
    dataset = instantiate(config.dataset, "dataset")
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise DatasetFormatError(
            f"dataset {config.dataset!r} must be map-style (with __len__ and __getitem__)"
        )
    teacher = load_teacher(config.teacher, device)
    lengths, hashes = scan(dataset, progress=progress)
    offsets = offsets_of(lengths)
    if offsets[-1] == 0:
        raise DatasetFormatError(f"dataset {config.dataset!r} holds no tokens")
    codec = TokenCodec(
        encoding=config.encoding,
        width=config.top_k if config.encoding == "topk" else config.draws,
        vocab_size=_probe_vocab(teacher, dataset, lengths, device, config),
        temperature=config.lm_temperature,
        ids=config.id_coding,
        value_bits=config.value_bits if config.encoding == "topk" else 0,
        seed=config.seed,
    )
    meta = StoreMeta(
        encoding=config.encoding,
        num_classes=codec.vocab_size,
        k=codec.width,
        num_samples=len(dataset),
        value_dtype="float16",
        temperatures=(config.lm_temperature,),
        shard_rows=config.shard_rows,
        chunk_rows=config.effective_chunk_rows,
        teacher={
            "spec": config.teacher,
            "num_parameters": sum(p.numel() for p in teacher.parameters()),
            "state_dict_sha256": state_dict_sha256(teacher),
        },
        dataset={"spec": config.dataset, "num_samples": len(dataset), "fingerprint": None},
        build_config={k: v for k, v in config.to_dict().items() if k != "overwrite"},
        softcache_version=__version__,
        layout="tokens",
        num_tokens=int(offsets[-1]),
        token_codec=codec.to_dict(),
    )
    store = open_output(
        config.output,
        meta,
        overwrite=config.overwrite,
        compression_level=config.compression_level,
        storage_options=config.storage_options,
    )
    done = store.done_mask()
    if done.any():
        _check_same_samples(store, lengths, hashes)
    else:  # new, or killed before its first shard: (re)write the per-sample arrays
        store.write_samples(offsets, hashes)
    todo = [s for s in range(meta.num_shards) if not done[s]]
    rows_done = store.rows_in(np.flatnonzero(done).tolist())

    t0 = time.perf_counter()
    bar = Progress(
        meta.num_rows, "build tokens", enabled=progress, initial=rows_done, unit="tokens"
    )
    if client is not None or config.distributed:
        del teacher  # the workers load their own
        run_on_cluster(
            client, config, store, todo, bar, gpus=device.type == "cuda", task=_token_shard_task
        )
    else:
        with ShardWriter(store, threads=config.writer_threads) as writer:
            for shard in todo:
                rows = _code_shard(teacher, dataset, store, offsets, shard, codec, device, config)
                writer.submit(shard, rows)
                bar.update(store.rows_in([shard]))
    bar.close()
    seconds = time.perf_counter() - t0
    store.mark_complete(fingerprint(hashes, offsets))
    return BuildResult(
        store=store.location,
        num_samples=len(dataset),
        shards_total=meta.num_shards,
        shards_written=len(todo),
        shards_skipped=meta.num_shards - len(todo),
        bytes_stored=store.nbytes_stored(),
        seconds=seconds,
        samples_computed=meta.num_rows - rows_done,
    )


def _token_shard_task(config: BuildConfig, shards: Sequence[int], teacher_sha256: str) -> int:
    """On a Dask worker: code and write `shards` not yet recorded; return their tokens."""
    teacher, dataset, device = worker_inputs(
        config, teacher_sha256, lambda c: instantiate(c.dataset, "dataset")
    )
    store = LogitStore.open(
        config.output, mode="r+", require_complete=False, storage_options=config.storage_options
    )
    if len(dataset) != store.meta.num_samples:
        raise DatasetFormatError(
            f"dataset {config.dataset!r} has {len(dataset)} samples on a Dask worker but "
            f"{store.meta.num_samples} where the build started; give every worker the same data"
        )
    offsets, codec = store.offsets(), store.meta.codec
    done = store.done_mask()
    with ShardWriter(store, threads=config.writer_threads) as writer:
        for shard in shards:
            if not done[shard]:  # a rerun task skips what its first worker recorded
                rows = _code_shard(teacher, dataset, store, offsets, shard, codec, device, config)
                writer.submit(shard, rows)
    return store.rows_in(shards)


def shard_samples(offsets: np.ndarray, start: int, stop: int) -> tuple[int, int]:
    """Samples ``[first, last)`` whose tokens overlap rows ``[start, stop)`` (``start < stop``).

    Empty samples inside the range are included (they own no rows); ``first`` is the sample
    that holds row ``start``.
    """
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    last = int(np.searchsorted(offsets, stop, side="left"))
    return first, last


def _code_shard(
    teacher: nn.Module,
    dataset: Any,
    store: LogitStore,
    offsets: np.ndarray,
    shard: int,
    codec: TokenCodec,
    device: torch.device,
    config: BuildConfig,
) -> dict[str, np.ndarray]:
    """The coded rows of one shard, as host arrays keyed by array name."""
    start, stop = store.shard_bounds(shard)
    first, last = shard_samples(offsets, start, stop)
    samples = [i for i in range(first, last) if offsets[i + 1] > offsets[i]]
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence([codec.seed, shard]).generate_state(1)[0]))
    pieces: list[dict[str, np.ndarray]] = []
    for b in range(0, len(samples), config.batch_size):
        batch_ids = samples[b : b + config.batch_size]
        batch = collate_sequences([dataset[i] for i in batch_ids]).to(device)
        with torch.inference_mode(), autocast(device, config.amp):
            logits = causal_logits(teacher, batch.input_ids, batch.attention_mask)
        if logits.shape[2] != codec.vocab_size:
            raise TeacherOutputError(
                f"the teacher returned {logits.shape[2]} logits per token for samples "
                f"{batch_ids[0]}..{batch_ids[-1]}, but {codec.vocab_size} for sample 0"
            )
        rows = logits[batch.attention_mask].float()
        if not bool(torch.isfinite(rows).all()):
            raise TeacherOutputError(
                f"the teacher returned non-finite logits for samples {batch_ids[0]}..{batch_ids[-1]}"
            )
        coded = codec.encode(rows, generator=generator)
        pieces.append({name: t.cpu().numpy() for name, t in coded.items()})
    lo, hi = start - int(offsets[first]), stop - int(offsets[first])
    return token_arrays(
        {name: np.concatenate([p[name] for p in pieces])[lo:hi] for name in pieces[0]}
    )


def _probe_vocab(
    teacher: nn.Module, dataset: Any, lengths: np.ndarray, device: torch.device, config: BuildConfig
) -> int:
    """Run the first non-empty sample through the teacher to learn V (and fail early)."""
    first = int(np.flatnonzero(lengths)[0])
    batch = collate_sequences([dataset[first]]).to(device)
    with torch.inference_mode(), autocast(device, config.amp):
        try:
            logits = causal_logits(teacher, batch.input_ids, batch.attention_mask)
        except TeacherOutputError:
            raise
        except Exception as exc:
            raise TeacherOutputError(
                f"the teacher failed on sample {first} (input_ids {tuple(batch.input_ids.shape)}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    return int(logits.shape[2])


def _check_same_samples(store: LogitStore, lengths: np.ndarray, hashes: np.ndarray) -> None:
    changed = store.changed_samples(lengths, hashes)
    if len(changed):
        raise DatasetMismatchError(
            f"the partial store at {store.location} was built from other data: {len(changed)} "
            f"sample(s) differ in length or tokens (first: {changed[0]}); resume it with the "
            "original dataset, or pass --overwrite to start again"
        )
