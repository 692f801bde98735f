"""The token layout of a build: a causal-LM teacher over token sequences, one store row per token.

The store's rows are the real tokens of every sample, in dataset order (CSR: `offsets` maps
sample i to rows ``offsets[i]:offsets[i+1]``; the alignment convention is in
`softcache.data.sequences`). Shards are ranges of ``shard_rows`` tokens, so samples of any length
share them.

The build:

1. scans the dataset's inputs (no teacher) for every sample's length and hash, which fixes
   ``offsets`` and the number of rows, and writes both before any shard;
2. for each shard not yet recorded, runs the teacher over the samples that overlap its token
   range, in batches of ``batch_size`` samples that never cross the shard's sample list, codes
   the real tokens' logits on the device (`softcache.store.token_codec`) and writes the shard's
   rows. A sample that straddles shards is run by each of them (a sample longer than a shard once
   per shard it touches: keep ``shard_rows`` well above the longest sample), so every shard is
   computed alone: a resumed shard sees the same batches, and for ``sampled`` the same
   generator seed ``(seed, shard)``, and so holds the bytes an uninterrupted build writes.

A ``vllm:DIR`` teacher (`softcache.runtime.vllm`) replaces the forward pass and the device coding
of step 2: each batch of ``batch_size`` samples is one vLLM call returning every token's top-k
log-probabilities, coded as they are (`TokenCodec.encode_logprobs`); ``device`` and ``amp`` do not
apply (vLLM picks its own), and such a build runs in this process only.

Resume, the cluster and completion are the build frame's (`softcache.builder.frame`); if the
dataset changed between a killed build and its resume (another length or hash for any sample), the
resume is refused rather than mixing the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from softcache.builder.cluster import worker_inputs
from softcache.builder.teacher import load_teacher, provenance, tokenizer_record
from softcache.config import BuildConfig
from softcache.data.hashing import fingerprint
from softcache.data.sequences import (
    causal_logits,
    collate_sequences,
    item_tokens,
    offsets_of,
    scan,
)
from softcache.errors import DatasetFormatError, DatasetMismatchError, TeacherOutputError
from softcache.runtime.devices import autocast
from softcache.runtime.progress import Progress
from softcache.runtime.specs import dataset_from, describe, is_vllm_spec, vllm_directory
from softcache.runtime.vllm import VllmTeacher, load_vllm_teacher
from softcache.store import LogitStore, StoreMeta, token_arrays
from softcache.store.token_codec import TokenCodec
from softcache.store.writer import ShardWriter


def _token_shard_task(config: BuildConfig, shards: Sequence[int], teacher_sha256: str) -> int:
    """On a Dask worker: code and write `shards` not yet recorded; return their tokens."""
    teacher, dataset, device = worker_inputs(
        config, teacher_sha256, lambda c: dataset_from(c.dataset, "dataset")
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
    teacher: nn.Module | VllmTeacher,
    dataset: Any,
    store: LogitStore,
    offsets: np.ndarray,
    shard: int,
    codec: TokenCodec,
    device: torch.device,
    config: BuildConfig,
) -> dict[str, np.ndarray]:
    """The coded rows of one shard, as host arrays keyed by array name.

    A vLLM teacher returns each token's top-k log-probabilities, coded as they are
    (`TokenCodec.encode_logprobs`); a module's logits are coded on the device.
    """
    start, stop = store.shard_bounds(shard)
    first, last = shard_samples(offsets, start, stop)
    samples = [i for i in range(first, last) if offsets[i + 1] > offsets[i]]
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence([codec.seed, shard]).generate_state(1)[0]))
    pieces: list[dict[str, np.ndarray]] = []
    for b in range(0, len(samples), config.batch_size):
        batch_ids = samples[b : b + config.batch_size]
        if isinstance(teacher, VllmTeacher):
            prompts = [item_tokens(dataset[i], i)[0] for i in batch_ids]
            ids, logprobs = teacher.score(prompts, first=batch_ids[0])
            coded = codec.encode_logprobs(ids, logprobs)
            pieces.append({name: t.numpy() for name, t in coded.items()})
            continue
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
    teacher: nn.Module | VllmTeacher,
    dataset: Any,
    lengths: np.ndarray,
    device: torch.device,
    config: BuildConfig,
) -> int:
    """Run the first non-empty sample through the teacher to learn V (and fail early)."""
    first = int(np.flatnonzero(lengths)[0])
    if isinstance(teacher, VllmTeacher):
        teacher.score([item_tokens(dataset[first], first)[0]], first=first)
        return teacher.vocab_size
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


def _load_token_teacher(config: BuildConfig, device: torch.device) -> nn.Module | VllmTeacher:
    """A ``vllm:DIR`` spec's engine (asked for ``top_k`` log-probs), else the module on `device`."""
    if is_vllm_spec(config.teacher):
        return load_vllm_teacher(vllm_directory(config.teacher), top_k=config.top_k)
    return load_teacher(config.teacher, device)


