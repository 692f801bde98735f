"""LM timings: `build --lm` next to a bare teacher loop, and `train --lm` offline next to hard.

Two workloads, both causal LMs over fixed-length token sequences:

- **bytes** (V = 256): the bundled byte-level LM (`pipelines.textlm`): the teacher architecture (4
  layers, d = 128) with *random* weights from a fixed seed (`byte_teacher`), the bundled student
  (`pipelines.textlm.models:student`), over 128-byte windows of the stdlib corpus
  (`pipelines.textlm.data.windows`). A timing needs no trained teacher: the forward pass costs the
  same whatever the weights, so the section never trains one (`python -m pipelines.textlm.prepare`
  does, in minutes).
- **v32k** (V = 32,768): a synthetic LM-sized vocabulary. Teacher (`teacher_32k`: 2 textlm blocks,
  d = 128) and student (`student_32k`: 1 block, d = 32) share one shape, a token embedding tied to
  the output layer around pre-norm causal transformer blocks (`TokenTransformer`), so the output
  layer and everything per logit dominate; inputs are uniform random ids (`SyntheticTokens`), since
  timings depend on shapes, not on what is learnt.

**build --lm / bare teacher loop.** `softcache.builder.build(BuildConfig(lm=True, ...))` with
`encoding="topk"` (k = 32, fp16 values, Elias-Fano ids) and `encoding="sampled"` (32 draws), from
call to return: the scan that hashes every sequence, the probe, the teacher, the per-token coding
(log-softmax, top-k and residual, or the draws and the entropy), the host copies, zstd and the
writes. The bare loop is what any inference script pays: the same teacher and dataset instantiated
from the same specs, the same batches of sequences (`collate_sequences`, `batch_size` sequences in
dataset order, which are the build's batches here because every shard holds a whole number of
batches of the fixed-length sequences), `causal_logits` under `torch.inference_mode()`, nothing
kept. The build's coding runs per logit, so the ratio depends on how much the teacher costs per
logit: the v32k teacher is cheap for its vocabulary (~4.6 M multiply-adds per token, most of them
the output layer; an LM of 125 M to 7 B parameters costs 30x to 1,500x that per token), so its
ratio is an upper bound. The detail gives the bare loop's and the build's extra time per token: the
extra carries over to other teachers of the same vocabulary on the same device. There is no stated
goal; the figures are held to 1.10.

**train --lm offline / hard, tokens/s.** `softcache.trainer.train(TrainConfig(lm=True, ...))` with
`mode="offline"` (per-token KD from the top-32 store, `topk_residual_kl`) and `mode="hard"`
(next-token cross-entropy), both given the same `store=` so the plan, blocks and batches are the
same, with the same student, seed, optimiser, batch size and epochs. The figure is offline tokens/s
over hard tokens/s (`metrics["tokens_per_second"]`, the mean of the epochs after the first, which
pays the first reads and allocator growth). Goal (the issue's): offline >= 0.90 x hard. Each run's
`data_wait_fraction` (the share of its timed epochs the step spent waiting for its batch) is
reported beside it. `hash_check="off"` skips the pass that hashes every sample before training:
it happens before the first epoch, outside the tokens/s, and would only lengthen the section.
"""

from __future__ import annotations

import functools
import itertools
import shutil
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from benchmarks.harness import Figure, median, ratio_figure, timed, wait_figure
from benchmarks.models import _seeded
from pipelines.textlm.data import Spans, windows
from pipelines.textlm.models import Block, untrained_teacher
from softcache.builder import BuildResult, build
from softcache.config import BuildConfig, TrainConfig
from softcache.data.sequences import causal_logits, collate_sequences
from softcache.runtime.specs import instantiate
from softcache.store import LogitStore
from softcache.trainer import train

