"""Configuration: frozen dataclasses loaded from TOML, overridden from the command line.

A config is validated when it is built, so a typo fails before an hour of teacher inference rather than
after. Unknown keys are an error, and so is a setting that does not apply to the chosen layout (a
`views` for a language-model build, a `draws` for a row build): each field says which layout it
belongs to. `to_dict()` is what a store records as its build provenance.

Each field carries its own help text, and the command line's options are generated from the fields
(`option_specs`): the option, its default and its help come from one place.

Precedence: dataclass defaults < the TOML file (`--config`) < command-line options.
A TOML file may hold the keys at top level, or in `[build]` / `[train]` tables so one pipeline file
configures both stages.

From Python, `teacher`, `student` and `dataset` may be objects instead of spec strings: a module or
dataset used as it is, or a factory called with no arguments (`softcache.runtime.specs.resolve`).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from softcache.errors import ConfigError
from softcache.runtime.specs import is_vllm_spec

SECTIONS = ("build", "train")
ENCODINGS = ("dense", "topk", "sampled")
ID_CODINGS = ("elias_fano", "plain")
VALUE_DTYPES = ("float16", "bfloat16", "float32")
TRAIN_MODES = ("offline", "online", "hard")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine")
HASH_CHECKS = ("all", "first-epoch", "off")
VIEW_POLICIES = ("cycle", "random")
LOADERS = ("process", "thread")
# The two layouts a config can choose (`lm`): one row per sample, or one row per token.
ROWS, TOKENS = "rows", "tokens"

C = TypeVar("C")
# A store digest (`softcache.store.manifest`): sha256 and 64 hex digits.
_DIGEST = re.compile(r"(sha256:)?[0-9a-f]{64}")


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    only: str | None = None,
    choices: tuple[str, ...] | None = None,
    flag: str | None = None,
    short: str | None = None,
    metavar: str | None = None,
    default_text: str | None = None,
    cli: bool = True,
) -> Any:
    """A config field with what the command line and the layout check need to know of it.

    Args:
        default: the field's default (omit for a required field).
        help: the option's help text, without its default (added from `default`).
        only: the layout the field applies to (`rows` or `tokens`); None for both. A field set
            for the other layout is refused.
        choices: the values a string field accepts (the option offers exactly these).
        flag: for a bool: `flag` (`--name` sets it) or `pair` (`--name/--no-name`).
        short: a one-letter alias (`o` for `-o`).
        metavar: the option's placeholder in --help.
        default_text: how --help shows a default computed elsewhere (e.g. `min(shard-rows, 1024)`).
        cli: False keeps the field out of the command line (Python and TOML only).
    """
    metadata = {
        "help": help,
        "only": only,
        "choices": choices,
        "flag": flag,
        "short": short,
        "metavar": metavar,
        "default_text": default_text,
        "cli": cli,
    }
    return dataclasses.field(default=default, metadata=metadata)


class _Config:
    """What both configs share: the layout check and provenance."""

    lm: bool

    @property
    def layout(self) -> str:
        """`tokens` for a language model (`lm`), else `rows`."""
        return TOKENS if self.lm else ROWS

    def _check_layout_fields(self) -> None:
        """Refuse a field of the other layout set to anything but its default."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            only = f.metadata.get("only")
            if only is None or only == self.layout:
                continue
            if getattr(self, f.name) != f.default:
                raise ConfigError(_foreign(f.name, only))

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able data (tuples become lists), without storage options and
        without the fields of the other layout."""
        return _to_plain(_public_fields(self))


def _foreign(name: str, only: str) -> str:
    if only == TOKENS:
        return (
            f"{name} applies to language-model (--lm) runs only; drop it, or pass --lm for a "
            "per-token store"
        )
    return f"{name} does not apply to language-model (--lm) runs; drop it"


@dataclass(frozen=True)
class BuildConfig(_Config):
    """Everything `softcache build` needs. Each field's help says what it does."""

    teacher: Any = setting(
        help="Teacher factory, 'package.module:fn' or 'file.py:fn' (or hf:DIR or vllm:DIR with "
        "--lm); returns an nn.Module giving (B, C) logits, or (B, L, V) with --lm. From Python: "
        "also a module or a factory."
    )
    dataset: Any = setting(
        help="Dataset factory spec; returns a map-style dataset of (input, label) items (with "
        "--lm: token sequences). From Python: also the dataset itself."
    )
    output: str = setting(help="Where to write the store (a directory or URL).", short="o")
    encoding: str = setting(
        "dense",
        choices=ENCODINGS,
        help="dense keeps all C logits; topk keeps the k largest plus normalisers (with --lm: "
        "plus the residual mass); sampled (--lm only) keeps --draws ids drawn from the teacher.",
    )
    top_k: int = setting(5, help="Entries kept per row with --encoding topk.")
    dtype: str = setting(
        "float16", only=ROWS, choices=VALUE_DTYPES, help="Stored value type of row stores."
    )
    temperatures: tuple[float, ...] = setting(
        (1.0, 2.0, 4.0),
        only=ROWS,
        metavar="T1,T2,...",
        help="Comma-separated temperatures whose normalisers a topk row store keeps.",
    )
    batch_size: int = setting(
        256, help="Teacher batch size (sequences with --lm); batches never cross a shard."
    )
    num_workers: int = setting(0, help="DataLoader worker processes.")
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N.")
    amp: bool = setting(False, flag="pair", help="Autocast the teacher on CUDA.")
    shard_rows: int = setting(
        4096,
        help="Rows per shard (tokens with --lm): the unit of writing, resume and streaming reads.",
    )
    chunk_rows: int | None = setting(
        None,
        default_text="min(shard-rows, 1024)",
        help="Rows per compressed chunk inside a shard.",
    )
    compression_level: int = setting(3, help="zstd level (1..22).")
    writer_threads: int = setting(2, help="Background threads compressing and writing.")
    overwrite: bool = setting(False, flag="flag", help="Replace an existing store at --output.")
    storage_options: dict[str, Any] | None = setting(
        None,
        cli=False,
        help="fsspec options for a URL output (endpoint, profile, ...); never recorded in the "
        "store, since they may hold credentials.",
    )
    workers: int = setting(
        0,
        help="Run on a Dask cluster of N worker processes on this machine (one per GPU on a GPU "
        "node; with dask-cuda installed each is pinned to its GPU); 0: in this process.",
    )
    dask_scheduler: str | None = setting(
        None,
        metavar="ADDRESS",
        help="Run on an existing Dask cluster (tcp://host:port). Its workers must import "
        "softcache and the specs, and reach --output.",
    )
    shards_per_task: int = setting(
        0, help="Shards per Dask task; a dying worker loses at most this much (0: automatic)."
    )
    views: int = setting(
        1,
        only=ROWS,
        help="Augmented views stored per sample, each with the parameters that recreate it "
        "(needs --augment).",
    )
    augment: str | None = setting(
        None,
        only=ROWS,
        metavar="SPEC",
        help='The augmentation making each view: e.g. "crop(size=32,scale=0.35:1);flip", or a '
        "module:callable spec (see softcache.data.augment).",
    )
    augment_seed: int = setting(
        0, only=ROWS, help="Seeds the views' parameters, drawn from (seed, sample, view)."
    )
    lm: bool = setting(
        False,
        flag="flag",
        help="The teacher is a causal LM over token sequences: one row per real token (format 3, "
        "see docs/FORMAT.md); --shard-rows counts tokens, --batch-size sequences.",
    )
    tokenizer: str | None = setting(
        None,
        only=TOKENS,
        metavar="DIR",
        help="The teacher's tokenizer (a save_pretrained directory), recorded in the store so "
        "`train` can check a student's; default: the hf:DIR teacher's DIR, when it holds one.",
    )
    draws: int = setting(32, only=TOKENS, help="Ids drawn per token for --encoding sampled.")
    value_bits: int = setting(
        0,
        only=TOKENS,
        help="--lm topk: 0 stores float16 log-probabilities; 1..16 stores square-root codes of "
        "that many bits (7 costs ~0.0004 nats/token).",
    )
    id_coding: str = setting(
        "elias_fano",
        only=TOKENS,
        choices=ID_CODINGS,
        help="--lm token ids: Elias-Fano (smallest) or plain integers.",
    )
    lm_temperature: float = setting(
        1.0, only=TOKENS, help="Temperature of --lm log-probabilities and draws."
    )
    seed: int = setting(
        0, only=TOKENS, help="Seeds --encoding sampled's draws (per shard: a resume draws alike)."
    )

    def __post_init__(self) -> None:
        _check_choice("encoding", self.encoding, ENCODINGS)
        _check_required(self, ("teacher", "dataset", "output"))
        self._check_layout_fields()
        if self.lm:
            self._check_lm()
        else:
            self._check_rows()
        if is_vllm_spec(self.teacher):
            self._check_vllm()
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
        if not 1 <= self.compression_level <= 22:
            raise ConfigError(f"compression_level must be in 1..22, got {self.compression_level}")

    def _check_rows(self) -> None:
        if self.encoding == "sampled":
            raise ConfigError(
                "--encoding sampled is for language models: pass --lm (one row per token)"
            )
        _check_choice("dtype", self.dtype, VALUE_DTYPES)
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
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            raise ConfigError(
                f"temperatures must be positive numbers, got {list(self.temperatures)}"
            )

    def _check_lm(self) -> None:
        if self.encoding == "dense":
            raise ConfigError(
                "--lm stores are sparse: pass --encoding topk (with --top-k) or --encoding "
                "sampled (with --draws); dense rows of a large vocabulary do not fit"
            )
        _check_choice("id_coding", self.id_coding, ID_CODINGS)
        _check_positive("draws", self.draws)
        if self.encoding == "sampled" and self.value_bits:
            raise ConfigError(
                "--value-bits quantises top-k values; sampled stores keep ids and counts only"
            )
        if not 0 <= self.value_bits <= 16:
            raise ConfigError(f"value_bits must be in 0..16 (0: float16), got {self.value_bits}")
        if not self.lm_temperature > 0:
            raise ConfigError(f"lm_temperature must be > 0, got {self.lm_temperature}")

    def _check_vllm(self) -> None:
        """What a vLLM teacher (prompt log-probs, `softcache.runtime.vllm`) cannot give."""
        if not self.lm or self.encoding != "topk":
            raise ConfigError(
                f"--teacher {self.teacher} gives the top-k log-probabilities of each token: "
                "pass --lm --encoding topk (a vLLM engine has no full distribution to draw "
                "--encoding sampled from, and no class logits for a row store)"
            )
        if self.lm_temperature != 1.0:
            raise ConfigError(
                f"--teacher {self.teacher} builds at --lm-temperature 1 only, got "
                f"{self.lm_temperature}: vLLM applies no temperature to prompt log-probs, and a "
                "top-k cache cannot be re-tempered (its residual would be wrong); build at 1, or "
                "use an hf: teacher for another temperature"
            )
        if self.distributed:
            raise ConfigError(
                f"--teacher {self.teacher} runs one vLLM engine in this process; drop --workers "
                "and --dask-scheduler (vLLM batches and parallelises by itself)"
            )

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

    def provenance(self) -> dict[str, Any]:
        """What a store records of the build that wrote it (`build_config`)."""
        return {k: v for k, v in self.to_dict().items() if k != "overwrite"}


