"""The row KD loss inside a student's steps: each mode's forward, loss and backward, step by step.

    .venv/bin/python -m benchmarks.loss_steps                  # the fast student, 30 epochs
    .venv/bin/python -m benchmarks.loss_steps --student benchmarks.models:student_cnn --epochs 10

`benchmarks.row_loss` times the loss alone, in a tight loop where every tensor stays in cache.
In a step the student's forward and backward pass over its weights and activations between
the loss's ops, so each op starts cold and costs more (on this project's CPUs, several times
more): this times the loss where it runs. One student per mode (hard, offline dense, offline
top-5 from the train section's stores, built afresh into `--workdir`), each over the same
64 batches (made once by the trainer's own layouts, teacher targets included, held in private
memory), and top-5 again from torch ops instead of numba's compiled pass
(`softcache.losses.topk_kernel`; the same row where numba is not installed), trained step by
step in turn: step i of every mode, then step i + 1, the order
reversed every other step, so the machine's drift falls on every mode alike. Each step's
forward + loss + backward is timed (`time.perf_counter`, the optimiser's step left out); the
table gives each mode's median and mean over all steps and the median's difference from the
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


def step_times(bench: TrainBench, epochs: int) -> dict[str, list[float]]:
    """Seconds of each step's forward + loss + backward, per mode, the modes interleaved."""
    batches: dict[str, tuple[RowLayout, list[Any]]] = {}
    for name, (mode, store, _) in MODES.items():
        layout = bench._layout(mode, store)
        plan = bench._plan()
        batches[name] = (layout, list(layout.batches(plan, len(plan), hash_stride=0, then=None)))
    students = {name: instantiate(bench.workload.student, "student") for name in MODES}
    optimizers = {name: torch.optim.AdamW(s.parameters()) for name, s in students.items()}
    times: dict[str, list[float]] = {name: [] for name in MODES}
    names = list(MODES)
    steps = len(next(iter(batches.values()))[1])
    for epoch in range(epochs):
        for i in range(steps):
            for name in names if (epoch + i) % 2 else reversed(names):
                layout, held = batches[name]
                compiled = MODES[name][2]
                with contextlib.nullcontext() if compiled else topk_kernel.switched_off():
                    start = time.perf_counter()
                    loss, _ = layout.loss(students[name], held[i], None)
                    optimizers[name].zero_grad(set_to_none=True)
                    loss.backward()
                    times[name].append(time.perf_counter() - start)
                optimizers[name].step()
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default=FAST_STUDENT, help="student spec")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of 64 steps per mode")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--workdir", type=Path, default=Path("data/bench/loss-steps"), help="the stores' folder"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workload = TrainWorkload("", args.student, TEACHER, FULL.images)
    times = step_times(TrainBench(workload, args.workdir), args.epochs)
    hard = statistics.median(times["hard"])
    print(f"{'mode':16} {'median µs':>10} {'mean µs':>10} {'over hard':>10}")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:16} {median * 1e6:10.1f} {statistics.mean(values) * 1e6:10.1f} "
            f"{(median - hard) * 1e6:+10.1f}"
        )


if __name__ == "__main__":
    main()
