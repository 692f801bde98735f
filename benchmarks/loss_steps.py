"""The row KD loss inside a student's steps: each mode's forward, loss, backward and optimiser.

    .venv/bin/python -m benchmarks.loss_steps                  # the fast student, 30 epochs
    .venv/bin/python -m benchmarks.loss_steps --turns epoch    # an epoch of each mode in turn
    .venv/bin/python -m benchmarks.loss_steps --student benchmarks.models:student_cnn --epochs 10

`benchmarks.row_loss` times the loss alone, in a tight loop where every tensor stays in cache.
In a step the student's forward and backward pass over its weights and activations between
the loss's ops, so each op starts cold and costs more (on this project's CPUs, several times
more): this times the loss where it runs. One student per mode (hard, offline dense, offline
top-5 from the train section's stores, built afresh into `--workdir`), each over the same
64 batches (made once by the trainer's own layouts, teacher targets included, held in private
memory), and top-5 again from torch ops instead of numba's compiled pass
(`softcache.losses.topk_kernel`; the same row where numba is not installed). The modes take
turns, step by step (`--turns step`: step i of every mode, then step i + 1, so each step starts
on caches another student filled) or epoch by epoch (`--turns epoch`: as a training run steps),
the order reversed every other turn, so the machine's drift falls on every mode alike. Each
step's phases are timed (`time.perf_counter`): the student's forward, the loss (the trainer's
`layout.loss` on those logits), the backward and the optimiser's step. The table gives each
mode's median per phase and per step, its mean step, and the median step's difference from the
hard mode's: what the offline loss costs a step.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.run import FAST_STUDENT, FULL, TEACHER
from benchmarks.train import TrainBench, TrainWorkload
from softcache.losses import topk_kernel
from softcache.runtime.specs import instantiate
from softcache.trainer.rows import RowLayout

# name -> (the trainer's mode, the train section's store it reads, the compiled top-k loss)
MODES = {
    "hard": ("hard", "dense", True),
    "offline dense": ("offline", "dense", True),
    "offline top-5": ("offline", "topk", True),
    # The same top-5 loss from torch ops (as without numba): what the compiled pass saves.
    "top-5, torch ops": ("offline", "topk", False),
}


PHASES = ("forward", "loss", "backward", "optimiser")
TURNS = ("step", "epoch")


def step_times(
    bench: TrainBench, epochs: int, turns: str = "step"
) -> dict[str, dict[str, list[float]]]:
    """Seconds of each step's phases, per mode, the modes in turns; one epoch of each first,
    discarded (its first steps pay imports, numba's compile or cache load, allocator growth).

    Args:
        bench: the train section's bench of the student (its stores and layouts).
        epochs: timed epochs per mode.
        turns: `step`: step i of every mode, then step i + 1 (each step starts on caches another
            student's step filled); `epoch`: an epoch of every mode in turn (as training runs).
            The order is reversed every other turn.

    Returns:
        mode -> phase (`PHASES`, and `step`: their sum) -> one value per timed step.
    """
    if turns not in TURNS:
        raise ValueError(f"turns must be one of {TURNS}, got {turns!r}")
    batches: dict[str, tuple[RowLayout, list[Any]]] = {}
    for name, (mode, store, _) in MODES.items():
        layout = bench._layout(mode, store)
        plan = bench._plan()
        batches[name] = (layout, list(layout.batches(plan, len(plan), hash_stride=0, then=None)))
    students = {name: instantiate(bench.workload.student, "student") for name in MODES}
    optimizers = {name: torch.optim.AdamW(s.parameters()) for name, s in students.items()}
    times = {name: {phase: [] for phase in (*PHASES, "step")} for name in MODES}
    names = list(MODES)
    steps = len(next(iter(batches.values()))[1])

    def step(name: str, i: int, record: bool) -> None:
        layout, held = batches[name]
        student, optimizer = students[name], optimizers[name]
        inputs = held[i][0]
        with contextlib.nullcontext() if MODES[name][2] else topk_kernel.switched_off():
            t0 = time.perf_counter()
            logits = student(inputs)
            t1 = time.perf_counter()
            loss, _ = layout.loss(lambda _: logits, held[i], None)  # type: ignore[arg-type]
            t2 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t3 = time.perf_counter()
            optimizer.step()
            t4 = time.perf_counter()
        if record:
            out = times[name]
            for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                out[phase].append(seconds)
            out["step"].append(t4 - t0)

    for epoch in range(epochs + 1):
        record = epoch > 0
        if turns == "step":
            for i in range(steps):
                for name in names if (epoch + i) % 2 else reversed(names):
                    step(name, i, record)
        else:
            for name in names if epoch % 2 else reversed(names):
                for i in range(steps):
                    step(name, i, record)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default=FAST_STUDENT, help="student spec")
    parser.add_argument("--epochs", type=int, default=30, help="timed epochs of 64 steps per mode")
    parser.add_argument(
        "--turns",
        choices=TURNS,
        default="step",
        help="step: the modes' steps one by one in turn; epoch: an epoch of each in turn",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--workdir", type=Path, default=Path("data/bench/loss-steps"), help="the stores' folder"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workload = TrainWorkload("", args.student, TEACHER, FULL.images)
    times = step_times(TrainBench(workload, args.workdir), args.epochs, args.turns)
    hard = statistics.median(times["hard"]["step"])
    print(f"medians over {len(times['hard']['step'])} steps per mode, turns of a {args.turns}, µs")
    header = "".join(f"{phase:>10}" for phase in (*PHASES, "step"))
    print(f"{'mode':18}{header}{'mean step':>10}{'over hard':>10}")
    for name, phases in times.items():
        cells = "".join(f"{statistics.median(phases[p]) * 1e6:10.1f}" for p in (*PHASES, "step"))
        median = statistics.median(phases["step"])
        mean = statistics.mean(phases["step"])
        print(f"{name:18}{cells}{mean * 1e6:10.1f}{(median - hard) * 1e6:+10.1f}")


if __name__ == "__main__":
    main()