@dataclass(frozen=True)
class TrainConfig(_Config):
    """Everything `softcache train` needs. Each field's help says what it does."""

    student: Any = setting(
        help="Student factory spec; returns a freshly initialised nn.Module (hf-init:DIR with "
        "--lm). From Python: also a factory."
    )
    dataset: Any = setting(
        help="Training dataset spec: the dataset the store was built from. From Python: also "
        "the dataset itself."
    )
    store: str | None = setting(
        None,
        help="The teacher's store (required for --mode offline; in other modes it gives the "
        "block layout, so all modes see the same data order).",
    )
    expect_digest: str | None = setting(
        None,
        metavar="DIGEST",
        help="Pin --store: refuse it unless its digest (sha256:..., as `softcache info` shows "
        "it) is DIGEST, and check every object read against its manifest.",
    )
    mode: str = setting(
        "offline",
        choices=TRAIN_MODES,
        help="offline: soft labels from the store; online: teacher in the loop; hard: labels only.",
    )
    teacher: Any = setting(None, help="Teacher spec (required for --mode online).")
    eval_dataset: Any = setting(None, help="Held-out dataset spec, evaluated after every epoch.")
    eval_store: str | None = setting(
        None, help="A store built over --eval-dataset: teacher agreement without the teacher."
    )
    epochs: int = setting(10, help="Passes over the data.")
    batch_size: int = setting(64, help="Student batch size (per rank under torchrun).")
    # 3e-3, not 1e-3: at 1e-3 a small student trains too slowly, and from soft labels (T = 2)
    # slower still (benchmarks/defaults.py: 5 epochs, 1.6k-parameter student, top-5 store of a
    # 57k-parameter teacher: hard 0.753 / KD 0.628 at 1e-3; 0.927 / 0.909 at 3e-3; 0.967 / 0.962
    # at 1e-2). AdamW normalises the gradient's scale away, so KD's T^2 factor does not make up
    # for the student's logits being divided by T: at T = 1, KD tracked hard labels seed for seed.
    lr: float = setting(3e-3, help="Peak learning rate.")
    optimizer: str = setting("adamw", choices=OPTIMIZERS, help="adamw, adam or sgd (momentum 0.9).")
    weight_decay: float = setting(0.0, help="Decoupled weight decay (adamw) or L2 (adam, sgd).")
    schedule: str = setting(
        "cosine", choices=SCHEDULES, help="Per-step schedule: constant, or cosine to zero."
    )
    temperature: float = setting(
        2.0, help="Distillation temperature T (--lm offline: the store's temperature is used)."
    )
    alpha: float = setting(0.0, help="Weight of the hard-label loss; 1 - alpha weighs KD.")
    seed: int = setting(0, help="Seeds the student's init and the data order.")
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N.")
    amp: bool = setting(False, flag="pair", help="Autocast on CUDA (fp16, with loss scaling).")
    num_workers: int = setting(0, help="DataLoader workers for inputs.")
    threads: int = setting(
        0,
        help="CPU threads for a CPU student's ops (0: the usable cores less one for the batch "
        "maker and one per --num-workers worker, unless OMP_NUM_THREADS is set).",
    )
    loader: str = setting(
        "process",
        choices=LOADERS,
        help="Where batches are made: a child process (inputs, hash checks, soft labels and "
        "teacher targets leave the training process and its GIL) or a thread of it.",
    )
    block_rows: int = setting(
        512, help="Samples per plan block when no --store is given (else the store decides)."
    )
    window_blocks: int = setting(4, help="Store blocks whose rows are shuffled together.")
    prefetch_blocks: int = setting(4, help="Store blocks read ahead of training.")
    dask_scheduler: str | None = setting(
        None,
        metavar="ADDRESS",
        help="Address of a dask.distributed scheduler to read through (default: threads).",
    )
    ddp_timeout: float = setting(
        600.0,
        help="Under torchrun: seconds a rank waits for the others in a collective before "
        "failing (rank 0's eval pass and checkpoint must fit in it).",
    )
    output: str = setting(
        "runs/train",
        short="o",
        help="Directory for checkpoints, metrics.json and the trained student (student.pt).",
    )
    checkpoint_steps: int = setting(
        0, help="Also checkpoint every N steps inside an epoch (0: epoch ends only)."
    )
    resume: bool = setting(False, flag="flag", help="Continue from the checkpoint in --output.")
    overwrite: bool = setting(
        False, flag="flag", help="Replace a run already in --output (else it is refused)."
    )
    hash_check: str = setting(
        "first-epoch",
        choices=HASH_CHECKS,
        help="Alignment check: every row always; every row in the first epoch, then every "
        "--hash-stride-th row (--lm: every sample's tokens, once before training); or none.",
    )
    hash_stride: int = setting(
        16, only=ROWS, help="Rows between checked rows after the first epoch."
    )
    storage_options: dict[str, Any] | None = setting(
        None, cli=False, help="fsspec options for URL stores (never recorded: credentials)."
    )
    view_policy: str = setting(
        "cycle",
        only=ROWS,
        choices=VIEW_POLICIES,
        help="With a store of several views per sample: each epoch's view of a sample, cycling "
        "through them or drawn by (seed, epoch).",
    )
    augment: str | None = setting(
        None,
        only=ROWS,
        metavar="SPEC",
        help="Draw a new augmented view of every sample each epoch (hard, online, or a store "
        "without views); same SPEC as build --augment.",
    )
    augment_seed: int = setting(0, only=ROWS, help="Seeds the views --augment draws.")
    lm: bool = setting(
        False,
        flag="flag",
        help="Causal-LM student over token sequences: per-token KD from a `build --lm` store (its "
        "temperature), reporting perplexity and next-token agreement.",
    )
    max_steps: int = setting(0, help="Stop after N optimiser steps (0: all epochs).")
    tokenizer: str | None = setting(
        None,
        only=TOKENS,
        metavar="DIR",
        help="The student's tokenizer (a save_pretrained directory), checked against the one the "
        "store records and saved with an HF student; default: the hf:/hf-init: student's DIR, "
        "when it holds one.",
    )

    def __post_init__(self) -> None:
        _check_required(self, ("student", "dataset"))
        self._check_layout_fields()
        _check_choice("mode", self.mode, TRAIN_MODES)
        _check_choice("view_policy", self.view_policy, VIEW_POLICIES)
        _check_choice("loader", self.loader, LOADERS)
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
        if self.expect_digest is not None:
            if not self.store:
                raise ConfigError("--expect-digest pins a store: pass --store")
            if not _DIGEST.fullmatch(self.expect_digest.strip().lower()):
                raise ConfigError(
                    f"--expect-digest {self.expect_digest!r} is not a store digest; expected "
                    "'sha256:' and 64 hex digits, as `softcache info` shows it"
                )
        if self.mode == "online" and self.teacher is None:
            raise ConfigError("mode online runs the teacher in the loop: pass --teacher")
        if self.lr <= 0 or self.temperature <= 0 or self.ddp_timeout <= 0:
            raise ConfigError(
                "lr, temperature and ddp_timeout must be positive, got "
                f"{self.lr}, {self.temperature}, {self.ddp_timeout}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if min(self.num_workers, self.threads, self.checkpoint_steps, self.weight_decay) < 0:
            raise ConfigError(
                "num_workers, threads, checkpoint_steps and weight_decay must be >= 0, got "
                f"{self.num_workers}, {self.threads}, {self.checkpoint_steps} and "
                f"{self.weight_decay}"
            )
        if self.max_steps < 0:
            raise ConfigError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.resume and self.overwrite:
            raise ConfigError(
                "--resume continues the run in --output, --overwrite replaces it: pass one of them"
            )


# ---- loading -------------------------------------------------------------------------------------


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
        ConfigError: unreadable file, unknown keys, keys of the other layout, wrong types, or
            invalid values.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_toml(Path(path), section))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_mapping(cls, values, source=str(path) if path else "options")


