"""Configuration: frozen dataclasses loaded from TOML, overridden from the command line.

A config is validated when it is built, so a typo fails before an hour of teacher inference rather than
after. Unknown keys are an error. `to_dict()` is what a store records as its build provenance.

Precedence: dataclass defaults < the TOML file (`--config`) < command-line options.
A TOML file may hold the keys at top level, or in `[build]` / `[train]` tables so one pipeline file
configures both stages.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from softcache.errors import ConfigError

SECTIONS = ("build", "train")
ENCODINGS = ("dense", "topk", "sampled")
ID_CODINGS = ("elias_fano", "plain")
VALUE_DTYPES = ("float16", "bfloat16", "float32")

C = TypeVar("C")


@dataclass(frozen=True)
class BuildConfig:
    """Everything `softcache build` needs.

    Attributes:
        teacher: spec of a factory returning an `nn.Module` mapping inputs (B, ...) to logits (B, C).
        dataset: spec of a factory returning a map-style dataset of `(input, label)` items.
        output: the store's path.
        encoding: `dense` keeps every logit; `topk` keeps the k largest plus normalisers.
        top_k: k for `topk`.
        dtype: how logit values are stored: float16, bfloat16 or float32.
        temperatures: temperatures whose log-sum-exp normalisers a `topk` store keeps.
        batch_size: teacher batch size; batches never cross a shard boundary.
        num_workers: DataLoader worker processes.
        device: `auto`, `cpu`, `cuda` or `cuda:i`.
        amp: run the teacher under autocast (CUDA only; ignored on CPU).
        shard_rows: rows per shard: the unit of writing, of resume and of streaming reads.
        chunk_rows: rows per compressed inner chunk (defaults to min(shard_rows, 1024)).
        compression_level: zstd level.
        writer_threads: background threads compressing and writing shards.
        overwrite: replace an existing store at `output`.
        storage_options: options for the fsspec backend of a URL `output` (endpoint, profile,
            ...); never recorded in the store, since they may hold credentials.
        workers: run the build on a Dask `LocalCluster` of this many worker processes (0: in
            this process). On a GPU node, one worker per GPU.
        dask_scheduler: run the build on an existing Dask cluster (`tcp://host:port`); its
            workers must import softcache, the specs and reach `output`.
        shards_per_task: shards one Dask task computes (0: chosen from the number of shards and
            workers); a worker that dies loses at most this much work.
        views: augmented views stored per sample (needs `augment`; `shard_rows` must be a
            multiple, so a shard holds whole samples).
        augment: the augmentation that makes each view (`softcache.augment.parse_augment`
            grammar, e.g. "crop(size=32,scale=0.35:1);flip", or a `module:callable` spec).
        augment_seed: seeds every view's parameters, drawn from (augment_seed, sample, view).
        lm: the teacher is a causal LM over token sequences (`softcache.sequences`): the store
            holds one row per real token (format_version 3); `shard_rows` counts tokens and
            `batch_size` sequences. Encodings `topk` (with the residual mass) or `sampled`.
        draws: ids drawn per token from the teacher for `sampled`.
        value_bits: `topk` with `lm`: 0 stores float16 log-probabilities; 1..16 stores
            square-root codes of that many bits (`softcache.tokens.quantize_logprobs`).
        id_coding: `lm` token ids as `elias_fano` (smallest) or `plain` integers.
        lm_temperature: temperature of an `lm` store's log-probabilities and draws.
        seed: seeds the draws of `sampled` (per shard: a resumed shard draws the same ids).
    """

    teacher: str
    dataset: str
    output: str
    encoding: str = "dense"
    top_k: int = 5
    dtype: str = "float16"
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0)
    batch_size: int = 256
    num_workers: int = 0
    device: str = "auto"
    amp: bool = False
    shard_rows: int = 4096
    chunk_rows: int | None = None
    compression_level: int = 3
    writer_threads: int = 2
    overwrite: bool = False
    storage_options: dict[str, Any] | None = None
    workers: int = 0
    dask_scheduler: str | None = None
    ddp_timeout: float = 600.0
    shards_per_task: int = 0
    views: int = 1
    augment: str | None = None
    augment_seed: int = 0
    lm: bool = False
    draws: int = 32
    value_bits: int = 0
    id_coding: str = "elias_fano"
    lm_temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("encoding", self.encoding, ENCODINGS)
        _check_choice("id_coding", self.id_coding, ID_CODINGS)
        if self.lm:
            self._check_lm()
        elif self.encoding == "sampled":
            raise ConfigError(
                "--encoding sampled is for language models: pass --lm (one row per token)"
            )
        _check_positive("views", self.views)
        if self.views > 1 and not self.augment:
            raise ConfigError(
                f"views={self.views} needs an augmentation to make them: pass --augment "
                '(e.g. --augment "crop(size=32,scale=0.35:1);flip")'
            )
        if self.shard_rows % self.views:
            raise ConfigError(
                f"shard_rows ({self.shard_rows}) must be a multiple of views ({self.views}): a "
                "shard holds every view of its samples"
            )
        if self.augment_seed < 0:
            raise ConfigError(f"augment_seed must be >= 0, got {self.augment_seed}")
        if self.workers < 0 or self.shards_per_task < 0:
            raise ConfigError(
                f"workers and shards_per_task must be >= 0, got {self.workers} and "
                f"{self.shards_per_task}"
            )
        if self.workers and self.dask_scheduler:
            raise ConfigError(
                "give --workers (a cluster on this machine) or --dask-scheduler (an existing "
                "cluster), not both"
            )
        _check_choice("dtype", self.dtype, VALUE_DTYPES)
        for name in ("top_k", "batch_size", "shard_rows", "writer_threads"):
            _check_positive(name, getattr(self, name))
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.chunk_rows is not None:
            _check_positive("chunk_rows", self.chunk_rows)
            if self.shard_rows % self.chunk_rows:
                raise ConfigError(
                    f"shard_rows ({self.shard_rows}) must be a multiple of chunk_rows "
                    f"({self.chunk_rows}): a shard holds a whole number of chunks"
                )
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            raise ConfigError(
                f"temperatures must be positive numbers, got {list(self.temperatures)}"
            )
        if not 1 <= self.compression_level <= 22:
            raise ConfigError(f"compression_level must be in 1..22, got {self.compression_level}")
        if not self.teacher or not self.dataset or not self.output:
            raise ConfigError("teacher, dataset and output are required")

    def _check_lm(self) -> None:
        if self.encoding == "dense":
            raise ConfigError(
                "--lm stores are sparse: pass --encoding topk (with --top-k) or --encoding "
                "sampled (with --draws); dense rows of a large vocabulary do not fit"
            )
        if self.views > 1 or self.augment:
            raise ConfigError("--lm stores have no augmentation views; drop --views/--augment")
        _check_positive("draws", self.draws)
        if self.encoding == "sampled" and self.value_bits:
            raise ConfigError(
                "--value-bits quantises top-k values; sampled stores keep ids and counts only"
            )
        if not 0 <= self.value_bits <= 16:
            raise ConfigError(f"value_bits must be in 0..16 (0: float16), got {self.value_bits}")
        if not self.lm_temperature > 0:
            raise ConfigError(f"lm_temperature must be > 0, got {self.lm_temperature}")

    @property
    def distributed(self) -> bool:
        """Whether the build runs on a Dask cluster."""
        return bool(self.workers or self.dask_scheduler)

    @property
    def effective_chunk_rows(self) -> int:
        """Rows per inner chunk after applying the default."""
        if self.chunk_rows is not None:
            return self.chunk_rows
        chunk = min(self.shard_rows, 1024)
        while self.shard_rows % chunk:
            chunk -= 1
        return chunk

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able data (tuples become lists), without storage options."""
        return _to_plain(_public_fields(self))


