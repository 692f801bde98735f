"""Random-crop training of the digits student: fresh crops, caches of 1, 4 and 16 crops, online KD.

Run from the repository root: `python -m pipelines.digits.views` (30 epochs, 3 student seeds, about
4 minutes on 2 CPU cores) or `--quick` (2 epochs, one seed unless `--seeds` says otherwise, about
1.5 minutes: a smoke test, its accuracies mean nothing).
Every stage is the real `softcache` command line, printed before it runs; the last lines are a
table of eval accuracy (mean ± std over seeds, and each seed's), teacher agreement, store bytes per
sample and the teacher's accuracy on each cache's views. All figures go to
`data/digits/views/results.json`.

The modes, all with the student seed `--seed s` and the same epochs, batches and sample order:

- hard labels, a fresh random crop of every sample each epoch (`--augment`, `--augment-seed s`);
- offline KD from caches of V = 1, 4 and 16 stored crops per sample (the view of the epoch chosen
  by `--view-policy cycle`). Each cache is built once, with `--augment-seed 0`, and shared by every
  student seed: one cache serving many students is what a cache is for, so the spread over seeds
  leaves out the luck of the cache's own crops;
- online KD with a fresh crop each epoch, the teacher run live on it;
- two references without crops: hard labels, and offline KD from a plain cache.

The augmentation is `crop(size=8,scale=0.8:1)`, no flip: a mirrored 2, 3, 5 or 7 is not a digit.
The sklearn digits fill their 8x8 frame, so a crop cuts into the digit itself: on the training
images the teacher (100 % right on them uncropped) gets 91 % of `scale=0.8:1` crops right but only
70 % of `scale=0.5:1` crops, whose soft labels then often name another digit. Crops are
resized back to 8x8, the shape both the CNN teacher and the MLP student take. Evaluation is on the
unaugmented test set; agreement is top-1 agreement with the teacher there, from a test-set store.

Every cache keeps 512 samples per shard (`--shard-rows 512 * V`), the block size `softcache train`
uses without a store, so for a given seed every mode trains on the same batches in the same order.

What it shows (30 epochs, 3 seeds; the test set has 359 images, so one image is 0.0028): crops do
not help on digits (hard labels 0.980 without them, 0.971 with fresh crops; offline KD 0.972 from a
plain cache). Among the crop-trained students, one stored crop per sample is the worst, 0.958, and
1 to 3 test images behind the V = 4 cache on every seed; V = 4, V = 16 and online KD all reach
0.965 ± 0.002, so 4 stored crops already match the live teacher, at 100 bytes per sample against
32 for V = 1. With `--augment "crop(size=8,scale=0.5:1)"`, where the teacher is right on only
70 % of the crops, the number of views stops mattering: V = 1, 4, 16 and online land at 0.948 to
0.957 (std 0.002 to 0.004), hard labels with fresh crops at 0.974.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.digits.models import DATA_DIR
from pipelines.digits.run import ROOT, sh, softcache
from softcache import open_store
from softcache.config import TrainConfig

# The full-label pipeline's settings (teacher, student, lr, T): the experiment is about views of a
# teacher trained on every label, not the main job's scarce-label setting (`run.py`'s scarce.toml).
CONFIG = "pipelines/digits/pipeline.toml"
AUGMENT = "crop(size=8,scale=0.8:1)"
VIEWS = (1, 4, 16)
EPOCHS = 30
QUICK_EPOCHS = 2
VIEW_POLICY = "cycle"
CACHE_SEED = 0  # --augment-seed of every cache, shared by all student seeds
# Samples per cache shard: the plan's block size of runs without a store, so all modes share a plan.
SHARD_SAMPLES = TrainConfig.block_rows
# pipeline.toml [train] keys each run sets itself (`store` must go: hard and online runs given a
# store open it, and the pipeline's dense store is not built here).
PER_RUN = frozenset({"store", "eval_store", "epochs", "seed", "output"})
REFERENCES = "references, no crops:"  # the table's heading above them


@dataclass(frozen=True)
class Mode:
    """One row of the table: the `softcache train` options that make it, less the per-run ones."""

    name: str
    args: tuple[str, ...]
    store: Path | None = None  # the cache an offline mode learns from
    fresh: bool = False  # draws new crops each epoch, seeded by the student seed
    reference: bool = False  # no crops at all

    def options(self) -> tuple[str, ...]:
        return (*self.args, *(("--store", str(self.store)) if self.store else ()))


def modes(out: Path, augment: str) -> list[Mode]:
    """The experiment's modes, with their caches under `out`."""
    crops = ("--augment", augment)
    return [
        Mode("hard, fresh crops", ("--mode", "hard", *crops), fresh=True),
        *(Mode(f"offline V={v}", ("--mode", "offline"), store=cache(out, v)) for v in VIEWS),
        Mode("online, fresh crops", ("--mode", "online", *crops), fresh=True),
        Mode("hard, no crops", ("--mode", "hard"), reference=True),
        Mode("offline, no crops", ("--mode", "offline"), store=plain(out), reference=True),
    ]


