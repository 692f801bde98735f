"""The digits story end to end: teacher, stores, then one student trained four ways.

Run from the repository root: `python -m pipelines.digits.run` (the README's main command). Every
stage is the real `softcache` command line, printed before it runs; the last lines are a table of
accuracy, agreement with the teacher, epoch time and store bytes per sample for each mode.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from pipelines.digits.models import DATA_DIR

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "pipelines/digits/pipeline.toml"
RUNS = DATA_DIR / "runs"


def sh(*args: str) -> None:
    """Run a command from the repository root, echoing it first; stop the pipeline if it fails."""
    print(f"\n$ {shlex.join(args)}", flush=True)
    subprocess.run(args, cwd=ROOT, check=True)


def softcache(*args: str) -> None:
    sh(sys.executable, "-m", "softcache.cli", *args)


def main() -> None:
    sh(sys.executable, "-m", "pipelines.digits.prepare")
    dense = DATA_DIR / "teacher-dense.zarr"
    top5 = DATA_DIR / "teacher-top5.zarr"
    test = DATA_DIR / "teacher-test.zarr"
    build = ("build", "--config", CONFIG, "--overwrite", "--quiet")
    softcache(*build, "--output", str(dense))
    softcache(*build, "--output", str(top5), "--encoding", "topk", "--top-k", "5")
    softcache(*build, "--output", str(test), "--dataset", "pipelines.digits.data:test_set")

    runs = {
        "hard": ("--mode", "hard"),
        "online": ("--mode", "online"),
        "offline (dense)": ("--mode", "offline", "--store", str(dense)),
        "offline (top-5)": ("--mode", "offline", "--store", str(top5)),
    }
    results = {}
    for name, args in runs.items():
        out = RUNS / name.replace(" ", "").replace("(", "-").replace(")", "")
        # A pipeline's rerun replaces its previous runs (train refuses that without --overwrite).
        softcache(
            "train", "--config", CONFIG, *args, "--output", str(out), "--overwrite", "--quiet"
        )
        results[name] = json.loads((out / "metrics.json").read_text())
    print()
    print(summary_table(results))


def summary_table(results: dict[str, dict]) -> str:
    """One line per mode: final eval accuracy and agreement, mean epoch time, store bytes."""
    header = f"{'mode':<17} {'eval acc':>9} {'agreement':>10} {'epoch s':>9} {'store B/sample':>15}"
    lines = [header, "-" * len(header)]
    for name, m in results.items():
        epoch_s = sum(m["epoch_seconds"]) / len(m["epoch_seconds"])
        bps = m["store_bytes_per_sample"] if m["mode"] == "offline" else None
        lines.append(
            f"{name:<17} {m['eval_accuracy'][-1]:>9.4f} {m['teacher_agreement'][-1]:>10.4f} "
            f"{epoch_s:>9.4f} {('-' if bps is None else f'{bps:.1f}'):>15}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
