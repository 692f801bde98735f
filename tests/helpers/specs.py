"""Tiny deterministic teachers and datasets for the tests, named as `tests.helpers.specs:NAME`.

Every factory takes no arguments (as specs require) and is seeded, so two processes build the same
objects bit for bit. Sizes come from environment variables so a test can shape a CLI run in a
subprocess too (the environment propagates):

- `SOFTCACHE_TEST_N`: samples in the synthetic datasets (default 300).
- `SOFTCACHE_TEST_SLEEP`: seconds `slow_dataset` sleeps per item (default 0.005). Sleeping changes
  no value, so a slow build and a fast one write the same store.

The "bad" factories each break one rule the build must refuse with a one-line error; where the fault
is in one sample, its index is a module constant the tests check the message against.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn
from torch.utils.data import Dataset

INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
WIDE_CLASSES = 300
DATA_SEED = 1234
WEIGHT_SEED = 99
NAN_SAMPLE = 137  # the first (and only) sample `nan_teacher` gives non-finite logits
OVERFLOW_SAMPLE = 42  # the sample whose logits `overflow_teacher` pushes beyond float16's range
BAD_ITEM = 150  # the sample `late_bad_item_dataset` returns as a bare tensor
ALTERED_SAMPLE = 100  # the sample `altered_dataset` changes (one pixel)
MISMATCH_FROM = 192  # samples from here on (shard 3, a batch boundary) have the wrong shape


def num_samples() -> int:
    return int(os.environ.get("SOFTCACHE_TEST_N", "300"))


def inputs(n: int | None = None) -> torch.Tensor:
    """(n, 1, 8, 8) float32 in [0, 1): the synthetic inputs, the same in every process."""
    n = num_samples() if n is None else n
    gen = torch.Generator().manual_seed(DATA_SEED)
    return torch.rand((n, *INPUT_SHAPE), generator=gen)


def labels(n: int | None = None) -> torch.Tensor:
    """(n,) int64 labels in [0, 10)."""
    n = num_samples() if n is None else n
    gen = torch.Generator().manual_seed(DATA_SEED + 1)
    return torch.randint(0, NUM_CLASSES, (n,), generator=gen)


class Synthetic(Dataset):
    """A map-style dataset of `(x (1, 8, 8) float32, label int | None)` items."""

    def __init__(self, x: torch.Tensor, y: list | None, sleep: float = 0.0) -> None:
        self.x = x
        self.y = y
        self.sleep = sleep

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if self.sleep:
            time.sleep(self.sleep)
        return self.x[i], (None if self.y is None else self.y[i])


# ---- datasets ---------------------------------------------------------------------------------


def dataset() -> Synthetic:
    """N labelled samples."""
    return Synthetic(inputs(), labels().tolist())


def altered_dataset() -> Synthetic:
    """`dataset` with one pixel of sample ALTERED_SAMPLE changed: the alignment check's case."""
    x = inputs()
    x[ALTERED_SAMPLE, 0, 0, 0] += 0.5
    return Synthetic(x, labels().tolist())


def start_method_dataset() -> Synthetic:
    """`dataset`, appending the default multiprocessing start method of the process that makes
    it to the file SOFTCACHE_TEST_RECORD names (where a DataLoader's workers would start from)."""
    import multiprocessing

    with open(os.environ["SOFTCACHE_TEST_RECORD"], "a") as record:
        record.write(f"{multiprocessing.get_start_method(allow_none=True)}\n")
    return dataset()


def unlabelled_dataset() -> Synthetic:
    """The same inputs with every label None."""
    return Synthetic(inputs(), None)


def slow_dataset() -> Synthetic:
    """`dataset()`, sleeping `SOFTCACHE_TEST_SLEEP` seconds per item (for the kill tests)."""
    return Synthetic(
        inputs(), labels().tolist(), float(os.environ.get("SOFTCACHE_TEST_SLEEP", "0.005"))
    )


def empty_dataset() -> Synthetic:
    return Synthetic(torch.empty((0, *INPUT_SHAPE)), [])


