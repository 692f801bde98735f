"""Factories for the DDP tests (`tests.helpers.ddp_specs:NAME`), with per-rank instrumentation.

`torchrun` starts each rank as its own process, so what a rank did is recorded in files, one per
rank, under the directory `SOFTCACHE_TEST_LOG_DIR` (when set; nothing is recorded otherwise):

- `rows.RANK`: the dataset index of every `__getitem__`, one per line, in order;
- `blocks.RANK`: the store blocks the soft-label stream reads, one `dask.compute` per line;
- `writes.RANK`: every file this rank created, wrote, renamed or removed under
  `SOFTCACHE_TEST_WATCH` (an audit hook; torch.save's own C++ writes are missed, but train moves
  each checkpoint into place with `os.replace`, which is seen).

`recorded_dataset` installs all three when it is built (train builds the dataset first thing).
`student` raises on one rank at one training step when `SOFTCACHE_TEST_FAIL_AT=RANK:STEP` is set
(STEP counts forward passes in training mode, from 1), for the resume test.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from tests.helpers import specs

_files: dict[str, int] = {}
_installed: list[bool] = []


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _log(name: str, line: str) -> None:
    """Append `line` to `name.RANK` (os.write: no audit event, safe inside the hook)."""
    if name not in _files:
        path = os.path.join(os.environ["SOFTCACHE_TEST_LOG_DIR"], f"{name}.{_rank()}")
        _files[name] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_files[name], (line + "\n").encode())


class _Recorded(Dataset):
    def __init__(self, record: bool, base: Any = None) -> None:
        self.base = specs.dataset() if base is None else base
        self.record = record

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Any:
        if self.record:
            _log("rows", str(int(i)))
        return self.base[i]


def recorded_dataset() -> Dataset:
    """`tests.helpers.specs:dataset`, recording rows, stream reads and writes (see the module)."""
    return _Recorded(_install_recorders())


def recorded_token_dataset() -> Dataset:
    """`tests.helpers.token_specs:ragged_dataset`, recorded like `recorded_dataset`."""
    from tests.helpers import token_specs

    return _Recorded(_install_recorders(), token_specs.ragged_dataset())


def _install_recorders() -> bool:
    record = "SOFTCACHE_TEST_LOG_DIR" in os.environ
    if record and not _installed:
        _installed.append(True)
        _record_stream_reads()
        _record_writes(os.environ.get("SOFTCACHE_TEST_WATCH"))
    return record


def _record_stream_reads() -> None:
    from softcache.trainer.stream import SoftLabelStream

    compute = SoftLabelStream._compute

    def logged(self: SoftLabelStream, blocks: list[int], *args: Any) -> Any:
        _log("blocks", " ".join(map(str, blocks)))
        return compute(self, blocks, *args)

    SoftLabelStream._compute = logged  # type: ignore[method-assign]


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _record_writes(watch: str | None) -> None:
    if not watch:
        return
    root = os.path.abspath(watch)

    def inside(path: Any) -> str | None:
        if isinstance(path, int):
            return None
        name = os.fsdecode(os.fspath(path))
        full = os.path.abspath(name)
        return full if full == root or full.startswith(root + os.sep) else None

    def hook(event: str, args: tuple[Any, ...]) -> None:
        paths: list[Any] = []
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if mode else bool(flags & _WRITE_FLAGS)
            paths = [path] if writing else []
        elif event in ("os.rename", "os.replace"):
            paths = list(args[:2])
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate"):
            paths = [args[0]]
        for path in paths:
            full = inside(path)
            if full is not None:
                _log("writes", f"{event} {full}")

    sys.addaudithook(hook)


class _Student(nn.Module):
    """`net` (a module made by `make`), failing where told (see the module docstring)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            fail = os.environ.get("SOFTCACHE_TEST_FAIL_AT")
            if fail and fail == f"{_rank()}:{self.calls}":
                raise RuntimeError(f"test failure on rank {_rank()} at step {self.calls}")
        return self.net(x)


def student() -> nn.Module:
    """A tiny MLP for the 8x8 synthetic inputs (about 1.2k parameters):
    flatten -> linear(64 -> 16) -> ReLU -> linear(16 -> 10)."""
    return _Student(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)))


def causal_student() -> nn.Module:
    """`tests.helpers.lm_train_specs:causal_student`, failing where told."""
    from tests.helpers import lm_train_specs

    return _Student(lm_train_specs.causal_student())
