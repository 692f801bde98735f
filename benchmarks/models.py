"""Synthetic workloads for the benchmarks, as spec targets (`benchmarks.models:NAME`).

The shapes are those of a small image-classification distillation job (CIFAR-100-like 3x32x32
inputs, 100 classes), not of the bundled digits set, whose ~20 ms epochs are dominated by fixed
per-epoch costs. Input values are random: the timings depend on shapes, not on what is learnt.

The input pipeline is an in-memory tensor (no decoding, no augmentation), the cheapest a real job
can have, so softcache's own costs show up here *larger* than they would next to a JPEG pipeline.

Three teachers share one CNN shape at three widths, tuned so that, on one CPU thread, their
forward+backward costs about 3x (`teacher_small`), 10x (`teacher_cnn`) and 30x (`teacher_large`) the
student's (`benchmarks.run` measures and prints the actual ratio next to each online-KD figure;
`teacher_cnn`'s multiply-add ratio is ~28x, but the student's small layers are bound by memory, not
arithmetic). Every factory takes no arguments, as specs require; weights come from a fixed seed so
the store's teacher and the online teacher are the same network.

Two vector workloads whose items are made from their index (`IndexedVectors`), so a dataset of a
million items holds nothing per item and a process's memory measures softcache, not the dataset:

- `teacher_peaked` over `peaked_quick` / `peaked_full`: 1,000 classes in 100 groups of 10 similar
  ones, logits peaked like a trained classifier's (mean top-1 probability ~0.70, top-5 mass ~0.88,
  entropy ~1.4 nats), for the storage figures, whose compressibility depends on the values;
- `teacher_tiny` / `student_linear` over `vectors_1k` ... `vectors_1m`: 32 features, 100 classes,
  the scaling figures' workload.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

NUM_CLASSES = 100
IMAGE_SHAPE = (3, 32, 32)
TINY_SAMPLES = 512
QUICK_SAMPLES = 1024
FULL_SAMPLES = 4096
STREAM_QUICK_SAMPLES = 8192
STREAM_FULL_SAMPLES = 32768
STREAM_CLASSES = 1000
STREAM_FEATURES = 16
PEAKED_CLASSES = 1000
PEAKED_GROUP = 10  # similar classes per group
PEAKED_FEATURES = 64
PEAKED_SHARPNESS = 12.0  # inverse temperature of the peaked teacher
PEAKED_NOISE = 1.0
PEAKED_QUICK_SAMPLES = 2048
PEAKED_FULL_SAMPLES = 8192
SCALE_FEATURES = 32
SCALE_CLASSES = 100


class TensorDataset(Dataset):
    """A map-style dataset of `(input, label)` items held in memory."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.inputs = inputs
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.inputs[i], int(self.labels[i])


class IndexedVectors(Dataset):
    """A map-style dataset whose item `i` is made from `i` alone: memory does not grow with its size.

    Item `i` is `(x, y)` drawn by a generator seeded with `(seed, i)`: `y` uniform in
    `[0, num_classes)`, `x` float32 of `num_features` standard normals, or, with `prototypes`,
    `prototypes[y] + noise * normals / sqrt(num_features)`. The same index gives the same item in
    every process (~4 µs per item).

    Args:
        num_samples: N.
        num_features: F, the width of `x`.
        num_classes: labels are in `[0, num_classes)`.
        seed: selects the dataset.
        prototypes: optional (num_classes, F) float32 class centres.
        noise: spread around a prototype.
    """

    def __init__(
        self,
        num_samples: int,
        num_features: int,
        num_classes: int,
        seed: int,
        prototypes: torch.Tensor | None = None,
        noise: float = 1.0,
    ) -> None:
        self.num_samples = num_samples
        self.num_features = num_features
        self.num_classes = num_classes
        self.seed = seed
        self.prototypes = prototypes
        self.noise = noise

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = int(i)  # plans index with numpy integers
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} items")
        g = torch.Generator().manual_seed(self.seed << 32 | i)
        y = int(torch.randint(self.num_classes, (1,), generator=g))
        x = torch.randn(self.num_features, generator=g)
        if self.prototypes is not None:
            x = self.prototypes[y] + self.noise / self.num_features**0.5 * x
        return x, y