def config_from_mapping(cls: type[C], values: Mapping[str, Any], *, source: str) -> C:
    """Build a config dataclass from a mapping, rejecting unknown keys, keys that do not apply to
    the chosen layout (even at their default value), and coercing types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(name, value, hints[name], source) for name, value in values.items()}
    layout = TOKENS if kwargs.get("lm") else ROWS
    for name in kwargs:
        only = fields[name].metadata.get("only")
        if only is not None and only != layout:
            raise ConfigError(f"{source}: {_foreign(name, only)}")
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


@dataclass(frozen=True)
class OptionSpec:
    """One command-line option generated from a config field (`option_specs`)."""

    name: str  # the field
    flags: tuple[str, ...]  # e.g. ("--output", "-o") or ("--amp/--no-amp",)
    type: Any  # int, float, str, or a tuple of choices; None for boolean flags
    help: str
    is_flag: bool
    metavar: str | None


def option_specs(cls: type, *, exclude: tuple[str, ...] = ()) -> list[OptionSpec]:
    """The command-line options of a config class, in field order, with their help and defaults.

    The help text ends with the field's default (`[default: X]`), taken from the dataclass, so the
    two never disagree; fields of one layout say so.
    """
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True) or f.name in exclude:
            continue
        dashed = "--" + f.name.replace("_", "-")
        short = (f"-{meta['short']}",) if meta.get("short") else ()
        hint = hints[f.name]
        flag = meta.get("flag")
        is_flag = flag is not None
        if flag == "pair":
            flags: tuple[str, ...] = (f"{dashed}/--no-{dashed[2:]}",)
        else:
            flags = (dashed, *short)
        if is_flag:
            kind: Any = None
        elif meta.get("choices"):
            kind = tuple(meta["choices"])
        else:
            kind = _scalar(hint)
        help_text = meta["help"]
        if meta.get("only") == TOKENS and "--lm" not in help_text:
            help_text = f"(--lm) {help_text}"
        default = meta.get("default_text") or _default_text(f.default)
        if default is not None and flag != "flag":
            help_text = f"{help_text}  [default: {default}]"
        out.append(
            OptionSpec(
                name=f.name,
                flags=flags,
                type=kind,
                help=help_text,
                is_flag=is_flag,
                metavar=meta.get("metavar"),
            )
        )
    return out


def _scalar(hint: Any) -> Any:
    """The click type of a field's annotation: int, float, or str (specs, comma lists, ...)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint if hint in (int, float) else str


def _default_text(default: Any) -> str | None:
    if default is dataclasses.MISSING or default is None:
        return None
    if isinstance(default, tuple):
        return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in default)
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


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
    if hint is Any:
        return value
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


def _check_required(config: Any, names: tuple[str, ...]) -> None:
    missing = [n for n in names if getattr(config, n) is None or getattr(config, n) == ""]
    if missing:
        raise ConfigError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value}")


def _public_fields(config: Any) -> dict[str, Any]:
    """Fields safe to record as provenance (storage options may hold credentials; the fields of
    the other layout say nothing); objects given for specs are recorded by what identifies them
    (`softcache.runtime.specs.describe`)."""
    out = {}
    for f in dataclasses.fields(config):
        only = f.metadata.get("only")
        if f.name == "storage_options" or (only is not None and only != config.layout):
            continue
        value = getattr(config, f.name)
        out[f.name] = value if _plain_value(value) else _describe(value)
    return out


def _plain_value(value: Any) -> bool:
    if isinstance(value, list | tuple):
        return all(_plain_value(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def _describe(value: Any) -> str:
    from softcache.runtime.specs import describe

    return describe(value)


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    return obj


__all__ = ["BuildConfig", "TrainConfig", "config_from_mapping", "load_config", "option_specs"]
