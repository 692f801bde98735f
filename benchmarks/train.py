"""Train overhead: offline-KD epochs next to hard-label epochs of the same student.

Every mode runs through `softcache.trainer.train` with the same student, data order (the plan comes
from the store's shard layout in every mode), optimiser and batch size; only the loss's source
differs (online KD, the teacher in the loop, is measured by `benchmarks.speedup`). A run's epoch
time is the median of its epochs after the first (the first pays imports, allocator growth and the
first blocks' read), so these cases need no warm-up round. The same runs also give each mode's
median step (`step_seconds_median`: each step from the end of the one before, its wait included;
the median of a run's later epochs), which leaves out the epochs' starts and the stalls the
machine's other work causes. On this machine it spreads from round to round as the epoch ratios
do (the whole run's pace moves, not single steps): it says what a step costs, not more surely.

Runs make their batches in a batch process (the default, `softcache.trainer.batch_process`); the
`*-thread` cases are the same runs with `loader="thread"` (batches made on a thread of the training
process, which shares its GIL with the step), side by side in the same rounds.
The `*-cores` cases are the same runs at one torch thread per usable core (torch's own default),
where the trainer leaves a core to the batch process (`softcache.runtime.threads`).

Timed in the same rounds, to say where an offline epoch's extra time goes:

- `step-*`: the training thread's own work, an epoch's worth of steps of the student on one fixed
  batch with each mode's loss as the trainer computes it (offline: from teacher targets prepared
  beforehand, as the batch thread does), no loader;
- `loader-*`: the CPU seconds (all threads) the trainer's batch source spends making an epoch's
  batches (inputs, hash check at the later epochs' stride, soft labels, teacher targets), no
  student: work another core has to absorb beside the steps (in the batch process, or on the
  batch thread, where its GIL-holding part also delays the step);

- `stream`: the soft-label stream alone (`SoftLabelStream.batches` over the dense store, no
  student): the reading the stream's thread has to hide behind the student's steps;
- `hash`: hashing every input of an epoch (`softcache.data.hashing.hash_rows`, batch by batch): the
  alignment check, which offline training runs on the training thread when `num_workers` is 0.

`model_costs` times a teacher's and the student's passes on one batch, so an online figure can
state its teacher's cost.
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.build import BuildWorkload, fresh_store
from benchmarks.harness import (
    Figure,
    core_share,
    interleave,
    median,
    ratio_figure,
    timed,
    wait_figure,
)
from softcache.config import TrainConfig
from softcache.data.hashing import collate_pairs, hash_rows
from softcache.runtime.specs import instantiate
from softcache.runtime.threads import usable_cores
from softcache.store import LogitStore
from softcache.trainer import train
from softcache.trainer.ddp import Ranks
from softcache.trainer.loop import epoch_hash_stride
from softcache.trainer.plan import EpochPlan
from softcache.trainer.rows import RowLayout
from softcache.trainer.stream import SoftLabelStream

TRAIN_GOAL = 1.05


@dataclass(frozen=True)
class TrainWorkload:
    """A student, a teacher and a dataset to train on.

    Attributes:
        label: prefixes the figure names.
        student: student spec.
        teacher: teacher spec (builds the stores; runs in the loop in the online mode).
        dataset: dataset spec.
        epochs: epochs per run (the first is warm-up).
        batch_size: student batch size.
        shard_rows: the stores' shard height (the plan's block).
        goal: the goal of the offline / hard ratios, or None for informational figures.
        device: where the student (and the online teacher) run.
    """

    label: str
    student: str
    teacher: str
    dataset: str
    epochs: int = 4
    batch_size: int = 64
    shard_rows: int = 512
    goal: float | None = TRAIN_GOAL
    device: str = "cpu"

    def build_workload(self) -> BuildWorkload:
        """The build of this workload's stores: its teacher, dataset, shard height and device."""
        return BuildWorkload(
            "", self.teacher, self.dataset, shard_rows=self.shard_rows, device=self.device
        )


