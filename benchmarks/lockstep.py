"""The train section's goal runs taking turns an epoch at a time: offline / hard epochs with the
machine's drift paired out.

`benchmarks.train` times whole runs one after another (a round: hard, offline, offline top-5,
...), and a run's epoch time is the median of its few later epochs. On this VM the vCPUs' speed
moves over seconds (benchmarks/README.md, thirteenth pass): runs a few seconds apart see different
machines. The fast student's per-round ratios spread over 0.78-1.31, and the median of 21 rounds
of the same code moved by 0.06 between two runs an hour apart, more than the overhead the goal
is about.

Here the same runs (`benchmarks.train.training_config`: the same student, store, plan,
optimiser and batch process) each train in a process of its own, all alive at once, and take
turns by epochs: each pauses after an epoch (`softcache.trainer.train`'s `on_epoch_end`) until its
next turn, so epoch e of every mode runs within a second or two of the others', the order
reversed every other turn. An epoch's time is the loop's own clock (`epoch_seconds`), as in
`benchmarks.train`, and each run's first epoch (imports, the batch process's start, allocator
growth) is left out.

What the pause changes: a paused run's batch process goes on making its next epoch's first
batches until its slots are full (the loop's own evaluation and checkpoint give it the same head
start at every epoch's end, for less time), for every mode alike. The steps and their hand-offs
are the training's own.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import shutil
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchmarks.harness import Figure, median, ratio_figure
from benchmarks.train import TrainWorkload, training_config
from softcache.config import TrainConfig
from softcache.trainer import train
from softcache.trainer.batch_process import _without_main

# The train section's goal runs: name -> (mode, store).
RUNS = {
    "hard": ("hard", "dense"),
    "offline": ("offline", "dense"),
    "offline-topk": ("offline", "topk"),
}
# Seconds a turn may take before the run is given up on (an epoch takes about one here).
TURN_TIMEOUT = 600.0


@dataclass
class EpochTimes:
    """One run's later epochs (its first left out), in turn order.

    Attributes:
        seconds: each epoch's `epoch_seconds`.
        wait: each epoch's `data_wait_fraction`.
        step: each epoch's `step_seconds_median`.
    """

    seconds: list[float] = field(default_factory=list)
    wait: list[float] = field(default_factory=list)
    step: list[float] = field(default_factory=list)


class LockstepError(RuntimeError):
    """A run in turns failed or stopped answering."""


def in_turns(configs: Mapping[str, TrainConfig]) -> dict[str, EpochTimes]:
    """Train each config in its own process, the runs taking turns by epochs (module docstring).

    Args:
        configs: name -> a run's config; every one with the same `epochs`, each its own
            `output` (removed afterwards).

    Returns:
        name -> its epochs after the first, aligned across runs (index i: the same turn).

    Raises:
        LockstepError: a run raised (its traceback in the message), died, or took longer than
            `TURN_TIMEOUT` for an epoch.
    """
    epochs = {config.epochs for config in configs.values()}
    if len(epochs) != 1:
        raise ValueError(f"runs in turns need the same number of epochs, got {sorted(epochs)}")
    (count,) = epochs
    context = multiprocessing.get_context("spawn")
    runs: dict[str, tuple[multiprocessing.process.BaseProcess, Connection]] = {}
    try:
        for name, config in configs.items():
            ours, theirs = context.Pipe()
            # Not a daemon: a run starts its own batch process.
            process = context.Process(target=_run, args=(config, theirs), name=f"turns-{name}")
            with _without_main():  # as the trainer starts its batch process: no script re-run
                process.start()
            theirs.close()
            runs[name] = (process, ours)
        out = {name: EpochTimes() for name in configs}
        names = list(configs)
        for epoch in range(count):
            for name in names if epoch % 2 == 0 else reversed(names):
                kind, *rest = _turn(name, *runs[name])
                if kind != "epoch" or rest[0] != epoch:
                    raise LockstepError(f"run {name!r}: expected epoch {epoch}, got {kind} {rest}")
                if epoch > 0:
                    seconds, wait, step = rest[1:]
                    out[name].seconds.append(seconds)
                    out[name].wait.append(wait)
                    out[name].step.append(step)
        for name in names:  # past the last epoch's pause: each run ends
            kind, *rest = _turn(name, *runs[name])
            if kind != "done":
                raise LockstepError(f"run {name!r}: expected its end, got {kind} {rest}")
        return out
    finally:
        for process, conn in runs.values():
            if process.is_alive():
                with contextlib.suppress(OSError):
                    conn.send("stop")
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()


def _turn(
    name: str, process: multiprocessing.process.BaseProcess, conn: Connection
) -> tuple[Any, ...]:
    """Let the run take its next epoch; its report."""
    conn.send("go")
    deadline = time.monotonic() + TURN_TIMEOUT
    while not conn.poll(1.0):
        if not process.is_alive():
            raise LockstepError(f"run {name!r} exited (code {process.exitcode}) during its turn")
        if time.monotonic() > deadline:
            raise LockstepError(f"run {name!r} took over {TURN_TIMEOUT:.0f} s for an epoch")
    message: tuple[Any, ...] = conn.recv()
    if message[0] == "error":
        raise LockstepError(f"run {name!r} failed:\n{message[1]}")
    return message


class _Stopped(Exception):
    """The controller ended the run between epochs."""


def _run(config: TrainConfig, conn: Connection) -> None:
    """A run's process: train `config`, pausing after each epoch until told to go on."""

    def pause(epoch: int, metrics: dict[str, Any]) -> None:
        keys = ("epoch_seconds", "data_wait_fraction", "step_seconds_median")
        report = ("epoch", epoch, *(metrics[key][-1] for key in keys))
        conn.send(report)
        if conn.recv() != "go":
            raise _Stopped

    try:
        if conn.recv() != "go":
            return
        train(config, progress=False, on_epoch_end=pause)
        conn.send(("done",))
    except _Stopped:
        pass
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        shutil.rmtree(config.output, ignore_errors=True)
        conn.close()


