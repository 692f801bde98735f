"""Device selection shared by build and train."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from softcache.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """Turn `auto`, `cpu`, `cuda` or `cuda:i` into a usable device.

    Raises:
        ConfigError: the name is malformed, or CUDA is asked for where none is available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} asked for, but this torch sees no CUDA device; use cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type != "cpu":
        raise ConfigError(f"device {name!r}: only cpu and cuda devices are supported")
    return device


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    """fp16 autocast on CUDA when `amp`, else nothing (AMP is a no-op on CPU by design)."""
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()