def run_training(
    workload: TrainWorkload,
    store: Path,
    mode: str,
    output: Path,
    *,
    teacher: str | None = None,
    epochs: int | None = None,
    loader: str = "process",
    threads: int = 0,
) -> dict[str, Any]:
    """Train the workload's student once with `softcache.trainer.train`; return its metrics.

    Args:
        workload: student, dataset and batch size.
        store: the store (soft labels for `offline`; the plan's block layout in every mode).
        mode: `hard`, `offline` or `online`.
        output: the run's directory, removed afterwards.
        teacher: the teacher in the loop (`online` only; default: the workload's).
        epochs: epochs to run (default: the workload's).
        loader: where batches are made: `process` (the default) or `thread`.
        threads: the student's CPU threads (0: the trainer's choice, `TrainConfig.threads`).

    Returns:
        `TrainResult.metrics`: per-epoch lists such as `epoch_seconds` and `data_wait_fraction`.
    """
    config = TrainConfig(
        student=workload.student,
        dataset=workload.dataset,
        store=str(store),
        mode=mode,
        teacher=(teacher or workload.teacher) if mode == "online" else None,
        epochs=workload.epochs if epochs is None else epochs,
        batch_size=workload.batch_size,
        device=workload.device,
        output=str(output),
        loader=loader,
        threads=threads,
    )
    result = train(config, progress=False)
    shutil.rmtree(result.output)
    return result.metrics


# The runs the goals are figures of, and the same runs made another way (a batch thread, one torch
# thread per core): informational, so a run of `benchmarks.run` gives them fewer rounds.
GOAL_RUNS = ("hard", "offline", "offline-topk")
VARIANT_RUNS = (
    "hard-cores", "offline-topk-cores", "hard-thread", "offline-thread", "offline-topk-thread",
)  # fmt: skip
PARTS = ("all", "goals", "variants")


