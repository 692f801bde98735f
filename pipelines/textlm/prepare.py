"""Train the byte-level LM teacher on one CPU core and save it to data/textlm/teacher.pt.

Usage: `python -m pipelines.textlm.prepare [--steps N] [--force] [--student-baseline]`.

The teacher trains on every 128-byte window of the training split (about 23k windows, 3.0 M bytes;
`train_set()` is an evenly spread 4,096 of them), in seeded random batches of 16, for 800 steps
(1.6 M tokens, about half an epoch): AdamW at a peak learning rate of 2e-3, 50 warm-up steps, then
a cosine decay to a tenth of the peak. On one core: 155 s of training, 3.2 minutes in all (3.7
with `--student-baseline`); 2.50 bits per byte on the test set, against 3.20 for the student. The printed figures
are cross-entropy in bits per byte, perplexity and next-byte accuracy on `train_set()` and
`test_set()`. `--student-baseline` also trains the student on hard labels for the same steps and
batches: the gap between the two is what distillation has to close.

The checkpoint is a plain `torch.save` state dict, written to a temporary file and renamed, so a
half-written one never exists; `teacher.json` beside it records the settings, the figures and the
corpus's sha256 (`pipelines.textlm.data.fingerprint()`). An existing checkpoint is kept (`--force`
retrains); when its corpus fingerprint differs from the running Python's, a warning says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipelines.textlm.data import fingerprint, test_set, train_set, windows
from pipelines.textlm.models import TEACHER_CHECKPOINT, student, untrained_teacher

SIDECAR = TEACHER_CHECKPOINT.with_suffix(".json")


@dataclass(frozen=True)
class Schedule:
    """Optimiser settings: AdamW, linear warm-up, cosine decay to `final_fraction` of `lr`."""

    steps: int = 800
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 50
    final_fraction: float = 0.1
    weight_decay: float = 0.01
    seed: int = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * (self.final_fraction + (1 - self.final_fraction) * cosine)


def train(model: nn.Module, dataset: Dataset, schedule: Schedule, *, log_every: int = 100) -> None:
    """Train `model` on hard next-byte labels: `schedule.steps` batches drawn without replacement."""
    torch.manual_seed(schedule.seed)
    generator = torch.Generator().manual_seed(schedule.seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=schedule.lr, betas=(0.9, 0.95), weight_decay=schedule.weight_decay
    )
    order = torch.empty(0, dtype=torch.int64)
    model.train()
    start = time.perf_counter()
    for step in range(schedule.steps):
        if len(order) < schedule.batch_size:  # a fresh permutation each epoch
            order = torch.randperm(len(dataset), generator=generator)
        batch, order = order[: schedule.batch_size], order[schedule.batch_size :]
        x, y = (torch.stack(t) for t in zip(*(dataset[int(i)] for i in batch), strict=True))
        for group in opt.param_groups:
            group["lr"] = schedule.lr_at(step)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and ((step + 1) % log_every == 0 or step + 1 == schedule.steps):
            bits = loss.item() / math.log(2)
            elapsed = time.perf_counter() - start
            print(f"  step {step + 1:>5}/{schedule.steps}  {bits:.3f} bits/byte  {elapsed:.0f} s")
    model.eval()


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 128) -> dict[str, float]:
    """Mean next-byte cross-entropy (bits per byte), perplexity and top-1 accuracy over `dataset`."""
    nats, correct, tokens = 0.0, 0, 0
    with torch.inference_mode():
        for x, y in DataLoader(dataset, batch_size=batch_size):
            logits = model(x).flatten(0, 1)
            nats += F.cross_entropy(logits, y.flatten(), reduction="sum").item()
            correct += int((logits.argmax(-1) == y.flatten()).sum())
            tokens += y.numel()
    mean = nats / tokens
    return {
        "bits_per_byte": mean / math.log(2),
        "perplexity": math.exp(mean),
        "accuracy": correct / tokens,
    }


def report(name: str, model: nn.Module) -> dict[str, dict[str, float]]:
    """Print and return `model`'s figures on the training and test sets."""
    figures = {"train": evaluate(model, train_set()), "test": evaluate(model, test_set())}
    params = sum(p.numel() for p in model.parameters())
    for split, m in figures.items():
        print(
            f"{name} ({params:,} parameters), {split}: {m['bits_per_byte']:.3f} bits/byte, "
            f"perplexity {m['perplexity']:.2f}, next-byte accuracy {m['accuracy']:.3f}"
        )
    return figures


def save(model: nn.Module, info: dict) -> None:
    """Write the sidecar, then the checkpoint through a temporary file and a rename."""
    TEACHER_CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
    SIDECAR.write_text(json.dumps(info, indent=2) + "\n")
    tmp = TEACHER_CHECKPOINT.with_name(f".{TEACHER_CHECKPOINT.name}.{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, TEACHER_CHECKPOINT)


def check_existing() -> None:
    """Say that the checkpoint is kept, and warn when it was trained on another corpus."""
    print(f"teacher checkpoint exists: {TEACHER_CHECKPOINT} (use --force to retrain)")
    if SIDECAR.is_file():
        recorded = json.loads(SIDECAR.read_text()).get("corpus_sha256")
        if recorded != fingerprint():
            print(
                f"warning: the teacher was trained on corpus {recorded}, but this Python's corpus "
                f"is {fingerprint()}; rerun with --force to retrain on it"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Schedule()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    parser.add_argument("--force", action="store_true", help="retrain even if a checkpoint exists")
    parser.add_argument(
        "--student-baseline",
        action="store_true",
        help="also train the student on hard labels with the same schedule, and report it",
    )
    args = parser.parse_args(argv)
    if TEACHER_CHECKPOINT.is_file() and not args.force:
        check_existing()
        return
    torch.set_num_threads(args.threads)
    schedule = Schedule(steps=args.steps, lr=args.lr)
    data = windows("train")
    print(f"corpus sha256 {fingerprint()}; teacher trains on {len(data):,} windows of 128 bytes")

    start = time.perf_counter()
    model = untrained_teacher()
    train(model, data, schedule)
    train_seconds = time.perf_counter() - start
    print(f"teacher trained in {train_seconds:.0f} s")
    info = {
        "corpus_sha256": fingerprint(),
        "schedule": asdict(schedule),
        "train_seconds": train_seconds,
        "teacher": report("teacher", model),
    }
    if args.student_baseline:
        baseline = student()
        start = time.perf_counter()
        train(baseline, data, schedule, log_every=0)
        print(
            f"student baseline (hard labels, same schedule) trained in {time.perf_counter() - start:.0f} s"
        )
        info["student_hard_labels"] = report("student, hard labels", baseline)
    save(model, info)
    print(f"saved to {TEACHER_CHECKPOINT}")


if __name__ == "__main__":
    main()
