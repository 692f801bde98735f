"""The bundled digits pipeline as a benchmark workload (its figures are labelled `digits`).

Digits epochs last ~20 ms and a digits build ~0.1 s, so their ratios measure softcache's fixed
per-build and per-epoch costs (store creation, DataLoader and stream start-up) rather than its
per-sample overhead: they are informational, held to no goal. The store sizes are the real ones.
"""

from __future__ import annotations

import torch

from benchmarks.build import BuildWorkload
from benchmarks.train import TrainWorkload
from pipelines.digits.models import TEACHER_CHECKPOINT
from pipelines.digits.prepare import train_teacher

TEACHER = "pipelines.digits.models:teacher"
STUDENT = "pipelines.digits.models:student"
DATASET = "pipelines.digits.data:train_set"
NOTE = "fixed costs dominate a ~0.1 s digits build"


def ensure_teacher() -> None:
    """Train and save the digits teacher (a few seconds) if its checkpoint is missing."""
    if not TEACHER_CHECKPOINT.is_file():
        TEACHER_CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
        torch.save(train_teacher().state_dict(), TEACHER_CHECKPOINT)


def build_workload() -> BuildWorkload:
    """The digits teacher over the training set, as `pipelines/digits/pipeline.toml` builds it."""
    return BuildWorkload(
        "digits", TEACHER, DATASET, batch_size=128, shard_rows=512, goal=None, note=NOTE
    )


def train_workload(epochs: int) -> TrainWorkload:
    """The digits student, hard and offline."""
    return TrainWorkload("digits", STUDENT, TEACHER, DATASET, epochs=epochs, goal=None)
