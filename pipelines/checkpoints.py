"""Loading a pipeline's prepared teacher: one place for the checkpoint check and its message."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def load_prepared(model: nn.Module, checkpoint: Path, prepare: str) -> nn.Module:
    """`model` with the state dict saved at `checkpoint` by `python -m PREPARE`, in eval mode.

    Raises:
        FileNotFoundError: no checkpoint yet, naming the command that makes it.
    """
    if not checkpoint.is_file():
        raise FileNotFoundError(f"no teacher checkpoint at {checkpoint}; run `python -m {prepare}`")
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model.eval()
