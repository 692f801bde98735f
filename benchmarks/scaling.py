"""Scaling: time per sample and peak memory of a build, a streamed epoch and a training epoch as N grows.

softcache promises a build and a stream whose memory does not grow with the dataset (the writer
keeps `writer_threads + 1` shards in flight; the stream keeps its prefetch and shuffle windows), and
whose time per sample stays flat. This measures both at N = 10^4, 10^5 and 10^6 (`--quick`: 10^3 and
10^4) on a workload whose own costs are negligible and flat: 32-float inputs made from their index
(`benchmarks.models.IndexedVectors`, nothing held per item), a linear teacher to 100 classes, dense
fp16 stores of 4,096-row shards, a linear student.

Each measurement runs in a fresh interpreter (`python -m benchmarks.scaling --child PHASE ...`) so
that one cannot inherit another's heap, and reads its own peak resident set size: `VmHWM` from
`/proc/self/status` on Linux, not `getrusage(RUSAGE_SELF).ru_maxrss`, because Linux carries the
parent's peak into `ru_maxrss` across fork + exec (every child of a 760 MB benchmark process would
report at least 760 MB); `ru_maxrss` elsewhere. The child imports everything any phase needs before
it starts the clock, so every child starts from the same footprint (`start` in the detail: the peak
after the imports). Phases:

- `build`: `softcache.builder.build` of the store, wall time from call to return;
- `stream`: one epoch of `SoftLabelStream.batches(plan)` over that store, no student (batch 256);
- `train`: one epoch of `softcache.trainer.train(mode="offline")` of the linear student from that
  store (batch 256; the first epoch hashes every input for the alignment check), with its batches
  made on a thread (`loader="thread"`): with the default batch process, the stream's memory would
  be in another process image than the one measured; the thread runs the same layout code.

Figures, for each phase and each step N -> 10N: time per sample at 10N over N (flat is 1; below 1
when fixed costs amortise), and peak RSS at 10N over N, held to 1.10. The detail gives the growth
over the starting footprint and how many bytes each added sample cost, to compare with the O(N)
arrays softcache legitimately holds (an 8-byte `sample_hash` per row in a build's final fingerprint).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.harness import Figure, format_seconds, median, timed
from benchmarks.models import SCALE_DATASETS
from softcache.builder import build
from softcache.config import BuildConfig, TrainConfig
from softcache.store import LogitStore
from softcache.trainer import train
from softcache.trainer.plan import EpochPlan
from softcache.trainer.stream import SoftLabelStream

PHASES = ("build", "stream", "train")
RSS_GOAL = 1.10
TEACHER = "benchmarks.models:teacher_tiny"
STUDENT = "benchmarks.models:student_linear"
SHARD_ROWS = 4096
BUILD_BATCH = 1024
BATCH_SIZE = 256


@dataclass(frozen=True)
class ChildResult:
    """What one child process measured.

    Attributes:
        phase: build, stream or train.
        num_samples: N.
        seconds: wall time of the phase (after imports).
        start_rss: peak RSS in bytes before the phase began (imports done).
        peak_rss: peak RSS in bytes at the end.
    """

    phase: str
    num_samples: int
    seconds: float
    start_rss: int
    peak_rss: int

    @property
    def per_sample(self) -> float:
        return self.seconds / self.num_samples

    @property
    def growth(self) -> int:
        """Bytes the phase added to the peak over the starting footprint."""
        return self.peak_rss - self.start_rss


# ---- in the child --------------------------------------------------------------------------------


def peak_rss() -> int:
    """This process image's peak resident set size in bytes.

    Linux: `VmHWM` of `/proc/self/status`, the high-water mark of this program's own memory map
    (`ru_maxrss` would include the parent's peak at the fork before exec). Elsewhere:
    `ru_maxrss` (bytes on macOS, KiB on the BSDs).
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _build(num_samples: int, store: Path) -> float:
    config = BuildConfig(
        teacher=TEACHER,
        dataset=SCALE_DATASETS[num_samples],
        output=str(store),
        batch_size=BUILD_BATCH,
        shard_rows=SHARD_ROWS,
        device="cpu",
        overwrite=True,
    )
    return timed(lambda: build(config, progress=False))


def _stream(num_samples: int, store: Path) -> float:
    stream = SoftLabelStream(LogitStore.open(store))
    plan = EpochPlan(num_samples=num_samples, block_rows=SHARD_ROWS, batch_size=BATCH_SIZE, seed=0)
    return timed(lambda: all(True for _ in stream.batches(plan)))


def _train(num_samples: int, store: Path) -> float:
    config = TrainConfig(
        student=STUDENT,
        dataset=SCALE_DATASETS[num_samples],
        store=str(store),
        mode="offline",
        epochs=1,
        batch_size=BATCH_SIZE,
        device="cpu",
        output=str(store.with_suffix(".run")),
        loader="thread",  # all of training's memory in this process image (see the docstring)
    )
    result = train(config, progress=False)
    shutil.rmtree(result.output)
    return float(result.metrics["epoch_seconds"][0])


_PHASE_RUNS: dict[str, Callable[[int, Path], float]] = {
    "build": _build,
    "stream": _stream,
    "train": _train,
}


def child_main(argv: Sequence[str] | None = None) -> None:
    """Run one phase and print its `ChildResult` as a JSON line (the parent reads the last line)."""
    parser = argparse.ArgumentParser(description="one scaling measurement (run by the parent)")
    parser.add_argument("--child", choices=PHASES, required=True)
    parser.add_argument("--samples", type=int, choices=sorted(SCALE_DATASETS), required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = peak_rss()
    seconds = _PHASE_RUNS[args.child](args.samples, args.store)
    result = ChildResult(args.child, args.samples, seconds, start, peak_rss())
    print(json.dumps(asdict(result)))


# ---- in the parent -------------------------------------------------------------------------------


def run_child(phase: str, num_samples: int, store: Path) -> ChildResult:
    """Run one phase in a fresh interpreter (from the current directory, as `benchmarks.run` is)."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.scaling",
        f"--child={phase}",
        f"--samples={num_samples}",
        f"--store={store}",
        f"--threads={torch.get_num_threads()}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"scaling child {phase} N={num_samples} failed ({done.returncode}):\n{done.stderr}"
        )
    return ChildResult(**json.loads(done.stdout.strip().splitlines()[-1]))


def power_of_ten(n: int) -> str:
    """`10^4` for 10,000; other numbers as they are."""
    text = str(n)
    return f"10^{len(text) - 1}" if text.strip("0") == "1" else f"{n:,}"


class ScalingBench:
    """Cases `<phase> N=<n>` (seconds per sample), run in order: every phase of an N, then the next N.

    Args:
        sizes: the N to measure, ascending, each a key of `benchmarks.models.SCALE_DATASETS`.
        phases: the phases to run at each N (`build` first: the others read its store).
        workdir: where the stores go.
    """

    warmup = False  # a child is a cold start by design
    alternate = False  # each N's build first: its other phases read the store it makes

    def __init__(self, sizes: Sequence[int], phases: Sequence[str], workdir: Path) -> None:
        unknown = sorted(set(sizes) - set(SCALE_DATASETS))
        if unknown:
            raise ValueError(f"no scaling dataset for N={unknown}; add one to benchmarks.models")
        self.sizes = list(sizes)
        self.phases = list(phases)
        self.workdir = workdir
        self.results: dict[tuple[str, int], list[ChildResult]] = {}

    def _run(self, phase: str, num_samples: int) -> float:
        store = self.workdir / f"scaling-{num_samples}.zarr"
        t0 = time.perf_counter()
        result = run_child(phase, num_samples, store)
        print(
            f"  scaling {phase} N={power_of_ten(num_samples)}: {result.seconds:.2f} s "
            f"({time.perf_counter() - t0:.2f} s with start-up), peak RSS "
            f"{result.peak_rss / 1e6:.0f} MB",
            file=sys.stderr,
        )
        self.results.setdefault((phase, num_samples), []).append(result)
        return result.per_sample

    def cases(self) -> dict[str, Callable[[], float]]:
        return {
            f"{phase} N={power_of_ten(n)}": lambda phase=phase, n=n: self._run(phase, n)
            for n in self.sizes
            for phase in self.phases
        }

    def figures(self, samples: dict[str, list[float]]) -> list[Figure]:
        figures = []
        for phase in self.phases:
            for small, large in zip(self.sizes, self.sizes[1:], strict=False):
                figures.extend(self._pair(phase, small, large, samples))
        return figures

    def _pair(
        self, phase: str, small: int, large: int, samples: dict[str, list[float]]
    ) -> list[Figure]:
        a, b = f"{phase} N={power_of_ten(small)}", f"{phase} N={power_of_ten(large)}"
        ra, rb = self.results[phase, small][-1], self.results[phase, large][-1]
        ta, tb = median(samples[a]), median(samples[b])
        per_added = (rb.growth - ra.growth) / (large - small)
        steps = f"N={power_of_ten(large)} / N={power_of_ten(small)}"
        return [
            Figure(
                name=f"scaling {phase}: time/sample, {steps}",
                value=tb / ta,
                detail=(
                    f"{format_seconds(tb)}/sample ({rb.seconds:.2f} s) at N={large:,}, "
                    f"{format_seconds(ta)}/sample ({ra.seconds:.2f} s) at N={small:,}"
                ),
                samples={a: samples[a], b: samples[b]},
            ),
            Figure(
                name=f"scaling {phase}: peak RSS, {steps}",
                value=rb.peak_rss / ra.peak_rss,
                goal=RSS_GOAL,
                detail=(
                    f"peak {rb.peak_rss / 1e6:.0f} MB vs {ra.peak_rss / 1e6:.0f} MB; over the "
                    f"start ({rb.start_rss / 1e6:.0f} MB after imports): +{rb.growth / 1e6:.1f} "
                    f"MB vs +{ra.growth / 1e6:.1f} MB = {per_added:+.1f} B per added sample"
                ),
                samples={
                    "peak_rss": [ra.peak_rss, rb.peak_rss],
                    "start_rss": [ra.start_rss, rb.start_rss],
                },
            ),
        ]


if __name__ == "__main__":
    child_main()
