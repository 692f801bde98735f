"""The digits story end to end: train the teacher, cache it, and report what the cache costs.

Run from the repository root: `python -m pipelines.digits.run` (the README's main command). Each stage
is the real `softcache` command line, printed before it runs.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from pipelines.digits.models import DATA_DIR

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "pipelines/digits/pipeline.toml"


def sh(*args: str) -> None:
    """Run a command from the repository root, echoing it first; stop the pipeline if it fails."""
    print(f"\n$ {shlex.join(args)}", flush=True)
    subprocess.run(args, cwd=ROOT, check=True)


def softcache(*args: str) -> None:
    sh(sys.executable, "-m", "softcache.cli", *args)


def main() -> None:
    sh(sys.executable, "-m", "pipelines.digits.prepare")
    dense = DATA_DIR / "teacher-dense.zarr"
    topk = DATA_DIR / "teacher-top5.zarr"
    softcache("build", "--config", CONFIG, "--output", str(dense), "--overwrite")
    softcache(
        "build",
        "--config",
        CONFIG,
        "--output",
        str(topk),
        "--encoding",
        "topk",
        "--top-k",
        "5",
        "--overwrite",
    )


if __name__ == "__main__":
    main()