def cache(out: Path, views: int) -> Path:
    """The cache of `views` crops per sample."""
    return out / f"teacher-crops-v{views}.zarr"


def plain(out: Path) -> Path:
    """The cache of the uncropped training images."""
    return out / "teacher-plain.zarr"


def train_options(config: str = CONFIG) -> tuple[str, ...]:
    """The pipeline's [train] settings as `softcache train` options, less the per-run ones."""
    table = tomllib.loads((ROOT / config).read_text())["train"]
    options: list[str] = []
    for key, value in table.items():
        if key in PER_RUN:
            continue
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            options.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            options += [f"--{flag}", str(value)]
    return tuple(options)


def build_stores(out: Path, augment: str) -> None:
    """The test-set store (for agreement), a plain cache and one cache of crops per V."""
    build = ("build", "--config", CONFIG, "--overwrite", "--quiet")
    test = ("--dataset", "pipelines.digits.data:test_set")
    softcache(*build, *test, "--output", str(out / "teacher-test.zarr"))
    softcache(*build, "--shard-rows", str(SHARD_SAMPLES), "--output", str(plain(out)))
    for v in VIEWS:
        softcache(
            *build,
            "--output", str(cache(out, v)),
            "--views", str(v),
            "--augment", augment,
            "--augment-seed", str(CACHE_SEED),
            "--shard-rows", str(SHARD_SAMPLES * v),
        )  # fmt: skip


def run_mode(mode: Mode, out: Path, seed: int, epochs: int) -> dict:
    """Train one student; its metrics.json."""
    run = out / "runs" / slug(mode.name) / f"seed{seed}"
    fresh = ("--augment-seed", str(seed)) if mode.fresh else ()
    softcache(
        "train",
        *train_options(),
        *mode.options(),
        *fresh,
        "--eval-store", str(out / "teacher-test.zarr"),
        "--view-policy", VIEW_POLICY,
        "--epochs", str(epochs),
        "--seed", str(seed),
        "--output", str(run),
        "--overwrite",
        "--quiet",
    )  # fmt: skip
    return json.loads((run / "metrics.json").read_text())


def slug(name: str) -> str:
    """A mode's name as a folder name: `offline V=4` -> `offline-v-4`."""
    return re.sub(r"\W+", "-", name).strip("-").lower()


def teacher_view_accuracy(store: Path) -> float:
    """The teacher's top-1 accuracy on a cache's views (every view of every sample)."""
    from pipelines.digits.data import train_set

    opened = open_store(str(store))
    labels = np.repeat(train_set().labels.numpy(), opened.meta.views)
    return float((opened.top1() == labels).mean())