BUILD_GOAL = 1.10  # no stated goal: what a per-token store may reasonably add to inference
TRAIN_GOAL = 0.90  # offline tokens/s >= 0.90 x hard tokens/s
TOP_K = 32
DRAWS = 32
VOCAB_32K = 32768
SEQ_32K = 64  # tokens per synthetic sequence
MAX_LEN_32K = 128
BYTES_QUICK, BYTES_FULL = 64, 256  # 128-byte windows: 8,192 and 32,768 tokens
TOKENS_QUICK, TOKENS_FULL = 16, 32  # 64-token sequences: 1,024 and 2,048 tokens


# ---- models and datasets (specs: `benchmarks.lm:NAME`) -------------------------------------------


class TokenTransformer(nn.Module):
    """A causal transformer over `vocab` ids: `input_ids (B, L) int64 -> logits (B, L, vocab)`.

    The textlm blocks (`pipelines.textlm.models.Block`: pre-norm, causal attention, 4x GELU MLP)
    between a token embedding and an output layer tied to it, with learned positions.
    """

    def __init__(
        self, *, vocab: int, layers: int, dim: int, heads: int, max_len: int = MAX_LEN_32K
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def byte_teacher() -> nn.Module:
    """The textlm teacher's architecture (4 layers, d = 128, V = 256) with seeded random weights."""
    return _seeded(untrained_teacher, 10)


def teacher_32k() -> nn.Module:
    """2 blocks, d = 128, V = 32,768 (4.6 M parameters, ~4.6 M multiply-adds per token)."""
    return _seeded(lambda: TokenTransformer(vocab=VOCAB_32K, layers=2, dim=128, heads=4), 11)


def student_32k() -> nn.Module:
    """1 block, d = 32, V = 32,768 (1.1 M parameters, ~1.1 M multiply-adds per token)."""
    return TokenTransformer(vocab=VOCAB_32K, layers=1, dim=32, heads=4)


class SyntheticTokens(Dataset):
    """`num_sequences` sequences of uniform random ids in `[0, vocab)`, held in memory.

    Item `i` is `(input_ids (length,), labels (length,))` int64, the labels being the inputs
    shifted by one (the last label is one more random id).
    """

    def __init__(self, num_sequences: int, length: int, vocab: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(vocab, (num_sequences, length + 1), generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.tokens[int(i)]
        return row[:-1], row[1:]


@functools.cache
def _tokens(num_sequences: int) -> SyntheticTokens:
    return SyntheticTokens(num_sequences, SEQ_32K, VOCAB_32K, seed=12)


def tokens_32k_quick() -> SyntheticTokens:
    """16 sequences of 64 random ids in [0, 32,768): 1,024 tokens."""
    return _tokens(TOKENS_QUICK)


def tokens_32k_full() -> SyntheticTokens:
    """32 sequences of 64 random ids in [0, 32,768): 2,048 tokens."""
    return _tokens(TOKENS_FULL)


def bytes_quick() -> Spans:
    """64 windows of 128 bytes of the textlm training split (8,192 tokens), evenly spread."""
    return windows("train", BYTES_QUICK)


def bytes_full() -> Spans:
    """256 windows of 128 bytes of the textlm training split (32,768 tokens), evenly spread."""
    return windows("train", BYTES_FULL)


# ---- workloads -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LMWorkload:
    """A causal-LM teacher, student and sequence dataset, and how to batch them.

    Attributes:
        label: names the figures ("bytes V=256") ...
        key: ... and prefixes the case names ("bytes": cases `bytes-bare`, `bytes-topk`, ...).
        teacher: teacher spec.
        student: student spec.
        dataset: dataset spec (fixed-length sequences).
        build_batch: sequences per teacher batch (the build and the bare loop alike).
        train_batch: sequences per student batch.
        epochs: epochs per training run (the first is warm-up).
        shard_rows: tokens per shard: a multiple of `build_batch` sequences, so that the build's
            batches (which never cross a shard) are the bare loop's.
        device: where the teacher and the student run.
    """

    label: str
    key: str
    teacher: str
    student: str
    dataset: str
    build_batch: int
    train_batch: int
    epochs: int = 3
    shard_rows: int = 4096
    device: str = "cpu"

    def build_config(self, encoding: str, output: Path) -> BuildConfig:
        return BuildConfig(
            teacher=self.teacher,
            dataset=self.dataset,
            output=str(output),
            lm=True,
            encoding=encoding,
            top_k=TOP_K,
            draws=DRAWS,
            batch_size=self.build_batch,
            shard_rows=self.shard_rows,
            device=self.device,
            overwrite=True,
        )

    def train_config(self, mode: str, store: Path, output: Path) -> TrainConfig:
        return TrainConfig(
            student=self.student,
            dataset=self.dataset,
            store=str(store),
            mode=mode,
            lm=True,
            epochs=self.epochs,
            batch_size=self.train_batch,
            seed=0,
            device=self.device,
            output=str(output),
            overwrite=True,
            hash_check="off",
        )


def bytes_workload(dataset: str, epochs: int, device: str = "cpu") -> LMWorkload:
    """The byte LM: random-weight textlm teacher, bundled student, 128-byte windows."""
    return LMWorkload(
        "bytes V=256",
        "bytes",
        "benchmarks.lm:byte_teacher",
        "pipelines.textlm.models:student",
        dataset,
        build_batch=32,  # 4,096 tokens: one batch per shard
        train_batch=32,
        epochs=epochs,
        device=device,
    )


def v32k_workload(dataset: str, epochs: int, device: str = "cpu") -> LMWorkload:
    """The 32k-vocabulary LM over synthetic 64-token sequences."""
    return LMWorkload(
        f"V={VOCAB_32K}",
        "v32k",
        "benchmarks.lm:teacher_32k",
        "benchmarks.lm:student_32k",
        dataset,
        build_batch=16,  # 1,024 tokens (128 MB of float32 logits); four batches per shard
        train_batch=8,
        epochs=epochs,
        device=device,
    )


def bare_lm_loop(teacher_spec: str, dataset_spec: str, batch_size: int, device: str) -> None:
    """The baseline: the teacher over every batch of sequences, in dataset order, nothing kept."""
    teacher = instantiate(teacher_spec, "teacher").eval().to(device)
    dataset = instantiate(dataset_spec, "dataset")
    cuda = device.startswith("cuda")
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collate_sequences(items).to(device, non_blocking=cuda)
            causal_logits(teacher, batch.input_ids, batch.attention_mask)


# ---- benches -------------------------------------------------------------------------------------


class LMBuildBench:
    """Cases `<key>-bare`, `<key>-topk` and `<key>-sampled`; every build writes a fresh store."""

    warmup = True

    def __init__(self, workload: LMWorkload, workdir: Path) -> None:
        self.workload = workload
        self.workdir = workdir
        self.results: dict[str, BuildResult] = {}
        self.tokens = 0
        self.sequences = len(instantiate(workload.dataset, "dataset"))
        self._count = itertools.count()

    def _build(self, encoding: str) -> float:
        w = self.workload
        path = self.workdir / f"lm-build-{w.key}-{encoding}-{next(self._count)}.zarr"
        config = w.build_config(encoding, path)
        seconds = timed(lambda: self.results.__setitem__(encoding, build(config, progress=False)))
        self.tokens = LogitStore.open(path).meta.num_tokens
        shutil.rmtree(path)
        return seconds

    def cases(self) -> dict[str, Callable[[], float]]:
        w = self.workload
        return {
            f"{w.key}-bare": lambda: timed(
                lambda: bare_lm_loop(w.teacher, w.dataset, w.build_batch, w.device)
            ),
            f"{w.key}-topk": lambda: self._build("topk"),
            f"{w.key}-sampled": lambda: self._build("sampled"),
        }

    def figures(self, samples: dict[str, list[float]]) -> list[Figure]:
        w = self.workload
        tokens = self.tokens
        bare = f"{w.key}-bare"
        per_token = median(samples[bare]) / tokens
        figures = []
        for encoding, what in (("topk", f"top-{TOP_K}"), ("sampled", f"sampled {DRAWS}")):
            case = f"{w.key}-{encoding}"
            extra = median(samples[case]) / tokens - per_token
            note = (
                f"T={tokens:,} tokens in batches of {w.build_batch} x "
                f"{tokens // self.sequences}; per token: bare {per_token * 1e6:.1f} µs, build "
                f"{extra * 1e6:+.1f} µs; {self.results[encoding].bytes_stored / tokens:.1f} "
                "B/token on disk"
            )
            figures.append(
                ratio_figure(
                    f"lm build / bare loop, {w.label}, {what}",
                    samples,
                    case,
                    bare,
                    goal=BUILD_GOAL,
                    note=note,
                )
            )
        return figures


class LMTrainBench:
    """Cases `<key>-hard` and `<key>-offline` (tokens/s), over one top-k store built at setup."""

    warmup = False  # each run discards its own first epoch

    def __init__(self, workload: LMWorkload, workdir: Path) -> None:
        self.workload = workload
        self.workdir = workdir
        self.store = workdir / f"lm-train-{workload.key}.zarr"
        build(workload.build_config("topk", self.store), progress=False)
        self.tokens = LogitStore.open(self.store).meta.num_tokens
        self.wait: dict[str, list[float]] = {}
        self._count = itertools.count()

    def _train(self, mode: str) -> float:
        w = self.workload
        output = self.workdir / "lm-runs" / f"{w.key}-{mode}-{next(self._count)}"
        metrics = train(w.train_config(mode, self.store, output), progress=False).metrics
        shutil.rmtree(output)
        self.wait.setdefault(f"{w.key}-{mode}", []).extend(metrics["data_wait_fraction"][1:])
        return statistics.mean(metrics["tokens_per_second"][1:])

    def cases(self) -> dict[str, Callable[[], float]]:
        key = self.workload.key
        return {
            f"{key}-hard": lambda: self._train("hard"),
            f"{key}-offline": lambda: self._train("offline"),
        }

    def figures(self, samples: dict[str, list[float]]) -> list[Figure]:
        w = self.workload
        note = (
            f"T={self.tokens:,} tokens/epoch, batch {w.train_batch} sequences, "
            f"{w.epochs - 1} timed epoch(s)/run, top-{TOP_K} store"
        )
        figures = [
            throughput_figure(
                f"lm offline / hard tokens/s, {w.label}",
                samples,
                f"{w.key}-offline",
                f"{w.key}-hard",
                goal=TRAIN_GOAL,
                note=note,
            )
        ]
        figures.extend(
            wait_figure(
                f"lm data wait fraction, {w.label}, {name.removeprefix(w.key + '-')}", name, values
            )
            for name, values in self.wait.items()
        )
        return figures


def throughput_figure(
    name: str,
    samples: Mapping[str, Sequence[float]],
    over: str,
    under: str,
    *,
    goal: float | None,
    note: str = "",
) -> Figure:
    """median(samples[over]) / median(samples[under]) of throughputs (higher is better), with the
    per-round spread: `ratio_figure` for tokens/s rather than seconds."""
    a, b = median(samples[over]), median(samples[under])
    rounds = [x / y for x, y in zip(samples[over], samples[under], strict=False) if y > 0]
    spread = f"rounds {min(rounds):.3f}-{max(rounds):.3f}" if len(rounds) > 1 else ""
    detail = f"{over} {a:,.0f} / {under} {b:,.0f} tokens/s, median of {len(samples[over])}"
    return Figure(
        name=name,
        value=a / b,
        goal=goal,
        detail="; ".join(part for part in (detail, spread, note) if part),
        samples={over: list(samples[over]), under: list(samples[under])},
        higher_is_better=True,
    )
