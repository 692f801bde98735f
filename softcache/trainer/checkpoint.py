"""Checkpoints and metrics files of a training run, for every layout.

A checkpoint holds the bare student's state dict (never a DDP wrapper), the optimiser, schedule and
loss scaler, torch's RNG, a rank-independent plan state (epoch and cursor: every rank resumes at the
same batch with its own rank), the global step, the metrics so far and the current epoch's partial
sums. It is written atomically, so a kill never leaves half of one; `--resume` refuses a checkpoint
made with other settings (`check_resume_settings`) or by another number of processes.

The trained student also leaves as a plain state dict, `student.pt` (`STUDENT_WEIGHTS`), written at
every epoch end: `model.load_state_dict(torch.load("student.pt"))`. A Hugging Face student (one
with ``save_pretrained``, e.g. ``--student hf-init:DIR``) also leaves as a `save_pretrained` folder,
`student/` (`STUDENT_PRETRAINED`: config, weights, and the student's tokenizer when it has one),
that ``from_pretrained`` (and ``AutoTokenizer.from_pretrained``) loads.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softcache.errors import ConfigError

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
STUDENT_WEIGHTS = "student.pt"
STUDENT_PRETRAINED = "student"
# Bumped when the checkpoint's layout changes; older checkpoints are refused with a clear message.
CHECKPOINT_VERSION = 2


@dataclass
class EpochStats:
    """Running sums of the current epoch, carried through a mid-epoch checkpoint.

    `count` is what the loss is a mean over: samples for row stores, tokens for token stores.
    """

    loss_sum: float = 0.0
    count: int = 0
    wait: float = 0.0
    seconds: float = 0.0


@dataclass
class TrainState:
    """What a resumed run continues from."""

    student: dict[str, Any]
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    scaler: dict[str, Any]
    plan: dict[str, Any]
    step: int
    torch_rng: torch.Tensor
    metrics: dict[str, Any]
    partial: EpochStats


def save_checkpoint(
    output: Path,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    scaler: Any,
    plan_state: Mapping[str, Any],
    step: int,
    metrics: dict[str, Any],
    stats: EpochStats,
) -> None:
    """Write the checkpoint atomically (rank 0 only)."""
    state = {
        "version": CHECKPOINT_VERSION,
        "student": student.state_dict(),  # the bare student, never the DDP wrapper
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "scaler": scaler.state_dict(),
        # Rank-independent: every rank resumes at the same cursor with its own rank.
        "plan": {k: v for k, v in plan_state.items() if k != "rank"},
        "step": step,
        "torch_rng": torch.get_rng_state(),
        "metrics": metrics,
        "partial": vars(stats).copy(),
    }
    tmp = output / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, output / CHECKPOINT)  # atomic: a kill never leaves half a checkpoint


def save_student(output: Path, student: nn.Module, *, tokenizer: Any = None) -> None:
    """Write the student's weights as a plain state dict (`STUDENT_WEIGHTS`), atomically, and a
    Hugging Face student's `save_pretrained` folder (`STUDENT_PRETRAINED`), with `tokenizer`
    saved into it when given, so that ``AutoTokenizer.from_pretrained`` loads it there too."""
    tmp = output / (STUDENT_WEIGHTS + ".tmp")
    torch.save(student.state_dict(), tmp)
    os.replace(tmp, output / STUDENT_WEIGHTS)
    save_pretrained = getattr(student, "save_pretrained", None)
    if callable(save_pretrained):  # a Hugging Face model: also a folder from_pretrained loads
        folder, staging = output / STUDENT_PRETRAINED, output / (STUDENT_PRETRAINED + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        save_pretrained(str(staging))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)


def load_checkpoint(
    output: Path, now: Mapping[str, Any], keys: tuple[str, ...], *, rank: int, world_size: int
) -> TrainState:
    """Read the checkpoint in `output` for a run with settings `now` (`TrainConfig.to_dict()`).

    Raises:
        ConfigError: no checkpoint, one from an older softcache, another number of processes,
            or other values for any of `keys`.
    """
    path = output / CHECKPOINT
    if not path.is_file():
        where = "" if world_size == 1 else f" (as seen by rank {rank})"
        raise ConfigError(
            f"--resume: no checkpoint at {path}{where}; drop --resume to start a new run"
            + ("" if world_size == 1 else ", or put --output where every rank can read it")
        )
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(
            f"--resume: {path} was written by another version of softcache's trainer; finish "
            "the run with that version, or start a new one (drop --resume or choose another "
            "--output)"
        )
    saved_world = state["plan"].get("world_size", 1)
    if saved_world != world_size:
        raise ConfigError(
            f"--resume: the checkpoint in {output} was written by a run of {saved_world} "
            f"process(es) but this run has {world_size}; the epoch plan splits the data "
            f"between processes, so resume with {saved_world} (torchrun --nproc_per_node, "
            "times nodes) or choose another --output"
        )
    check_resume_settings(state["metrics"]["config"], now, keys, output)
    return TrainState(
        student=state["student"],
        optimizer=state["optimizer"],
        schedule=state["schedule"],
        scaler=state["scaler"],
        plan=state["plan"],
        step=state["step"],
        torch_rng=state["torch_rng"],
        metrics=state["metrics"],
        partial=EpochStats(**state["partial"]),
    )


def check_resume_settings(
    saved: Mapping[str, Any], now: Mapping[str, Any], keys: tuple[str, ...], output: Path
) -> None:
    """Refuse to resume a checkpoint whose run had other values for any of `keys`."""
    diffs = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]
    if diffs:
        raise ConfigError(
            f"--resume: the checkpoint in {output} was made with other settings "
            f"({'; '.join(diffs)}); resume with the original settings or choose another --output"
        )


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (a kill never leaves half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
