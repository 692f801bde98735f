"""Train the digits teacher (a few seconds on a CPU) and save it to data/digits/teacher.pt.

Usage: `python -m pipelines.digits.prepare [--epochs N] [--force]`.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader

from pipelines.digits.data import test_set, train_set
from pipelines.digits.models import TEACHER_CHECKPOINT, untrained_teacher


def accuracy(model: nn.Module, dataset) -> float:
    loader = DataLoader(dataset, batch_size=512)
    correct = 0
    with torch.inference_mode():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
    return correct / len(dataset)


def train_teacher(epochs: int = 20, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = untrained_teacher()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loader = DataLoader(
        train_set(), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
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
    args = parser.parse_args()
    if TEACHER_CHECKPOINT.is_file() and not args.force:
        print(f"teacher checkpoint exists: {TEACHER_CHECKPOINT} (use --force to retrain)")
        return
    model = train_teacher(args.epochs)
    TEACHER_CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), TEACHER_CHECKPOINT)
    print(
        f"teacher: test accuracy {accuracy(model, test_set()):.3f}, saved to {TEACHER_CHECKPOINT}"
    )


if __name__ == "__main__":
    main()
