"""Teacher and student for the digits pipeline.

The teacher is a small CNN (about 110k parameters, ~98 % test accuracy after a few seconds of CPU
training); the student is an MLP about 25 times smaller. Factories take no arguments, as specs require;
the teacher's factory loads the checkpoint that `pipelines.digits.prepare` writes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from pipelines.checkpoints import load_prepared

NUM_CLASSES = 10
DATA_DIR = Path(
    os.environ.get("SOFTCACHE_DIGITS_DIR", Path(__file__).resolve().parents[2] / "data" / "digits")
)
TEACHER_CHECKPOINT = DATA_DIR / "teacher.pt"


class TeacherCNN(nn.Module):
    """conv(1->32) -> conv(32->64) -> maxpool -> fc(1024->96) -> fc(96->10)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 4 * 4, 96), nn.ReLU(), nn.Linear(96, NUM_CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def student() -> nn.Module:
    """A tiny MLP: 64 -> 64 -> 10 (about 4.8k parameters), freshly initialised."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))


def untrained_teacher() -> nn.Module:
    """The teacher architecture with fresh weights (used by `prepare`)."""
    return TeacherCNN()


def teacher() -> nn.Module:
    """The trained teacher, loaded from `data/digits/teacher.pt`."""
    return load_prepared(TeacherCNN(), TEACHER_CHECKPOINT, "pipelines.digits.prepare")
