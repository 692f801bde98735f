"""Run the benchmarks: `python -m benchmarks.run [--quick|--full] [--json PATH]` from the repo root.

Prints one table (each figure next to its goal) and writes the figures, the raw timings and the
machine's load to JSON. `--quick` (under a minute) is a smoke run on small workloads; `--full`
(the default, about seven minutes, and two more for the `lm` section) gives the figures to report.
`--only` picks sections. `--profile SECTION:CASE` runs one case under cProfile instead, to see
where its time goes. See benchmarks/README.md for how to read it.
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
from benchmarks.harness import (
    Figure,
    core_share,
    default_device,
    environment,
    interleave,
    table,
    write_json,
)
from benchmarks.lm import LMBuildBench, LMTrainBench, bytes_workload, v32k_workload
from benchmarks.own_loop import OwnLoopBench
from benchmarks.scaling import ScalingBench
from benchmarks.speedup import SpeedupBench
from benchmarks.storage import StorageBench
from benchmarks.stream import StreamBench
from benchmarks.train import TrainBench, TrainWorkload
from benchmarks.views import ViewsBench

SECTIONS = (
    "build", "views", "train", "own-loop", "speedup", "stream", "storage", "scaling", "digits", "lm",
)  # fmt: skip
DEFAULT_JSON = Path("data/bench/results.json")
# A 1-minute load average above this (the benchmark itself keeps about one core busy) means that
# other processes shared the machine.
BUSY_LOAD = 1.5
TEACHER = "benchmarks.models:teacher_cnn"
STUDENT = "benchmarks.models:student_cnn"
FAST_STUDENT = "benchmarks.models:student_mlp"
WIDE_TEACHER = "benchmarks.models:teacher_wide"
PEAKED_TEACHER = "benchmarks.models:teacher_peaked"
# The speed-up section's teachers by their target cost over the student's, cheapest first.
ONLINE_TEACHERS = {
    "3x": "benchmarks.models:teacher_small",
    "10x": TEACHER,
    "30x": "benchmarks.models:teacher_large",
}


@dataclass(frozen=True)
class Settings:
    """Workload sizes and repetitions of one mode."""

    mode: str
    images: str
    online_images: str
    vectors: str
    peaked: str
    build_rounds: int
    views_rounds: int
    # Rounds of the train section's goal runs (`TrainBench(part="goals")`). Their per-round
    # ratios spread over 0.8-1.3 on this machine (its speed moves from second to second), so a
    # median of 5 or 11 moved by 0.05-0.1 from run to run; the informational variants (a batch
    # thread, a thread per core) get fewer rounds of their own (`*_variant_rounds`), which pays
    # for more of these.
    train_rounds: int
    # The fast student's: its epochs are a quarter of the CNN's, so a round costs about half.
    # Its figures sit within their noise of the goal (rounds of one run over 0.78-1.59; the
    # median of 21 rounds from 0.97 to 1.12 between runs of the same code), so it gets more
    # rounds, and more timed epochs a run (`fast_train_epochs`, the first left out).
    fast_train_rounds: int
    fast_train_epochs: int
    train_variant_rounds: int
    fast_train_variant_rounds: int
    train_epochs: int
    speedup_rounds: int
    online_epochs: int
    cost_rounds: int
    stream_rounds: int
    scaling_sizes: tuple[int, ...]
    scaling_phases: tuple[str, ...]
    digits_rounds: int
    digits_epochs: int
    lm_bytes: str
    lm_tokens: str
    lm_build_rounds: int
    lm_train_rounds: int
    lm_epochs: int


QUICK = Settings(
    mode="quick",
    images="benchmarks.models:images_quick",
    online_images="benchmarks.models:images_tiny",
    vectors="benchmarks.models:vectors_quick",
    peaked="benchmarks.models:peaked_quick",
    build_rounds=2,
    views_rounds=1,
    train_rounds=3,
    fast_train_rounds=3,
    fast_train_epochs=5,
    train_variant_rounds=1,
    fast_train_variant_rounds=1,
    train_epochs=3,
    speedup_rounds=1,
    online_epochs=2,
    cost_rounds=3,
    stream_rounds=3,
    scaling_sizes=(1_000, 10_000),
    scaling_phases=("build", "stream"),
    digits_rounds=2,
    digits_epochs=4,
    lm_bytes="benchmarks.lm:bytes_quick",
    lm_tokens="benchmarks.lm:tokens_32k_quick",
    lm_build_rounds=2,
    lm_train_rounds=2,
    lm_epochs=2,
)
FULL = Settings(
    mode="full",
    images="benchmarks.models:images_full",
    online_images="benchmarks.models:images_full",
    vectors="benchmarks.models:vectors_full",
    peaked="benchmarks.models:peaked_full",
    build_rounds=7,
    views_rounds=3,
    train_rounds=9,
    fast_train_rounds=31,
    fast_train_epochs=7,
    train_variant_rounds=3,
    fast_train_variant_rounds=4,
    train_epochs=3,
    speedup_rounds=3,
    online_epochs=2,
    cost_rounds=7,
    stream_rounds=9,
    scaling_sizes=(10_000, 100_000, 1_000_000),
    scaling_phases=("build", "stream", "train"),
    digits_rounds=3,
    digits_epochs=6,
    lm_bytes="benchmarks.lm:bytes_full",
    lm_tokens="benchmarks.lm:tokens_32k_full",
    lm_build_rounds=5,
    lm_train_rounds=4,
    lm_epochs=4,  # 3 timed epochs a run: one epoch of the byte LM is 8 steps, under a second
)


class Bench(Protocol):
    warmup: bool

    def cases(self) -> dict[str, Callable[[], float]]: ...

    def figures(self, samples: dict[str, list[float]]) -> list[Figure]: ...


def benches(
    section: str, settings: Settings, workdir: Path, device: str = "cpu"
) -> list[tuple[Bench, int]]:
    """The benches of a section with their number of rounds (setup, such as store builds, runs here).

    `device` is where the teacher and student run in the build, views, train, speedup and lm sections;
    stream, storage and scaling measure the host side (reading, bytes, memory) and digits the fixed
    costs, all on the CPU.
    """
    s = settings
    if section == "build":
        workload = BuildWorkload("", TEACHER, s.images, device=device)
        return [(BuildBench(workload, workdir), s.build_rounds)]
    if section == "views":
        # 1,024 samples x 4 views: as many teacher rows as the build section's full N.
        workload = BuildWorkload("", TEACHER, "benchmarks.models:images_quick", device=device)
        return [(ViewsBench(workload, 4, workdir), s.views_rounds)]
    if section in ("train", "own-loop"):
        # The benchmark student, and on the same store a student three times faster per step:
        # less time to hide the loader in. Its epochs are a quarter of the CNN's, so its runs
        # time three times as many (a run's epoch time is their median): the same noise over
        # more samples, for less time than the CNN's runs.
        workloads = [
            TrainWorkload("", STUDENT, TEACHER, s.images, epochs=s.train_epochs, device=device),
            TrainWorkload(
                "fast student", FAST_STUDENT, TEACHER, s.images, device=device,
                epochs=s.fast_train_epochs,
            ),
        ]  # fmt: skip
        if section == "train":
            out: list[tuple[Bench, int]] = []
            for workload, sub, rounds, variant_rounds in (
                (workloads[0], workdir, s.train_rounds, s.train_variant_rounds),
                (workloads[1], workdir / "fast-student", s.fast_train_rounds,
                 s.fast_train_variant_rounds),
            ):  # fmt: skip
                goals = TrainBench(workload, sub, part="goals")
                variants = TrainBench(
                    workload, sub / "variants", part="variants", stores=goals.stores
                )
                out += [(goals, rounds), (variants, variant_rounds)]
            return out
        return [
            (OwnLoopBench(workloads[0], workdir / "own-loop"), s.train_rounds),
            (OwnLoopBench(workloads[1], workdir / "own-loop-fast"), s.train_rounds),
        ]
    if section == "speedup":
        cheapest = next(iter(ONLINE_TEACHERS.values()))
        workload = TrainWorkload(
            "", STUDENT, cheapest, s.online_images, epochs=s.train_epochs, device=device
        )
        bench = SpeedupBench(
            workload,
            ONLINE_TEACHERS,
            workdir,
            online_epochs=s.online_epochs,
            cost_rounds=s.cost_rounds,
        )
        return [(bench, s.speedup_rounds)]
    if section == "stream":
        return [(StreamBench(WIDE_TEACHER, s.vectors, workdir), s.stream_rounds)]
    if section == "storage":
        return [(StorageBench(PEAKED_TEACHER, s.peaked, workdir), 1)]
    if section == "scaling":
        return [(ScalingBench(s.scaling_sizes, s.scaling_phases, workdir), 1)]
    if section == "lm":
        workloads = (
            bytes_workload(s.lm_bytes, s.lm_epochs, device),
            v32k_workload(s.lm_tokens, s.lm_epochs, device),
        )
        return [(LMBuildBench(w, workdir), s.lm_build_rounds) for w in workloads] + [
            (LMTrainBench(w, workdir), s.lm_train_rounds) for w in workloads
        ]
    digits.ensure_teacher()
    return [
        (BuildBench(digits.build_workload(), workdir), s.digits_rounds),
        (TrainBench(digits.train_workload(s.digits_epochs), workdir), s.digits_rounds),
    ]


def profile(
    target: str, settings: Settings, workdir: Path, device: str = "cpu", top: int = 30
) -> None:
    """Run one case (after a warm-up call) under cProfile and print its heaviest calls."""
    section, _, case = target.partition(":")
    if section not in SECTIONS:
        raise SystemExit(f"--profile: unknown section {section!r}; choose from {SECTIONS}")
    for bench, _ in benches(section, settings, workdir, device):
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
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where teachers and students run in build, views, train, speedup and lm (auto: cuda "
        "when a GPU is present)",
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    device = default_device() if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    torch.set_num_threads(args.threads)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section(s) {unknown}; choose from {SECTIONS}")

    with tempfile.TemporaryDirectory(prefix="softcache-bench-") as tmp:
        workdir = Path(tmp)
        if args.profile:
            profile(args.profile, settings, workdir, device)
            return
        env = environment()
        shares = [core_share()]
        print(
            f"softcache benchmarks, {settings.mode} mode on {device}: torch {env['torch']}, "
            f"{env['torch_threads']} thread(s), {env['cpu_count']} CPUs, "
            f"load average {env['load_average']:.2f}",
            file=sys.stderr,
        )
        figures: list[Figure] = []
        section_seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        for section in sections:
            start = time.perf_counter()
            print(f"[{start - t0:6.1f} s] {section}: setting up", file=sys.stderr)
            for bench, rounds in benches(section, settings, workdir, device):
                cases = bench.cases()
                if cases:
                    print(
                        f"[{time.perf_counter() - t0:6.1f} s] {section}: {rounds} round(s) of "
                        f"{', '.join(cases)}",
                        file=sys.stderr,
                    )
                samples = interleave(
                    cases, rounds, warmup=bench.warmup, alternate=getattr(bench, "alternate", True)
                )
                figures.extend(bench.figures(samples))
            section_seconds[section] = round(time.perf_counter() - start, 1)
        print(f"[{time.perf_counter() - t0:6.1f} s] done", file=sys.stderr)
    shares.append(core_share())
    load = (env["load_average"], os.getloadavg()[0])
    print(table(figures))
    print(f"\nload average {load[0]:.2f} at start, {load[1]:.2f} at end", end="")
    if max(load) > BUSY_LOAD:
        print(": other processes were running, expect noise (see each figure's 'rounds' range)")
    else:
        print()
    if shares[0] is not None and shares[1] is not None:
        # Where the two cores share one, a batch process's CPU comes out of the training thread's.
        print(
            f"core share beside a busy core {shares[0]:.2f} at start, {shares[1]:.2f} at end "
            "(1: cores of their own; see benchmarks/README.md, 'How the numbers are made')"
        )
    print("section seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in section_seconds.items()))
    run = {"mode": settings.mode, "settings": asdict(settings), "environment": env}
    run["device"] = device
    if device == "cuda":
        run["gpu"] = torch.cuda.get_device_name()
    run |= {
        "load_average_end": load[1],
        "core_share": {"start": shares[0], "end": shares[1]},
        "section_seconds": section_seconds,
    }
    write_json(args.json, run, figures)
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