@functools.cache
def _random_dataset(num_samples: int, shape: tuple[int, ...], seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn((num_samples, *shape), generator=g)
    labels = torch.randint(0, NUM_CLASSES, (num_samples,), generator=g)
    return TensorDataset(inputs, labels)


def images_tiny() -> TensorDataset:
    """512 random 3x32x32 float32 images with labels in [0, 100) (quick online-KD runs)."""
    return _random_dataset(TINY_SAMPLES, IMAGE_SHAPE, 0)


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


@functools.cache
def _prototypes() -> torch.Tensor:
    """(1,000, 64) unit class centres in groups of 10 near a shared group centre (fixed seed)."""
    g = torch.Generator().manual_seed(5)
    groups = torch.randn(PEAKED_CLASSES // PEAKED_GROUP, PEAKED_FEATURES, generator=g)
    own = torch.randn(PEAKED_CLASSES, PEAKED_FEATURES, generator=g)
    centres = groups.repeat_interleave(PEAKED_GROUP, dim=0) + 0.7 * own
    return centres / centres.norm(dim=1, keepdim=True)


def _peaked(num_samples: int) -> IndexedVectors:
    return IndexedVectors(
        num_samples,
        PEAKED_FEATURES,
        PEAKED_CLASSES,
        seed=6,
        prototypes=_prototypes(),
        noise=PEAKED_NOISE,
    )


def peaked_quick() -> IndexedVectors:
    """2,048 64-float vectors near the centre of their class (1,000 classes), for the storage figures."""
    return _peaked(PEAKED_QUICK_SAMPLES)


def peaked_full() -> IndexedVectors:
    """8,192 64-float vectors near the centre of their class (1,000 classes), for the storage figures."""
    return _peaked(PEAKED_FULL_SAMPLES)


def _scale_vectors(num_samples: int) -> IndexedVectors:
    return IndexedVectors(num_samples, SCALE_FEATURES, SCALE_CLASSES, seed=7)


def vectors_1k() -> IndexedVectors:
    """10^3 random 32-float vectors made from their index (the scaling figures' smallest N)."""
    return _scale_vectors(1_000)


def vectors_10k() -> IndexedVectors:
    """10^4 random 32-float vectors made from their index."""
    return _scale_vectors(10_000)


def vectors_100k() -> IndexedVectors:
    """10^5 random 32-float vectors made from their index."""
    return _scale_vectors(100_000)


def vectors_1m() -> IndexedVectors:
    """10^6 random 32-float vectors made from their index."""
    return _scale_vectors(1_000_000)


# The scaling figures' datasets by size (specs take no arguments, so one factory per N).
SCALE_DATASETS = {
    1_000: "benchmarks.models:vectors_1k",
    10_000: "benchmarks.models:vectors_10k",
    100_000: "benchmarks.models:vectors_100k",
    1_000_000: "benchmarks.models:vectors_1m",
}


def _seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory()


def _teacher_cnn(width: int) -> nn.Module:
    """Four 3x3 convs (width, width, 2 * width, 2 * width channels), global pooling, a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, NUM_CLASSES),
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


def teacher_small() -> nn.Module:
    """`teacher_cnn` at 12/24 channels (12k parameters): fwd+bwd ~3x the student's."""
    return _seeded(lambda: _teacher_cnn(12), 3)


def teacher_cnn() -> nn.Module:
    """A four-conv CNN, 3x32x32 -> 100 logits (72k parameters, ~17 M multiply-adds per image).

    Its forward+backward costs ~10x the student's.
    """
    return _seeded(lambda: _teacher_cnn(32), 0)


def teacher_large() -> nn.Module:
    """`teacher_cnn` at 64/128 channels (273k parameters): fwd+bwd ~30x the student's."""
    return _seeded(lambda: _teacher_cnn(64), 4)


def student_cnn() -> nn.Module:
    """A two-conv CNN, 3x32x32 -> 100 logits (104k parameters, mostly its head; ~0.6 M MACs)."""
    return _seeded(_student_cnn, 1)


def student_mlp() -> nn.Module:
    """A wider, shallower student over the same images: 3x32x32 -> 128 -> 100 (406k parameters,
    0.4 M MACs, no convolutions). A step costs about a third of `student_cnn`'s on these CPUs: the
    case where the loader has the least time to hide behind (issue: "three times faster")."""
    return _seeded(
        lambda: nn.Sequential(
            nn.Flatten(), nn.Linear(3 * 32 * 32, 128), nn.ReLU(), nn.Linear(128, NUM_CLASSES)
        ),
        11,
    )


def teacher_wide() -> nn.Module:
    """A linear map 16 -> 1,000 logits: a cheap teacher for the stream benchmark's large store."""
    return _seeded(lambda: nn.Linear(STREAM_FEATURES, STREAM_CLASSES), 2)


def teacher_peaked() -> nn.Module:
    """Linear 64 -> 1,000 logits, `sharpness * x . centre_c`: peaked like a trained classifier's."""
    teacher = nn.Linear(PEAKED_FEATURES, PEAKED_CLASSES, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(PEAKED_SHARPNESS * _prototypes())
    return teacher


def teacher_tiny() -> nn.Module:
    """A linear map 32 -> 100 logits: the scaling figures' teacher (its cost is negligible)."""
    return _seeded(lambda: nn.Linear(SCALE_FEATURES, SCALE_CLASSES), 8)


def student_linear() -> nn.Module:
    """A linear map 32 -> 100 logits: the scaling figures' student."""
    return _seeded(lambda: nn.Linear(SCALE_FEATURES, SCALE_CLASSES), 9)
