"""Speed-up: online-KD epochs (the teacher in the loop) over offline-KD epochs, for three teachers.

What an offline store buys grows with the teacher: online KD runs the teacher's forward on every
batch of every epoch, offline KD reads its logits back. So the figure is measured for teachers whose
forward+backward costs about 3x, 10x and 30x the student's (`benchmarks.models`), and each speed-up
is printed next to the cost ratio measured in the same run, since the targets are approximate. If
the teacher's forward were the only difference, online / offline would be about
`1 + teacher forward / student step`; the detail gives that expectation too.

Both modes run through `softcache.trainer.train` with the same student, data order, optimiser and
batch size. The offline store is built by the cheapest teacher: what an offline epoch costs depends
on the store's shape, not on whose logits it holds, and online mode reads only its block layout.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

from benchmarks.build import fresh_store
from benchmarks.harness import Figure, median, ratio_figure
from benchmarks.train import TrainWorkload, model_costs, run_training
from softcache.store import LogitStore


class SpeedupBench:
    """Cases `offline` and `online-<label>` for each teacher (label: its target cost, e.g. `3x`).

    Args:
        workload: student, dataset, batch size and offline epochs per run; its teacher builds the
            offline store.
        teachers: label -> teacher spec, cheapest first.
        workdir: where the store and the runs go.
        online_epochs: epochs per online run (the first is warm-up; online epochs are long).
        cost_rounds: interleaved rounds of `model_costs` per teacher.
    """

    warmup = False  # training runs discard their own first epoch

    def __init__(
        self,
        workload: TrainWorkload,
        teachers: Mapping[str, str],
        workdir: Path,
        *,
        online_epochs: int,
        cost_rounds: int,
    ) -> None:
        self.workload = workload
        self.teachers = dict(teachers)
        self.workdir = workdir
        self.online_epochs = online_epochs
        self.cost_rounds = cost_rounds
        build = workload.build_workload()
        self.store = fresh_store(build, "dense", workdir / "speedup-dense.zarr")
        self.num_samples = LogitStore.open(self.store).meta.num_samples
        self._count = itertools.count()

    def _epoch(self, mode: str, teacher: str | None = None) -> float:
        output = self.workdir / "runs" / f"speedup-{mode}-{next(self._count)}"
        epochs = self.online_epochs if mode == "online" else self.workload.epochs
        metrics = run_training(
            self.workload, self.store, mode, output, teacher=teacher, epochs=epochs
        )
        return median(metrics["epoch_seconds"][1:])

    def cases(self) -> dict[str, Callable[[], float]]:
        cases: dict[str, Callable[[], float]] = {"offline": lambda: self._epoch("offline")}
        for label, spec in self.teachers.items():
            cases[f"online-{label}"] = lambda spec=spec: self._epoch("online", spec)
        return cases

    def figures(self, samples: dict[str, list[float]]) -> list[Figure]:
        w = self.workload
        note = (
            f"N={self.num_samples}, batch {w.batch_size}; {self.online_epochs - 1} timed "
            f"online epoch(s) and {w.epochs - 1} offline per run"
        )
        figures = []
        for label, spec in self.teachers.items():
            cost = model_costs(replace(w, teacher=spec), w.batch_size, rounds=self.cost_rounds)
            figures.append(
                ratio_figure(
                    f"online / offline KD epoch, teacher ~{label}",
                    samples,
                    f"online-{label}",
                    "offline",
                    goal=None,
                    higher_is_better=True,
                    note=(
                        f"teacher fwd+bwd measured {cost.fwd_bwd_ratio:.1f}x student's (target "
                        f"~{label}); expected ~ 1 + teacher fwd / student step = "
                        f"{cost.expected_online:.2f}; {note}"
                    ),
                )
            )
            figures.append(cost.figure(f"teacher ~{label} / student cost (fwd+bwd)"))
        return figures