class _Items(Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def bare_tensor_dataset() -> _Items:
    """Items are bare tensors, not `(input, label)` pairs."""
    return _Items(list(inputs()))


def string_label_dataset() -> _Items:
    """Labels are class names, not integers."""
    return _Items([(x, "cat") for x in inputs()])


def wrong_shape_dataset() -> _Items:
    """(1, 9, 9) inputs: not what the teachers (which flatten 64 values) accept."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    return _Items([(x, 0) for x in torch.rand((num_samples(), 1, 9, 9), generator=gen)])


def ragged_dataset() -> _Items:
    """Sample 3 is (1, 8, 9): one batch cannot be stacked."""
    items = [(x, 0) for x in inputs()]
    items[3] = (torch.zeros(1, 8, 9), 0)
    return _Items(items)


def late_wrong_shape_dataset() -> _Items:
    """Samples from `MISMATCH_FROM` on are (1, 9, 9): sample 0 (the probe) looks fine."""
    items = [(x, 0) for x in inputs()]
    for i in range(MISMATCH_FROM, len(items)):
        items[i] = (torch.zeros(1, 9, 9), 0)
    return _Items(items)


def late_bad_item_dataset() -> _Items:
    """Sample `BAD_ITEM` is a bare tensor; every other item is a proper pair."""
    items: list = [(x, 0) for x in inputs()]
    items[BAD_ITEM] = items[BAD_ITEM][0]
    return _Items(items)


def not_a_dataset() -> int:
    return 7


# ---- teachers ---------------------------------------------------------------------------------


class Linear(nn.Module):
    """Flatten, then a seeded linear map to `classes` logits (scaled to a few units)."""

    def __init__(self, classes: int = NUM_CLASSES, seed: int = WEIGHT_SEED) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(64, classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(classes, 64, generator=gen))
            self.fc.bias.copy_(torch.randn(classes, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class TinyConv(nn.Module):
    """conv(1->4, 3x3) -> ReLU -> flatten -> linear(256 -> 10), seeded."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(WEIGHT_SEED)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, NUM_CLASSES)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def teacher() -> nn.Module:
    """10 classes: the default test teacher."""
    return Linear().eval()


def conv_teacher() -> nn.Module:
    return TinyConv().eval()


def wide_teacher() -> nn.Module:
    """300 classes (uint16 indices), for top-k with a wider row."""
    return Linear(WIDE_CLASSES).eval()


class _Mark(nn.Module):
    """`Linear`, with the row of one known input replaced by `value`."""

    def __init__(self, sample: int, value: float) -> None:
        super().__init__()
        self.inner = Linear()
        self.register_buffer("target", inputs(sample + 1)[sample].flatten())
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        hit = (x.flatten(1) == self.target).all(dim=1, keepdim=True)
        return torch.where(hit, torch.full_like(out, self.value), out)


def nan_teacher() -> nn.Module:
    """NaN logits for sample `NAN_SAMPLE` only."""
    return _Mark(NAN_SAMPLE, float("nan")).eval()


def overflow_teacher() -> nn.Module:
    """Logits of 1e5 (beyond float16's 65504) for sample `OVERFLOW_SAMPLE` only."""
    return _Mark(OVERFLOW_SAMPLE, 1e5).eval()


class _ThreeD(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Linear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).unsqueeze(1)  # (B, 1, C)


class _Tuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Linear()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.inner(x)
        return out, out


def three_d_teacher() -> nn.Module:
    """Returns (B, 1, C)."""
    return _ThreeD().eval()


def tuple_teacher() -> nn.Module:
    """Returns a (logits, logits) tuple."""
    return _Tuple().eval()


def raising_factory() -> nn.Module:
    raise RuntimeError("checkpoint teacher.pt is missing")


def not_a_module() -> object:
    return object()


NOT_CALLABLE = 3


def reference_logits(
    model: nn.Module, x: torch.Tensor, shard_rows: int, batch_size: int
) -> torch.Tensor:
    """A teacher's float32 logits for `x`, computed in the build's shard-aligned batches."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), shard_rows):
            stop = min(start + shard_rows, len(x))
            for b in range(start, stop, batch_size):
                out.append(model(x[b : min(b + batch_size, stop)]).float())
    return torch.cat(out)
