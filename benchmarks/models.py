"""Synthetic workloads for the benchmarks, as spec targets (`benchmarks.models:NAME`).

The shapes are those of a small image-classification distillation job (CIFAR-100-like 3x32x32
inputs, 100 classes), not of the bundled digits set, whose ~20 ms epochs are dominated by fixed
per-epoch costs. Input values are random: the timings depend on shapes, not on what is learnt.

The input pipeline is an in-memory tensor (no decoding, no augmentation), the cheapest a real job
can have, so softcache's own costs show up here *larger* than they would next to a JPEG pipeline.

Widths are tuned so that, on one CPU thread, the teacher's forward+backward costs about ten times
the student's (`benchmarks.run` measures and prints the actual ratio next to the online-KD figure;
the multiply-add ratio is ~28x, but the student's small layers are bound by memory, not arithmetic).
Every factory takes no arguments, as specs require; weights come from a fixed seed so the store's
teacher and the online teacher are the same network.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

NUM_CLASSES = 100
IMAGE_SHAPE = (3, 32, 32)
QUICK_SAMPLES = 1024
FULL_SAMPLES = 4096
STREAM_QUICK_SAMPLES = 8192
STREAM_FULL_SAMPLES = 32768
STREAM_CLASSES = 1000
STREAM_FEATURES = 16


class TensorDataset(Dataset):
    """A map-style dataset of `(input, label)` items held in memory."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.inputs = inputs
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.inputs[i], int(self.labels[i])


@functools.cache
def _random_dataset(num_samples: int, shape: tuple[int, ...], seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn((num_samples, *shape), generator=g)
    labels = torch.randint(0, NUM_CLASSES, (num_samples,), generator=g)
    return TensorDataset(inputs, labels)


def images_quick() -> TensorDataset:
    """1,024 random 3x32x32 float32 images with labels in [0, 100)."""
    return _random_dataset(QUICK_SAMPLES, IMAGE_SHAPE, 0)


def images_full() -> TensorDataset:
    """4,096 random 3x32x32 float32 images with labels in [0, 100)."""
    return _random_dataset(FULL_SAMPLES, IMAGE_SHAPE, 0)


def vectors_quick() -> TensorDataset:
    """8,192 random 16-float vectors: cheap inputs for the store the stream benchmark reads."""
    return _random_dataset(STREAM_QUICK_SAMPLES, (STREAM_FEATURES,), 1)


def vectors_full() -> TensorDataset:
    """32,768 random 16-float vectors: cheap inputs for the store the stream benchmark reads."""
    return _random_dataset(STREAM_FULL_SAMPLES, (STREAM_FEATURES,), 1)


def _seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory()


def _teacher_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, NUM_CLASSES),
    )


def _student_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, NUM_CLASSES),
    )


def teacher_cnn() -> nn.Module:
    """A four-conv CNN, 3x32x32 -> 100 logits (72k parameters, ~17 M multiply-adds per image)."""
    return _seeded(_teacher_cnn, 0)


def student_cnn() -> nn.Module:
    """A two-conv CNN, 3x32x32 -> 100 logits (104k parameters, mostly its head; ~0.6 M MACs)."""
    return _seeded(_student_cnn, 1)


def teacher_wide() -> nn.Module:
    """A linear map 16 -> 1,000 logits: a cheap teacher for the stream benchmark's large store."""
    return _seeded(lambda: nn.Linear(STREAM_FEATURES, STREAM_CLASSES), 2)