class TrainBench:
    """Training runs of each mode, and the costs behind them (see the module docstring).

    Args:
        workload: the student, teacher and dataset.
        workdir: where its stores are built and its runs write.
        part: `all` cases; `goals`: the goal runs (`GOAL_RUNS`) and the cheap cases that say where
            their time goes (steps alone, the loader's CPU, the stream, hashing, the core share);
            `variants`: the `VARIANT_RUNS` with `hard` and `offline-topk` to compare them with.
            `benchmarks.run` times the goals in more rounds than the variants.
        stores: the stores of another bench of the same workload, instead of building them.
    """

    warmup = False

    def __init__(
        self,
        workload: TrainWorkload,
        workdir: Path,
        *,
        part: str = "all",
        stores: dict[str, Path] | None = None,
    ) -> None:
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        self.workload = workload
        self.workdir = workdir
        self.part = part
        workdir.mkdir(parents=True, exist_ok=True)
        build = workload.build_workload()
        self.stores = stores or {
            "dense": fresh_store(build, "dense", workdir / "train-dense.zarr"),
            "topk": fresh_store(build, "topk", workdir / "train-topk.zarr"),
        }
        self.wait: dict[str, list[float]] = {}
        # Per run (one a round and case): the median of its later epochs' median step periods.
        self.step_periods: dict[str, list[float]] = {}
        self.num_samples = LogitStore.open(self.stores["dense"]).meta.num_samples
        self._count = itertools.count()
        self._layouts: dict[tuple[str, str], RowLayout] = {}
        dataset = instantiate(workload.dataset, "dataset")
        self._inputs = [
            collate_pairs([dataset[int(i)] for i in rows])[0] for rows in self._plan().batches()
        ]

    def _plan(self) -> EpochPlan:
        return EpochPlan(
            num_samples=self.num_samples,
            block_rows=self.workload.shard_rows,
            batch_size=self.workload.batch_size,
            seed=0,
        )

    def _train(self, mode: str, store: str, loader: str = "process", threads: int = 0) -> float:
        output = self.workdir / "runs" / f"{mode}-{next(self._count)}"
        metrics = run_training(
            self.workload, self.stores[store], mode, output, loader=loader, threads=threads
        )
        name = mode if store == "dense" else f"{mode}-{store}"
        name += "-thread" if loader == "thread" else ""
        name += "-cores" if threads else ""
        self.wait.setdefault(name, []).extend(metrics["data_wait_fraction"][1:])
        self.step_periods.setdefault(name, []).append(median(metrics["step_seconds_median"][1:]))
        return median(metrics["epoch_seconds"][1:])

    def _layout(self, mode: str, store: str) -> RowLayout:
        if (mode, store) not in self._layouts:
            config = TrainConfig(
                student=self.workload.student,
                dataset=self.workload.dataset,
                store=str(self.stores[store]),
                mode=mode,
                epochs=2,
                batch_size=self.workload.batch_size,
                output=str(self.workdir / "unused"),
            )
            self._layouts[mode, store] = RowLayout(config, Ranks(), torch.device("cpu"), None)
        return self._layouts[mode, store]

    def _loader(self, mode: str, store: str) -> float:
        """CPU seconds of one later epoch's batches from the trainer's own batch source."""
        layout = self._layout(mode, store)
        plan = self._plan()
        plan.set_epoch(1)
        stride = epoch_hash_stride(layout.config, first_epoch=False)
        start = time.process_time()
        for _ in layout.batches(plan, len(plan), hash_stride=stride, then=None):
            pass
        return time.process_time() - start

    def _steps(self, mode: str, store: str) -> float:
        """An epoch's steps on one fixed batch: the training thread's work without a loader."""
        layout = self._layout(mode, store)
        plan = self._plan()
        batches = layout.batches(plan, len(plan), hash_stride=0, then=None)
        batch = next(batches)
        batches.close()  # stops the stream's threads
        student = instantiate(self.workload.student, "student")
        optimizer = torch.optim.AdamW(student.parameters())

        def epoch() -> None:
            for _ in range(len(plan)):
                loss, _ = layout.loss(student, batch, None)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                float(loss.detach())

        return timed(epoch)

    def _stream(self) -> float:
        stream = SoftLabelStream(LogitStore.open(self.stores["dense"]))
        plan = self._plan()
        return timed(lambda: all(True for _ in stream.batches(plan)))

    def _hash(self) -> float:
        return timed(lambda: [hash_rows(inputs) for inputs in self._inputs])

    def cases(self) -> dict[str, Callable[[], float]]:
        cases = self._all_cases()
        if self.part == "goals":
            return {k: v for k, v in cases.items() if k not in VARIANT_RUNS}
        if self.part == "variants":
            return {k: cases[k] for k in ("hard", "offline-topk", *VARIANT_RUNS)}
        return cases

    def _all_cases(self) -> dict[str, Callable[[], float]]:
        return {
            "hard": lambda: self._train("hard", "dense"),
            "offline": lambda: self._train("offline", "dense"),
            "offline-topk": lambda: self._train("offline", "topk"),
            # The same runs with batches made on a thread of the training process: the GIL
            # shared with the step (see `softcache.trainer.batch_process`).
            # The same runs at torch's default of one thread per core, where the trainer
            # leaves a core to the batch process (`softcache.runtime.threads`).
            "hard-cores": lambda: self._train("hard", "dense", threads=usable_cores()),
            "offline-topk-cores": lambda: self._train("offline", "topk", threads=usable_cores()),
            "hard-thread": lambda: self._train("hard", "dense", "thread"),
            "offline-thread": lambda: self._train("offline", "dense", "thread"),
            "offline-topk-thread": lambda: self._train("offline", "topk", "thread"),
            "stream": self._stream,
            "hash": self._hash,
            "step-hard": lambda: self._steps("hard", "dense"),
            "step-offline": lambda: self._steps("offline", "dense"),
            "step-offline-topk": lambda: self._steps("offline", "topk"),
            "loader-hard": lambda: self._loader("hard", "dense"),
            "loader-offline": lambda: self._loader("offline", "dense"),
            "loader-offline-topk": lambda: self._loader("offline", "topk"),
            # How much of a core this machine left a busy thread beside a second busy core,
            # this round: where it is well under 1, the batch process's CPU is the step's.
            **({"core-share": _core_share} if (os.cpu_count() or 1) > 1 else {}),
        }

    def figures(self, samples: dict[str, list[float]]) -> list[Figure]:
        w = self.workload
        prefix = f"{w.label} " if w.label else ""
        figures = []
        if self.part != "variants":
            figures += self._goal_figures(samples, prefix)
        if self.part != "goals":
            figures += self._variant_figures(samples, prefix)
        own = {"all": GOAL_RUNS + VARIANT_RUNS, "goals": GOAL_RUNS, "variants": VARIANT_RUNS}
        figures.extend(
            wait_figure(f"{prefix}data wait fraction, {name}", name, values)
            for name, values in self.wait.items()
            if name in own[self.part]
        )
        return figures

    def _goal_figures(self, samples: dict[str, list[float]], prefix: str) -> list[Figure]:
        w = self.workload
        note = f"N={self.num_samples}, batch {w.batch_size}, {w.epochs - 1} timed epochs/run"
        figures = [
            ratio_figure(
                f"{prefix}offline KD / hard epoch, {what}",
                samples,
                over,
                "hard",
                goal=w.goal,
                note=note,
            )
            for over, what in (("offline", "dense"), ("offline-topk", "top-5"))
        ]
        for over, what in (("offline", "dense"), ("offline-topk", "top-5")):
            figures.append(
                ratio_figure(
                    f"{prefix}median step: offline KD / hard, {what}",
                    self.step_periods,
                    over,
                    "hard",
                    goal=None,
                    note="the same runs: each step from the end of the one before, wait "
                    "included; median of the later epochs' medians",
                )
            )
        for case, what in (("step-offline", "dense"), ("step-offline-topk", "top-5")):
            figures.append(
                ratio_figure(
                    f"{prefix}training thread alone: offline / hard steps, {what}",
                    samples,
                    case,
                    "step-hard",
                    goal=None,
                    note="an epoch of steps on one batch, no loader: the losses' own cost",
                )
            )
        for case in ("loader-hard", "loader-offline", "loader-offline-topk"):
            figures.append(
                ratio_figure(
                    f"{prefix}share: {case} CPU / hard epoch",
                    samples,
                    case,
                    "hard",
                    goal=None,
                    note="CPU seconds (all threads) of an epoch's batches, no student",
                )
            )
        figures.append(
            ratio_figure(
                f"{prefix}share: stream alone / hard epoch",
                samples,
                "stream",
                "hard",
                goal=None,
                note="reading + decoding an epoch of soft labels, no student",
            )
        )
        figures.append(
            ratio_figure(
                f"{prefix}share: input hashing / hard epoch",
                samples,
                "hash",
                "hard",
                goal=None,
                note="the alignment check's blake2b over every input of an epoch",
            )
        )
        shares = samples.get("core-share")
        if shares:
            figures.append(
                Figure(
                    name=f"{prefix}core share beside a busy core",
                    value=statistics.median(shares),
                    detail=f"per round {', '.join(f'{v:.2f}' for v in shares)}; a spinning "
                    "thread's CPU / wall seconds beside a spinning process (1: cores of its own)",
                    samples={"core-share": shares},
                )
            )
        return figures

    def _variant_figures(self, samples: dict[str, list[float]], prefix: str) -> list[Figure]:
        figures = []
        for over, what in (("offline-thread", "dense"), ("offline-topk-thread", "top-5")):
            figures.append(
                ratio_figure(
                    f"{prefix}batches on a thread: offline KD / hard epoch, {what}",
                    samples,
                    over,
                    "hard-thread",
                    goal=None,
                    note="--loader thread, both runs (the default: a batch process)",
                )
            )
        figures.append(
            ratio_figure(
                f"{prefix}one thread per core: offline KD / hard epoch, top-5",
                samples,
                "offline-topk-cores",
                "hard-cores",
                goal=None,
                note=f"--threads {usable_cores()}, both runs (the default: a core left to the "
                "batch process)",
            )
        )
        for case, over in (("hard", "hard-cores"), ("offline-topk", "offline-topk-cores")):
            figures.append(
                ratio_figure(
                    f"{prefix}{case} epoch, the trainer's threads / one per core",
                    samples,
                    case,
                    over,
                    goal=None,
                    note="what leaving a core to the batch process saves",
                )
            )
        figures.append(
            ratio_figure(
                f"{prefix}hard epoch, batch process / batch thread",
                samples,
                "hard",
                "hard-thread",
                goal=None,
                note="what making batches in a child process saves a hard-label run",
            )
        )
        return figures


