"""Teacher and student for the digits pipeline.

The teacher is a small CNN (about 110k parameters, ~98 % test accuracy after a few seconds of CPU
training); the student is an MLP about 25 times smaller. Factories take no arguments, as specs require;
the teacher's factory loads the checkpoint that `pipelines.digits.prepare` writes.

The main job's teacher (`scarce_teacher`) is an ensemble of `ENSEMBLE` such CNNs trained on the
10 % labelled images only (`pipelines.digits.prepare --scarce`), giving the log of their mean
probabilities: the distribution `softcache merge` stores for an ensemble. Its forward pass costs
`ENSEMBLE` passes of a half-width CNN (about 1 M multiply-adds per image against the student's
4.7 k).
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
ENSEMBLE = 3
SCARCE_WIDTH = 16  # each member: 0.33 M multiply-adds per image (the student: 4.7 k)


def scarce_checkpoint(member: int) -> Path:
    """Where `prepare --scarce` saves ensemble member `member`."""
    return DATA_DIR / f"teacher-scarce-{member}.pt"


class TeacherCNN(nn.Module):
    """conv(1->w) -> conv(w->2w) -> maxpool -> fc(32w->96) -> fc(96->10); w = 32 by default."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 4 * 4, 96), nn.ReLU(), nn.Linear(96, NUM_CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def student() -> nn.Module:
    """A tiny MLP: 64 -> 64 -> 10 (about 4.8k parameters), freshly initialised."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))


def untrained_teacher(width: int = 32) -> nn.Module:
    """The teacher architecture with fresh weights (used by `prepare`)."""
    return TeacherCNN(width)


def teacher() -> nn.Module:
    """The trained teacher, loaded from `data/digits/teacher.pt`."""
    return load_prepared(TeacherCNN(), TEACHER_CHECKPOINT, "pipelines.digits.prepare")


class Ensemble(nn.Module):
    """``log(mean_j softmax(member_j(x)))``: (B, 10) log-probabilities, usable as logits."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([torch.log_softmax(m(x), dim=1) for m in self.members])
        return torch.logsumexp(logp, dim=0) - torch.log(torch.tensor(float(len(self.members))))


def scarce_teacher() -> nn.Module:
    """The main job's teacher: the ensemble trained on the 10 % labelled images."""
    members = [
        load_prepared(
            TeacherCNN(SCARCE_WIDTH), scarce_checkpoint(i), "pipelines.digits.prepare --scarce"
        )
        for i in range(ENSEMBLE)
    ]
    return Ensemble(members).eval()