def _check_same_samples(store: LogitStore, lengths: np.ndarray, hashes: np.ndarray) -> None:
    changed = store.changed_samples(lengths, hashes)
    if len(changed):
        raise DatasetMismatchError(
            f"the partial store at {store.location} was built from other data: {len(changed)} "
            f"sample(s) differ in length or tokens (first: {changed[0]}); resume it with the "
            "original dataset, or pass --overwrite to start again"
        )


# ---- the strategy -------------------------------------------------------------------------------


class TokenBuild:
    """The build frame's strategy for token stores (see `softcache.builder.frame.BuildLayout`)."""

    unit = "tokens"
    label = "build tokens"

    def __init__(self, config: BuildConfig, device: torch.device, *, progress: bool) -> None:
        self.config = config
        self.device = device
        self.progress = progress
        self.dataset: Any = None
        self.teacher: nn.Module | VllmTeacher | None = None
        self.codec: TokenCodec | None = None
        self.offsets = np.zeros(1, dtype=np.int64)
        self.hashes = np.zeros(0, dtype=np.uint64)

    def prepare(self) -> StoreMeta:
        """Load the dataset and the teacher, scan every sample's tokens, probe V, and describe
        the store to write."""
        config = self.config
        self.dataset = dataset_from(config.dataset, "dataset")
        self.teacher = _load_token_teacher(config, self.device)
        lengths, self.hashes = scan(self.dataset, progress=self.progress)
        self.offsets = offsets_of(lengths)
        if self.offsets[-1] == 0:
            raise DatasetFormatError(f"dataset {describe(config.dataset)!r} holds no tokens")
        self.lengths = lengths
        vocab = _probe_vocab(self.teacher, self.dataset, lengths, self.device, config)
        codec = TokenCodec(
            encoding=config.encoding,
            width=config.top_k if config.encoding == "topk" else config.draws,
            vocab_size=vocab,
            temperature=config.lm_temperature,
            ids=config.id_coding,
            value_bits=config.value_bits if config.encoding == "topk" else 0,
            seed=config.seed,
        )
        self.codec = codec
        num_samples = len(self.dataset)
        return StoreMeta(
            encoding=config.encoding,
            num_classes=codec.vocab_size,
            k=codec.width,
            value_dtype="float16",
            temperatures=(config.lm_temperature,),
            layout="tokens",
            num_tokens=int(self.offsets[-1]),
            token_codec=codec.to_dict(),
            tokenizer=tokenizer_record(config, vocab),
            **provenance(config, self.teacher, num_samples),
        )

    def on_open(self, store: LogitStore, done: np.ndarray) -> None:
        """Write the per-sample arrays, or check that a resumed store was built from this data."""
        if done.any():
            _check_same_samples(store, self.lengths, self.hashes)
        else:  # new, or killed before its first shard: (re)write the per-sample arrays
            store.write_samples(self.offsets, self.hashes)

    def release_teacher(self) -> None:
        self.teacher = None  # the cluster's workers load their own

    def run(
        self, store: LogitStore, todo: Sequence[int], writer: ShardWriter, bar: Progress
    ) -> None:
        assert self.teacher is not None and self.codec is not None
        for shard in todo:
            rows = _code_shard(
                self.teacher, self.dataset, store, self.offsets, shard, self.codec, self.device,
                self.config,
            )  # fmt: skip
            writer.submit(shard, rows)
            bar.update(store.rows_in([shard]))

    @staticmethod
    def shard_task(config: BuildConfig, shards: Sequence[int], teacher_sha256: str) -> int:
        """On a Dask worker: compute and write `shards` not yet recorded; return their rows."""
        return _token_shard_task(config, shards, teacher_sha256)

    def fingerprint(self, store: LogitStore) -> str:
        return fingerprint(self.hashes, self.offsets)