def summarise(mode: Mode, runs: list[dict]) -> dict:
    """A mode's figures over its seeds."""
    accuracy = [m["eval_accuracy"][-1] for m in runs]
    agreement = [m["teacher_agreement"][-1] for m in runs]
    store = mode.store
    return {
        "options": list(mode.options()),
        "store": str(store) if store else None,
        "views": open_store(str(store)).meta.views if store else None,
        "reference": mode.reference,
        "eval_accuracy": accuracy,
        "eval_accuracy_mean": statistics.mean(accuracy),
        "eval_accuracy_std": statistics.stdev(accuracy) if len(accuracy) > 1 else None,
        "teacher_agreement": agreement,
        "teacher_agreement_mean": statistics.mean(agreement),
        "store_bytes_per_sample": runs[0]["store_bytes_per_sample"] if store else None,
        "teacher_accuracy_on_views": teacher_view_accuracy(store) if store else None,
        "epochs": len(runs[0]["epoch"]),
        "samples_seen": [samples_seen(m) for m in runs],
    }


def samples_seen(metrics: dict) -> int:
    """Training samples over the run, from the per-epoch rates and times."""
    pairs = zip(metrics["samples_per_second"], metrics["epoch_seconds"], strict=True)
    return round(sum(rate * seconds for rate, seconds in pairs))


def summary_table(results: dict[str, dict]) -> str:
    """One line per mode: accuracy mean ± std and per seed, agreement, bytes, teacher on views."""
    header = ("mode", "eval acc", "per seed", "agreement", "B/sample", "teacher on views")
    rows = [header]
    for name, r in results.items():
        std = r["eval_accuracy_std"]
        bps, teacher = r["store_bytes_per_sample"], r["teacher_accuracy_on_views"]
        rows.append(
            (
                name,
                f"{r['eval_accuracy_mean']:.4f} ± " + ("-" if std is None else f"{std:.4f}"),
                " ".join(f"{a:.4f}" for a in r["eval_accuracy"]),
                f"{r['teacher_agreement_mean']:.4f}",
                "-" if bps is None else f"{bps:.1f}",
                "-" if teacher is None else f"{teacher:.4f}",
            )
        )
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]

    def line(row: tuple[str, ...]) -> str:
        cells = [
            c.ljust(w) if k in (0, 2) else c.rjust(w)
            for k, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    lines = [line(header), "-" * len(line(header))]
    for row, r in zip(rows[1:], results.values(), strict=True):
        if r["reference"] and REFERENCES not in lines:
            lines.append(REFERENCES)
        lines.append(line(row))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs, 1 seed")
    parser.add_argument("--seeds", type=int, help="student seeds 0..N-1 [3; 1 with --quick]")
    parser.add_argument("--epochs", type=int, help=f"[{EPOCHS}; {QUICK_EPOCHS} with --quick]")
    parser.add_argument("--augment", default=AUGMENT, help=f"crop spec [{AUGMENT}]")
    parser.add_argument(
        "--out", type=Path, help="stores, runs, results.json [data/digits/views(/quick)]"
    )
    args = parser.parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 3)
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else EPOCHS)
    out = (args.out or DATA_DIR / "views" / ("quick" if args.quick else "")).resolve()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread each is fastest
    start = time.perf_counter()

    sh(sys.executable, "-m", "pipelines.digits.prepare")
    build_stores(out, args.augment)
    results = {}
    for mode in modes(out, args.augment):
        runs = [run_mode(mode, out, seed, epochs) for seed in range(seeds)]
        results[mode.name] = summarise(mode, runs)
    seen = {n for r in results.values() for n in r["samples_seen"]}
    assert len(seen) == 1, f"modes trained on different numbers of samples: {seen}"

    wall = time.perf_counter() - start
    report = {
        "settings": {
            "augment": args.augment,
            "cache_augment_seed": CACHE_SEED,
            "views": list(VIEWS),
            "view_policy": VIEW_POLICY,
            "epochs": epochs,
            "seeds": list(range(seeds)),
            "shard_samples": SHARD_SAMPLES,
            "train_options": list(train_options()),
        },
        "modes": results,
        "wall_seconds": wall,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{epochs} epochs, seeds {', '.join(map(str, range(seeds)))}, crops {args.augment}")
    print(summary_table(results))
    print(f"\nwall time {wall:.0f} s; figures in {out / 'results.json'}")


if __name__ == "__main__":
    main()
