"""The main job: distillation where labels are scarce and the teacher is expensive.

Run from the repository root: `python -m pipelines.digits.run` (what `make run` runs; about three
minutes on two CPU cores). The setting is the one softcache exists for:

- **Scarce labels, plenty of unlabelled data.** Of the 1,438 training digits, a seeded 10 % (144)
  keep their labels (`pipelines.digits.data`). The teacher, an ensemble of three CNNs, is trained
  on those 144 alone; the store covers all 1,438 images, so the students trained from it see every
  image, while the hard-label student can only learn from the 144.
- **An expensive teacher.** The ensemble's forward pass costs three CNN passes, hundreds of times
  the student's multiply-adds; the job times both and prints the measured ratio.

Every stage is the real `softcache` command line, printed before it runs. Each student mode
trains for 3 seeds (the student's initialisation and data order); the hard-label student takes
about as many optimiser steps as the others (25 epochs of its 144 samples in batches of 16, against
10 epochs of 1,438 in batches of 64). The table gives mean ± spread (the population standard
deviation over the seeds) of held-out accuracy and agreement with the teacher, the training time
per run (the sum of its epochs, from metrics.json), the one-time build time, and after how many
student runs the cache has paid for itself against online KD: the smallest n with
``build + n * offline run < n * online run``. Whatever the numbers are, they are printed as they
come. Figures (training curves of seed 0; the store's bytes-versus-KL frontier) go under
`data/digits/figures/`.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pipelines.digits.data import scarce_train_set
from pipelines.digits.models import DATA_DIR, scarce_teacher, student

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "pipelines/digits/scarce.toml"
RUNS = DATA_DIR / "runs"
FIGURES = DATA_DIR / "figures"
SEEDS = (0, 1, 2)
EPOCHS = 10  # as scarce.toml says: 23 steps of 64 per epoch, 230 in all
# 144 labelled samples in batches of 16: 9 steps per epoch, 225 in all (about the KD students').
HARD_EPOCHS, HARD_BATCH = 25, 16
TOP_K = 3
TEACHER = "pipelines.digits.models:scarce_teacher"
DATASET = "pipelines.digits.data:scarce_train_set"


def sh(*args: str) -> str:
    """Run a command from the repository root, echoing it first; its stdout is returned (and
    printed); stop the pipeline if it fails."""
    print(f"\n$ {shlex.join(args)}", flush=True)
    done = subprocess.run(args, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True)
    print(done.stdout, end="", flush=True)
    return done.stdout


def softcache(*args: str) -> str:
    return sh(sys.executable, "-m", "softcache.cli", *args)


def main() -> None:
    started = time.perf_counter()
    sh(sys.executable, "-m", "pipelines.digits.prepare", "--scarce")
    costs = model_costs()
    print(
        f"\nper-sample cost: teacher forward {costs['teacher_us']:.1f} us, student forward+"
        f"backward {costs['student_us']:.1f} us (teacher / student = {costs['ratio']:.1f}x)"
    )
    dense = DATA_DIR / "scarce-dense.zarr"
    topk = DATA_DIR / f"scarce-top{TOP_K}.zarr"
    test = DATA_DIR / "scarce-test.zarr"
    build = ("build", "--config", CONFIG, "--overwrite", "--quiet", "--json")
    builds = {
        "dense": _seconds(softcache(*build, "--output", str(dense))),
        "topk": _seconds(
            softcache(*build, "--output", str(topk), "--encoding", "topk", "--top-k", str(TOP_K))
        ),
    }
    softcache(*build, "--dataset", "pipelines.digits.data:test_set", "--output", str(test))

    common = ("--config", CONFIG, "--overwrite", "--quiet")
    modes = {
        "hard (144 labels)": (
            "--mode", "hard", "--dataset", "pipelines.digits.data:labelled_set",
            "--epochs", str(HARD_EPOCHS), "--batch-size", str(HARD_BATCH),
        ),
        # The dense store gives online KD its block layout: the same batches as offline KD.
        "online": ("--mode", "online", "--teacher", TEACHER, "--store", str(dense)),
        "offline (dense)": ("--mode", "offline", "--store", str(dense)),
        f"offline (top-{TOP_K})": ("--mode", "offline", "--store", str(topk)),
    }  # fmt: skip
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in modes}
    for name, args in modes.items():
        for seed in SEEDS:
            out = RUNS / f"{_slug(name)}-seed{seed}"
            # A pipeline's rerun replaces its previous runs (train refuses that without --overwrite).
            softcache("train", *common, *args, "--seed", str(seed), "--output", str(out))
            results[name].append(json.loads((out / "metrics.json").read_text()))

    FIGURES.mkdir(parents=True, exist_ok=True)
    curves = FIGURES / "curves.png"
    softcache(
        "plot", *(str(RUNS / f"{_slug(name)}-seed0") for name in modes), "-o", str(curves),
        "--title", "digits, 10 % labelled: seed 0 of each mode",
    )  # fmt: skip
    frontier = FIGURES / "frontier.png"
    softcache(
        "fidelity", str(topk), "--reference", str(dense), "--dataset", DATASET,
        "--sweep", "--plot", str(frontier),
    )  # fmt: skip

    print()
    print(summary_table(results, builds["dense"], f"offline (top-{TOP_K})", builds["topk"]))
    print(
        f"\nteacher: {costs['teacher_acc']:.4f} held-out accuracy; its forward pass costs "
        f"{costs['ratio']:.1f}x the student's forward+backward per sample (measured here)."
    )
    print(f"figures: {curves} and {frontier}")
    print(f"main job: {time.perf_counter() - started:.0f} s")


@torch.inference_mode()
def _teacher_pass(teacher: torch.nn.Module, x: torch.Tensor) -> None:
    teacher(x)


def model_costs(rounds: int = 5) -> dict[str, float]:
    """Per-sample microseconds of the teacher's forward and the student's forward+backward on
    the training images in batches of 64 (the fastest of `rounds`), and the teacher's held-out
    accuracy."""
    from pipelines.digits.data import test_set

    teacher, net = scarce_teacher(), student()
    data = scarce_train_set()
    x = data.images[:1024]
    batches = x.split(64)

    def fastest(step: Any) -> float:
        best = math.inf
        for _ in range(rounds):
            t0 = time.perf_counter()
            for b in batches:
                step(b)
            best = min(best, time.perf_counter() - t0)
        return best / len(x) * 1e6

    def student_step(b: torch.Tensor) -> None:
        net.zero_grad()
        net(b).sum().backward()

    teacher_us = fastest(lambda b: _teacher_pass(teacher, b))
    student_us = fastest(student_step)
    held_out = test_set()
    with torch.inference_mode():
        acc = float((teacher(held_out.images).argmax(1) == held_out.labels).float().mean())
    return {
        "teacher_us": teacher_us,
        "student_us": student_us,
        "ratio": teacher_us / student_us,
        "teacher_acc": acc,
    }


def summary_table(
    results: dict[str, list[dict[str, Any]]], build_s: float, topk_name: str, topk_build_s: float
) -> str:
    """One line per mode: accuracy and agreement (mean ± spread over seeds), training seconds per
    run, the store's build seconds and bytes, and the runs after which the cache has paid off."""
    online = statistics.mean(_run_seconds(m) for m in results["online"])
    header = (
        f"{'mode':<19} {'eval acc':>15} {'agreement':>15} {'run s':>6} {'epoch s':>8} "
        f"{'build s':>8} {'B/sample':>9} {'pays off after':>15}"
    )
    lines = [header, "-" * len(header)]
    for name, runs in results.items():
        run_s = statistics.mean(_run_seconds(m) for m in runs)
        epoch_s = statistics.mean(statistics.mean(m["epoch_seconds"]) for m in runs)
        offline = runs[0]["mode"] == "offline"
        build = (topk_build_s if name == topk_name else build_s) if offline else None
        payoff = "-"
        if build is not None:
            saved = online - run_s
            n = math.floor(build / saved) + 1
            payoff = (f"{n} run" if n == 1 else f"{n} runs") if saved > 0 else "never"
        bps = runs[0]["store_bytes_per_sample"] if offline else None
        lines.append(
            f"{name:<19} {_spread([m['eval_accuracy'][-1] for m in runs]):>15} "
            f"{_spread([m['teacher_agreement'][-1] for m in runs]):>15} {run_s:>6.2f} "
            f"{epoch_s:>8.4f} {('-' if build is None else f'{build:.2f}'):>8} "
            f"{('-' if bps is None else f'{bps:.1f}'):>9} {payoff:>15}"
        )
    return "\n".join(lines)


def _run_seconds(metrics: dict[str, Any]) -> float:
    return float(sum(metrics["epoch_seconds"]))


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.pstdev(values):.4f}"


def _seconds(build_json: str) -> float:
    return float(json.loads(build_json)["seconds"])


def _slug(name: str) -> str:
    return "".join(ch for ch in name.replace(" ", "-") if ch.isalnum() or ch == "-")


if __name__ == "__main__":
    main()