class LockstepBench:
    """The goal runs of a workload in turns by epochs (`in_turns`), a set of runs a round.

    Args:
        workload: the student, teacher and dataset (its stores come from the train bench).
        workdir: where the runs write.
        stores: `dense` and `topk`: the train bench's stores of the same workload.
        epochs: epochs per run, the first left out.
        goal: the goal of the epoch ratios (None: informational).
    """

    warmup = False

    def __init__(
        self,
        workload: TrainWorkload,
        workdir: Path,
        stores: Mapping[str, Path],
        epochs: int,
        *,
        goal: float | None,
    ) -> None:
        self.workload = workload
        self.workdir = workdir
        self.stores = stores
        self.epochs = epochs
        self.goal = goal
        self.times = {name: EpochTimes() for name in RUNS}
        self._round = 0

    def cases(self) -> dict[str, Callable[[], float]]:
        return {"turns": self._round_of_turns}

    def _round_of_turns(self) -> float:
        self._round += 1
        configs = {
            name: training_config(
                self.workload,
                self.stores[store],
                mode,
                self.workdir / f"turns-{self._round}" / name,
                epochs=self.epochs,
            )
            for name, (mode, store) in RUNS.items()
        }
        start = time.perf_counter()
        for name, times in in_turns(configs).items():
            kept = self.times[name]
            kept.seconds += times.seconds
            kept.wait += times.wait
            kept.step += times.step
        return time.perf_counter() - start

    def figures(self, samples: dict[str, list[float]]) -> list[Figure]:
        w = self.workload
        prefix = f"{w.label} " if w.label else ""
        epochs = {name: times.seconds for name, times in self.times.items()}
        pairs = len(epochs["hard"])
        note = (
            f"{pairs} epochs a mode, the modes in turns by epochs ({self._round} round(s) of "
            f"{self.epochs - 1} timed), batch {w.batch_size}; 'rounds': each turn's ratio"
        )
        figures = [
            ratio_figure(
                f"{prefix}in turns: offline KD / hard epoch, {what}",
                epochs,
                over,
                "hard",
                goal=self.goal,
                note=note,
            )
            for over, what in (("offline", "dense"), ("offline-topk", "top-5"))
        ]
        steps = {name: times.step for name, times in self.times.items()}
        figures += [
            ratio_figure(
                f"{prefix}in turns: median step, offline KD / hard, {what}",
                steps,
                over,
                "hard",
                goal=None,
                note="each epoch's median step, wait included",
            )
            for over, what in (("offline", "dense"), ("offline-topk", "top-5"))
        ]
        waits = {name: 100 * median(times.wait) for name, times in self.times.items()}
        figures.append(
            Figure(
                name=f"{prefix}in turns: data wait, hard / offline / offline-topk",
                value=waits["offline-topk"] - waits["hard"],
                unit="pts",
                detail=" / ".join(f"{waits[name]:.1f}" for name in RUNS)
                + " % of epoch (median of the epochs); the value: top-5's over hard's",
                samples={name: times.wait for name, times in self.times.items()},
            )
        )
        return figures
