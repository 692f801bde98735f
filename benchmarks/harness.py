"""Timing machinery: interleaved repetitions, medians, figures, the table and the JSON file.

The machines here are shared and noisy (two CPU cores, tests running beside the benchmark), so a
figure is never an absolute time: it is a ratio of two cases timed side by side in one process,
repeated in turn (A, B, A, B, ...) after one discarded warm-up round, and summarised by the ratio
of their medians. The spread of the per-round ratios is printed next to it as a noise gauge.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Figure:
    """One line of the results table.

    Attributes:
        name: what is measured ("build / bare loop, dense").
        value: the figure (a ratio, or bytes for storage rows).
        unit: "x" for ratios, else printed after the value ("B/sample", "% of epoch").
        goal: the largest acceptable value (the smallest with `higher_is_better`), or None for
            an informational figure.
        detail: how to read it: the medians behind the ratio, the noise, the conditions.
        samples: the raw timings (seconds) or values behind the figure, per case.
        higher_is_better: the goal is a floor (a throughput), not a ceiling (an overhead).
    """

    name: str
    value: float
    unit: str = "x"
    goal: float | None = None
    detail: str = ""
    samples: Mapping[str, Sequence[float]] = field(default_factory=dict)
    higher_is_better: bool = False

    @property
    def ok(self) -> bool | None:
        """Whether the value meets the goal; None without a goal."""
        if self.goal is None:
            return None
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal

    @property
    def goal_text(self) -> str:
        """The goal as the table prints it: `<= 1.05`, `>= 0.7`, or `-`."""
        if self.goal is None:
            return "-"
        return f"{'>=' if self.higher_is_better else '<='} {self.goal:g}"


def interleave(
    cases: Mapping[str, Callable[[], float]],
    rounds: int,
    *,
    warmup: bool = True,
    alternate: bool = True,
) -> dict[str, list[float]]:
    """Run every case once per round, in turn, after one discarded warm-up round.

    Args:
        cases: name -> a callable returning the seconds (or any measure) of one run.
        rounds: measured rounds.
        warmup: run the discarded round first (cases that discard their own warm-up skip it).
        alternate: run every other round in the reverse order, so that what a case's place in
            a round costs or saves it (the caches or the allocator the case before left, the
            machine's drift over a round) falls on every case alike; False for cases that
            need the ones before them (a build whose store the next case reads).

    Returns:
        name -> the `rounds` measures, in order.
    """
    if warmup:
        for run in cases.values():
            run()
    out: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 or not alternate else reversed(names):
            out[name].append(cases[name]())
    return out


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call (CUDA work it queued included: the device is synchronised)."""
    _synchronize()
    t0 = time.perf_counter()
    fn()
    _synchronize()
    return time.perf_counter() - t0


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def default_device() -> str:
    """`cuda` where a GPU is present, else `cpu`: what `--device auto` means."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ratio_figure(
    name: str,
    samples: Mapping[str, Sequence[float]],
    over: str,
    under: str,
    *,
    goal: float | None,
    note: str = "",
    scale: float = 1.0,
    higher_is_better: bool = False,
) -> Figure:
    """scale * median(samples[over]) / median(samples[under]), with the per-round spread.

    Args:
        name: the figure's name.
        samples: case -> per-round timings, from `interleave`.
        over: the numerator's case.
        under: the denominator's case.
        goal: see `Figure.goal`.
        note: appended to the detail.
        scale: multiplies the ratio and every per-round ratio (for example 1 / cpu count, to
            compare with a baseline run on one core of several).
        higher_is_better: see `Figure.higher_is_better`.
    """
    a, b = median(samples[over]), median(samples[under])
    rounds = [scale * x / y for x, y in zip(samples[over], samples[under], strict=False) if y > 0]
    spread = f"rounds {min(rounds):.3f}-{max(rounds):.3f}" if len(rounds) > 1 else ""
    detail = (
        f"{over} {format_seconds(a)} / {under} {format_seconds(b)}, median of {len(samples[over])}"
    )
    detail = "; ".join(part for part in (detail, spread, note) if part)
    return Figure(
        name=name,
        value=scale * a / b,
        goal=goal,
        detail=detail,
        samples={over: list(samples[over]), under: list(samples[under])},
        higher_is_better=higher_is_better,
    )


def wait_figure(name: str, case: str, fractions: Sequence[float]) -> Figure:
    """A run's data wait as a figure: the median of its epochs' `data_wait_fraction`, in %.

    Args:
        name: the figure's name.
        case: the case the fractions are of (the key of its samples).
        fractions: each timed epoch's share of time the step waited for its batch.
    """
    return Figure(
        name=name,
        value=100 * statistics.median(fractions),
        unit="% of epoch",
        detail=f"median over {len(fractions)} epochs; time the step waited for its batch",
        samples={case: list(fractions)},
    )


def format_seconds(s: float) -> str:
    """A duration for the detail column: `12.3 µs`, `45.6 ms` or `7.89 s`."""
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def table(figures: Sequence[Figure]) -> str:
    """The results as a fixed-width text table: figure, value, goal, verdict, how to read it."""
    rows = [("figure", "value", "goal", "ok", "detail")]
    for f in figures:
        value = f"{f.value:.3f}x" if f.unit == "x" else f"{f.value:,.1f} {f.unit}"
        ok = {None: "", True: "yes", False: "NO"}[f.ok]
        rows.append((f.name, value, f.goal_text, ok, f.detail))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, row in enumerate(rows):
        cells = [
            row[0].ljust(widths[0]),
            *(c.rjust(w) for c, w in zip(row[1:4], widths[1:], strict=True)),
        ]
        lines.append("  ".join([*cells, row[4]]).rstrip())
        if i == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def core_share(seconds: float = 0.5) -> float | None:
    """The share of its core a busy thread keeps while another process keeps a second core busy.

    Its CPU seconds over its wall seconds, spinning beside a spinning child process. About 1.0
    where the machine's cores are its own. Less where the two busy cores share a physical core
    (a virtual machine whose host is busy: its virtual CPUs take turns): then whatever runs beside
    a training thread (the batch process) takes its time from that thread. On this machine (a
    Firecracker VM of two vCPUs) a pinned training loop kept about half its core beside a
    spinner in some minutes and all of it in others (benchmarks/README.md). It does not see a
    host that slows the vCPUs without taking them away (CPU time then equals wall time).

    Returns:
        The share, or None on a machine with one usable core (nothing to share).
    """
    if (os.cpu_count() or 1) < 2:
        return None
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # the child's interpreter starting
        wall, cpu = time.perf_counter(), time.thread_time()
        while time.perf_counter() - wall < seconds:
            pass
        return (time.thread_time() - cpu) / (time.perf_counter() - wall)
    finally:
        child.kill()
        child.wait()


def environment() -> dict[str, Any]:
    """What the numbers are measured on, and how busy the machine is (1-minute load average)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_average": os.getloadavg()[0],
    }


def write_json(path: Path, run: Mapping[str, Any], figures: Sequence[Figure]) -> None:
    """Write the results (run settings, environment, figures with raw samples) as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {**run, "figures": [{**asdict(f), "ok": f.ok} for f in figures]}
    path.write_text(json.dumps(data, indent=2) + "\n")