@dataclass(frozen=True)
class ModelCosts:
    """Median seconds per batch of the teacher's and the student's passes."""

    teacher_fwd_bwd: float
    student_fwd_bwd: float
    teacher_fwd: float
    student_step: float
    samples: dict[str, list[float]]

    @property
    def fwd_bwd_ratio(self) -> float:
        return self.teacher_fwd_bwd / self.student_fwd_bwd

    @property
    def expected_online(self) -> float:
        """Online / offline epoch if the only difference were the teacher's forward."""
        return 1 + self.teacher_fwd / self.student_step

    def figure(self, name: str) -> Figure:
        """The fwd+bwd cost ratio as a figure, with every pass's time in the detail."""
        return Figure(
            name=name,
            value=self.fwd_bwd_ratio,
            detail=(
                f"per batch: teacher fwd+bwd {self.teacher_fwd_bwd * 1e3:.1f} ms, student "
                f"{self.student_fwd_bwd * 1e3:.1f} ms; teacher inference fwd "
                f"{self.teacher_fwd * 1e3:.1f} ms, student step {self.student_step * 1e3:.1f} ms"
            ),
            samples=self.samples,
        )


def _core_share() -> float:
    share = core_share()
    assert share is not None  # the case exists only with two cores or more
    return share


def model_costs(workload: TrainWorkload, batch_size: int, rounds: int = 7) -> ModelCosts:
    """Time the teacher's and the student's passes on one batch of the dataset, interleaved."""
    dataset = instantiate(workload.dataset, "dataset")
    device = workload.device
    inputs = torch.stack([dataset[i][0] for i in range(batch_size)]).to(device)
    labels = torch.tensor([dataset[i][1] for i in range(batch_size)]).to(device)
    teacher: nn.Module = instantiate(workload.teacher, "teacher").to(device)
    student: nn.Module = instantiate(workload.student, "student").to(device)
    optimizer = torch.optim.AdamW(student.parameters())

    def fwd_bwd(model: nn.Module) -> Callable[[], float]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(inputs), labels).backward()

        return lambda: timed(run)

    def teacher_fwd() -> None:
        with torch.inference_mode():
            teacher(inputs)

    def student_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(student(inputs), labels).backward()
        optimizer.step()

    samples = interleave(
        {
            "teacher_fwd_bwd": fwd_bwd(teacher),
            "student_fwd_bwd": fwd_bwd(student),
            "teacher_fwd": lambda: timed(teacher_fwd),
            "student_step": lambda: timed(student_step),
        },
        rounds,
    )
    return ModelCosts(**{k: median(v) for k, v in samples.items()}, samples=samples)
