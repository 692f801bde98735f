"""Own-loop overhead: an epoch of your own training loop over `AlignedBatches`, next to hard labels.

`softcache train` makes its batches in a batch process (`benchmarks.train`); a team that writes its
own loop takes `softcache.AlignedBatches` and `softcache.distillation_loss`. This bench times that
loop's epochs, as the module docstring of `softcache.trainer.distill` writes it, with its defaults
(every row's hash checked, every epoch), side by side in the same rounds:

- `hard`: the same loop over a plain DataLoader of the same batches (the plan's order, the same
  collation, no hashes), with the hard-label cross-entropy: what the user's loop costs without KD;
- `inline-*`: `AlignedBatches(dataset, store)`: inputs collated and hashed on the calling thread,
  soft labels assembled on a thread of the stream's (the API's default);
- `process-*`: `AlignedBatches(dataset, store, batch_process=True, temperature=T)`: all of that
  in a child process, with the teacher's side of the loss (`SoftLabels.targets`), each batch
  arriving in shared memory; the step runs only the student's side.

Each case is one epoch (epochs 1, 2, ... of one plan; one `AlignedBatches` per case for the whole
bench, as a loop keeps one) after `interleave`'s warm-up round, which pays the first reads and the
batch process's start.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from benchmarks.build import fresh_store
from benchmarks.harness import Figure, ratio_figure, timed
from benchmarks.train import TrainWorkload
from softcache.data.hashing import collate_pairs
from softcache.losses import hard_loss
from softcache.runtime.specs import instantiate
from softcache.store import LogitStore
from softcache.trainer.distill import AlignedBatches, distillation_loss
from softcache.trainer.plan import EpochPlan
from softcache.trainer.stream import PlanSampler

TEMPERATURE = 2.0


class OwnLoopBench:
    """Cases `hard`, `inline-dense`, `inline-topk`, `process-dense`, `process-topk`."""

    warmup = True

    def __init__(self, workload: TrainWorkload, workdir: Path) -> None:
        self.workload = workload
        workdir.mkdir(parents=True, exist_ok=True)
        build = workload.build_workload()
        self.dataset = instantiate(workload.dataset, "dataset")
        self.stores = {
            encoding: LogitStore.open(
                fresh_store(build, encoding, workdir / f"own-loop-{encoding}.zarr")
            )
            for encoding in ("dense", "topk")
        }
        self.device = torch.device(workload.device)
        cuda = self.device.type == "cuda"
        self.aligned = {
            (where, encoding): AlignedBatches(
                self.dataset,
                store,
                batch_process=where == "process",
                temperature=TEMPERATURE if where == "process" else None,
                pin_memory=cuda,
                values="stored" if cuda else "float32",
            )
            for where in ("inline", "process")
            for encoding, store in self.stores.items()
        }
        self.plan = EpochPlan(
            num_samples=len(self.dataset),
            block_rows=self.stores["dense"].meta.shard_samples,
            batch_size=workload.batch_size,
            seed=0,
        )
        self._epochs = itertools.count(1)
        torch.manual_seed(0)
        self.student = instantiate(workload.student, "student").to(self.device)
        self.optimizer = torch.optim.AdamW(self.student.parameters())

    def close(self) -> None:
        """Stop the batch processes."""
        for aligned in self.aligned.values():
            aligned.close()

    def _epoch(self, batches: Iterable[Any], loss_of: Callable[..., torch.Tensor]) -> None:
        device = self.device
        for inputs, labels, soft in batches:
            if device.type != "cpu":
                inputs = inputs.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                soft = soft if soft is None else soft.to(device, non_blocking=True)
            loss = loss_of(self.student(inputs), labels, soft)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            float(loss.detach())

    def _hard(self) -> float:
        self.plan.set_epoch(next(self._epochs))
        loader = DataLoader(
            self.dataset,
            batch_sampler=PlanSampler(self.plan),  # type: ignore[arg-type]  # int64 arrays index like lists
            collate_fn=collate_pairs,
            pin_memory=self.device.type == "cuda",
        )
        return timed(lambda: self._epoch(loader, lambda z, y, _: hard_loss(z, y)))

    def _aligned(self, where: str, encoding: str) -> float:
        aligned = self.aligned[where, encoding]
        temperatures = self.stores[encoding].meta.temperatures
        self.plan.set_epoch(next(self._epochs))

        def loss(logits: torch.Tensor, labels: torch.Tensor, soft: Any) -> torch.Tensor:
            return distillation_loss(
                logits, soft, labels, temperatures=temperatures, temperature=TEMPERATURE, alpha=0.0
            )

        return timed(lambda: self._epoch(aligned.epoch(self.plan), loss))

    def cases(self) -> dict[str, Callable[[], float]]:
        return {
            "hard": self._hard,
            "inline-dense": lambda: self._aligned("inline", "dense"),
            "inline-topk": lambda: self._aligned("inline", "topk"),
            "process-dense": lambda: self._aligned("process", "dense"),
            "process-topk": lambda: self._aligned("process", "topk"),
        }

    def figures(self, samples: dict[str, list[float]]) -> list[Figure]:
        self.close()
        w = self.workload
        prefix = f"{w.label} " if w.label else ""
        note = f"N={len(self.dataset)}, batch {w.batch_size}, every row's hash checked"
        figures = []
        for encoding, what in (("dense", "dense"), ("topk", "top-5")):
            for where, how in (
                ("inline", "AlignedBatches"),
                ("process", "batch_process=True, temperature"),
            ):
                figures.append(
                    ratio_figure(
                        f"{prefix}own loop, {how}: offline KD / hard epoch, {what}",
                        samples,
                        f"{where}-{encoding}",
                        "hard",
                        goal=None,
                        note=note,
                    )
                )
        return figures
