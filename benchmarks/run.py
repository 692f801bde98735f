"""Run the benchmarks: `python -m benchmarks.run [--quick|--full] [--json PATH]` from the repo root.

Prints one table (each figure next to its goal) and writes the figures, the raw timings and the
machine's load to JSON. `--quick` (under a minute) is a smoke run on small workloads; `--full`
(the default, a few minutes) gives the figures to report. `--profile SECTION:CASE` runs one case
under cProfile instead, to see where its time goes. See benchmarks/README.md for how to read it.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch

from benchmarks import digits
from benchmarks.build import BuildBench, BuildWorkload
from benchmarks.harness import Figure, environment, interleave, table, write_json
from benchmarks.stream import StreamBench
from benchmarks.train import TrainBench, TrainWorkload

SECTIONS = ("build", "train", "stream", "digits")
DEFAULT_JSON = Path("data/bench/results.json")
# A 1-minute load average above this (the benchmark itself keeps about one core busy) means that
# other processes shared the machine.
BUSY_LOAD = 1.5
TEACHER = "benchmarks.models:teacher_cnn"
STUDENT = "benchmarks.models:student_cnn"
WIDE_TEACHER = "benchmarks.models:teacher_wide"


@dataclass(frozen=True)
class Settings:
    """Workload sizes and repetitions of one mode."""

    mode: str
    images: str
    vectors: str
    build_rounds: int
    train_rounds: int
    train_epochs: int
    online_epochs: int
    stream_rounds: int
    digits_rounds: int
    digits_epochs: int


QUICK = Settings(
    mode="quick",
    images="benchmarks.models:images_quick",
    vectors="benchmarks.models:vectors_quick",
    build_rounds=2,
    train_rounds=3,
    train_epochs=3,
    online_epochs=2,
    stream_rounds=3,
    digits_rounds=2,
    digits_epochs=4,
)
FULL = Settings(
    mode="full",
    images="benchmarks.models:images_full",
    vectors="benchmarks.models:vectors_full",
    build_rounds=7,
    train_rounds=5,
    train_epochs=3,
    online_epochs=2,
    stream_rounds=5,
    digits_rounds=3,
    digits_epochs=6,
)


class Bench(Protocol):
    warmup: bool

    def cases(self) -> dict[str, Callable[[], float]]: ...

    def figures(self, samples: dict[str, list[float]]) -> list[Figure]: ...


def benches(section: str, settings: Settings, workdir: Path) -> list[tuple[Bench, int]]:
    """The benches of a section with their number of rounds (setup, such as store builds, runs here)."""
    s = settings
    if section == "build":
        return [(BuildBench(BuildWorkload("", TEACHER, s.images), workdir), s.build_rounds)]
    if section == "train":
        workload = TrainWorkload(
            "", STUDENT, TEACHER, s.images, epochs=s.train_epochs, online_epochs=s.online_epochs
        )
        return [(TrainBench(workload, workdir), s.train_rounds)]
    if section == "stream":
        return [(StreamBench(WIDE_TEACHER, s.vectors, workdir), s.stream_rounds)]
    digits.ensure_teacher()
    return [
        (BuildBench(digits.build_workload(), workdir), s.digits_rounds),
        (TrainBench(digits.train_workload(s.digits_epochs), workdir), s.digits_rounds),
    ]


def profile(target: str, settings: Settings, workdir: Path, top: int = 30) -> None:
    """Run one case (after a warm-up call) under cProfile and print its heaviest calls."""
    section, _, case = target.partition(":")
    if section not in SECTIONS:
        raise SystemExit(f"--profile: unknown section {section!r}; choose from {SECTIONS}")
    for bench, _ in benches(section, settings, workdir):
        cases = bench.cases()
        if case in cases:
            cases[case]()
            profiler = cProfile.Profile()
            profiler.runcall(cases[case])
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(top)
            return
    raise SystemExit(f"--profile: section {section} has no case {case!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small workloads, under a minute")
    size.add_argument("--full", action="store_true", help="the reported figures (default)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1; see README, 'Why one torch thread')",
    )
    parser.add_argument(
        "--profile", metavar="SECTION:CASE", help="profile one case, e.g. train:offline"
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section(s) {unknown}; choose from {SECTIONS}")

    with tempfile.TemporaryDirectory(prefix="softcache-bench-") as tmp:
        workdir = Path(tmp)
        if args.profile:
            profile(args.profile, settings, workdir)
            return
        env = environment()
        print(
            f"softcache benchmarks, {settings.mode} mode: torch {env['torch']}, "
            f"{env['torch_threads']} thread(s), {env['cpu_count']} CPUs, "
            f"load average {env['load_average']:.2f}",
            file=sys.stderr,
        )
        figures: list[Figure] = []
        t0 = time.perf_counter()
        for section in sections:
            for bench, rounds in benches(section, settings, workdir):
                names = ", ".join(bench.cases())
                print(
                    f"[{time.perf_counter() - t0:6.1f} s] {section}: {rounds} rounds of {names}",
                    file=sys.stderr,
                )
                samples = interleave(bench.cases(), rounds, warmup=bench.warmup)
                figures.extend(bench.figures(samples))
        print(f"[{time.perf_counter() - t0:6.1f} s] done", file=sys.stderr)
    load = (env["load_average"], os.getloadavg()[0])
    print(table(figures))
    print(f"\nload average {load[0]:.2f} at start, {load[1]:.2f} at end", end="")
    if max(load) > BUSY_LOAD:
        print(": other processes were running, expect noise (see each figure's 'rounds' range)")
    else:
        print()
    run = {"mode": settings.mode, "settings": asdict(settings), "environment": env}
    write_json(args.json, {**run, "load_average_end": load[1]}, figures)
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
