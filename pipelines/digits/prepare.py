"""Train the digits teacher (a few seconds on a CPU) and save it to data/digits/teacher.pt.

Usage: `python -m pipelines.digits.prepare [--epochs N] [--force] [--scarce]`.

`--scarce` trains instead the main job's ensemble: `ENSEMBLE` half-width CNNs (seeds 0, 1, 2) on the 144
labelled images alone (`labelled_set`), 60 epochs each (180 steps), saved as
data/digits/teacher-scarce-{0,1,2}.pt.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader

from pipelines.digits.data import labelled_set, test_set, train_set
from pipelines.digits.models import (
    ENSEMBLE,
    SCARCE_WIDTH,
    TEACHER_CHECKPOINT,
    scarce_checkpoint,
    scarce_teacher,
    untrained_teacher,
)

SCARCE_EPOCHS = 60


def accuracy(model: nn.Module, dataset) -> float:
    loader = DataLoader(dataset, batch_size=512)
    correct = 0
    with torch.inference_mode():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
    return correct / len(dataset)


def train_teacher(epochs: int = 20, seed: int = 0, dataset=None, width: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    model = untrained_teacher(width)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loader = DataLoader(
        train_set() if dataset is None else dataset,
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--force", action="store_true", help="retrain even if a checkpoint exists")
    parser.add_argument(
        "--scarce", action="store_true", help="the main job's ensemble, from 10 %% of the labels"
    )
    args = parser.parse_args()
    if args.scarce:
        prepare_scarce(args.force)
        return
    if TEACHER_CHECKPOINT.is_file() and not args.force:
        print(f"teacher checkpoint exists: {TEACHER_CHECKPOINT} (use --force to retrain)")
        return
    model = train_teacher(args.epochs)
    TEACHER_CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), TEACHER_CHECKPOINT)
    print(
        f"teacher: test accuracy {accuracy(model, test_set()):.3f}, saved to {TEACHER_CHECKPOINT}"
    )


def prepare_scarce(force: bool) -> None:
    """Train and save the ensemble members that do not exist yet (all with `force`)."""
    if all(scarce_checkpoint(i).is_file() for i in range(ENSEMBLE)) and not force:
        print(f"ensemble checkpoints exist: {scarce_checkpoint(0).parent} (use --force to retrain)")
        return
    for i in range(ENSEMBLE):
        model = train_teacher(SCARCE_EPOCHS, seed=i, dataset=labelled_set(), width=SCARCE_WIDTH)
        scarce_checkpoint(i).parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), scarce_checkpoint(i))
        print(f"ensemble member {i}: test accuracy {accuracy(model, test_set()):.3f}")
    print(f"ensemble of {ENSEMBLE}: test accuracy {accuracy(scarce_teacher(), test_set()):.3f}")


if __name__ == "__main__":
    main()