TRAIN_MODES = ("offline", "online", "hard")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine")
HASH_CHECKS = ("all", "first-epoch", "off")
VIEW_POLICIES = ("cycle", "random")


@dataclass(frozen=True)
class TrainConfig:
    """Everything `softcache train` needs.

    Attributes:
        student: spec of a factory returning a fresh student `nn.Module` (inputs -> (B, C) logits).
        dataset: spec of the training dataset (the one the store was built from).
        store: the teacher's store (required for `offline`; in other modes it supplies the block
            layout, so all modes see the same data order).
        mode: `offline` (soft labels from the store), `online` (run `teacher` in the loop) or
            `hard` (labels only).
        teacher: teacher spec, required for `online`.
        eval_dataset: spec of a held-out dataset evaluated after each epoch.
        eval_store: a store built over `eval_dataset`, for teacher agreement without the teacher.
        epochs: passes over the training data.
        batch_size: student batch size.
        lr: peak learning rate.
        optimizer: adamw, adam or sgd (momentum 0.9).
        weight_decay: decoupled weight decay (adamw) or L2 (adam, sgd).
        schedule: constant or cosine (per step, to zero at the end).
        temperature: distillation temperature T.
        alpha: weight of the hard-label cross-entropy; (1 - alpha) weighs the KD term.
        seed: seeds the student's initialisation and the epoch plan.
        device: auto, cpu, cuda or cuda:N.
        amp: autocast the student (and an online teacher) on CUDA.
        num_workers: DataLoader workers for inputs.
        block_rows: rows per plan block when no store is given (else the store's shard_rows).
        window_blocks: blocks whose rows are shuffled together.
        prefetch_blocks: store blocks read ahead of the training loop.
        dask_scheduler: None (threads), or a `distributed` scheduler address (`tcp://host:port`).
        ddp_timeout: under torchrun, seconds a rank waits in a collective before failing (rank
            0's eval pass and checkpoint at an epoch end must fit in it).
        output: directory for checkpoints and metrics.json.
        checkpoint_steps: also checkpoint every N steps inside an epoch (0: only at epoch ends).
        resume: continue from the checkpoint in `output`.
        hash_check: how much of the alignment check to pay for. `all`: hash every row of every
            batch. `first-epoch` (default): every row in the run's first epoch, then every
            `hash_stride`-th row of each batch (the rows at those positions differ from epoch
            to epoch as the plan reshuffles). `off`: no check (the sample count is still checked).
        hash_stride: rows between hashed rows after the first epoch, with `first-epoch`.
        storage_options: fsspec options for URL stores (never recorded: may hold credentials).
        view_policy: with a store holding several views per sample, which one each sample gets
            each epoch: `cycle` (every view once in any `views` consecutive epochs) or `random`
            (drawn from (seed, epoch, sample)).
        augment: draw a new augmented view of every sample each epoch (hard and online modes,
            or offline from a store without views: the teacher's labels are then of the
            unaugmented input). Same grammar as `softcache build --augment`.
        augment_seed: seeds the views `augment` draws.
        lm: the student (and teacher) are causal LMs over token sequences
            (`softcache.lm_train`): per-token losses on the real tokens, a per-token store
            (`softcache build --lm`) for `offline`, and perplexity and next-token agreement
            in the evaluation. Offline KD then uses the store's temperature.
        max_steps: stop after this many optimiser steps (0: run every epoch); `lm` only.
    """

    student: str
    dataset: str
    store: str | None = None
    mode: str = "offline"
    teacher: str | None = None
    eval_dataset: str | None = None
    eval_store: str | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    temperature: float = 2.0
    alpha: float = 0.0
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    num_workers: int = 0
    block_rows: int = 512
    window_blocks: int = 4
    prefetch_blocks: int = 4
    dask_scheduler: str | None = None
    ddp_timeout: float = 600.0
    output: str = "runs/train"
    checkpoint_steps: int = 0
    resume: bool = False
    hash_check: str = "first-epoch"
    hash_stride: int = 16
    storage_options: dict[str, Any] | None = None
    view_policy: str = "cycle"
    augment: str | None = None
    augment_seed: int = 0
    lm: bool = False
    max_steps: int = 0

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, TRAIN_MODES)
        if self.max_steps < 0 or (self.max_steps and not self.lm):
            raise ConfigError(f"max_steps must be >= 0 and needs --lm, got {self.max_steps}")
        _check_choice("view_policy", self.view_policy, VIEW_POLICIES)
        _check_choice("hash_check", self.hash_check, HASH_CHECKS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        for name in (
            "epochs",
            "batch_size",
            "block_rows",
            "window_blocks",
            "prefetch_blocks",
            "hash_stride",
        ):
            _check_positive(name, getattr(self, name))
        if self.mode == "offline" and not self.store:
            raise ConfigError("mode offline trains from a store: pass --store")
        if self.mode == "online" and not self.teacher:
            raise ConfigError("mode online runs the teacher in the loop: pass --teacher")
        if self.lr <= 0 or self.temperature <= 0 or self.ddp_timeout <= 0:
            raise ConfigError(
                "lr, temperature and ddp_timeout must be positive, got "
                f"{self.lr}, {self.temperature}, {self.ddp_timeout}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.num_workers < 0 or self.checkpoint_steps < 0 or self.weight_decay < 0:
            raise ConfigError("num_workers, checkpoint_steps and weight_decay must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able data, without storage options."""
        return _to_plain(_public_fields(self))


def load_config(
    cls: type[C], path: str | Path | None, overrides: Mapping[str, Any], section: str
) -> C:
    """Build a config from an optional TOML file and command-line overrides.

    Args:
        cls: the config dataclass.
        path: a TOML file or None.
        overrides: values from the command line; `None` values mean "not given".
        section: the table to read when the file has `[build]` / `[train]` tables.

    Raises:
        ConfigError: unreadable file, unknown keys, wrong types, or invalid values.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_toml(Path(path), section))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_mapping(cls, values, source=str(path) if path else "options")


def config_from_mapping(cls: type[C], values: Mapping[str, Any], *, source: str) -> C:
    """Build a config dataclass from a mapping, rejecting unknown keys and coercing types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(name, value, hints[name], source) for name, value in values.items()}
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: missing required setting(s): {', '.join(missing)}")
    return cls(**kwargs)


def _read_toml(path: Path, section: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    if any(isinstance(data.get(s), dict) for s in SECTIONS):
        stray = sorted(k for k in data if k not in SECTIONS)
        if stray:
            raise ConfigError(
                f"{path}: key(s) {', '.join(stray)} sit outside the [build] / [train] tables"
            )
        return dict(data.get(section, {}))
    return dict(data)


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    """Coerce TOML / CLI values to the field's type, or say what was wrong."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    try:
        if origin is tuple:
            item_type = typing.get_args(hint)[0]
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(item_type(x) for x in items if str(x).strip() != "")
        if hint is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if hint is int and isinstance(value, float | bool):
            raise TypeError
        if hint in (int, float, str):
            return hint(value)
        if isinstance(hint, types.UnionType | type(typing.Union)):
            return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {name} = {value!r} is not a valid {hint}") from exc
    return value


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value}")


def _public_fields(config: Any) -> dict[str, Any]:
    """Fields safe to record as provenance (storage options may hold credentials)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k != "storage_options"}


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    return obj


__all__ = ["BuildConfig", "TrainConfig", "config_from_mapping", "load_config"]
