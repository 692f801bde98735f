"""`softcache train`: a small, real trainer for students, from a store or a baseline.

Three modes share everything but the loss: the same student initialisation (seeded), the same data
order (one epoch plan), the same optimiser and schedule, so their numbers compare:

- `offline`: soft labels streamed from the store (the point of softcache);
- `online`: the teacher runs in the loop on every batch (the baseline offline KD replaces);
- `hard`: hard labels only.

A checkpoint (student, optimiser, schedule, RNG, the plan's epoch and cursor, metrics so far) is
written atomically at each epoch end (and every `checkpoint_steps` steps when asked); `--resume`
continues from it and ends with the weights an uninterrupted run reaches.

Distributed (DDP): run the same command under torchrun
(`torchrun --nproc_per_node P -m softcache.cli train ...`; see `softcache.ddp`). Each rank trains a
`DistributedDataParallel` student from the same seeded weights, loads the inputs and reads the
soft-label blocks of its own rows only (the epoch plan gives ranks disjoint whole blocks), and all
ranks take `equal_steps(plan)` steps per epoch, so at most about a block of rows per rank is left
out of an epoch (different rows each epoch). `batch_size` is per rank. Train loss and samples/s are
global; metrics, checkpoints, the eval pass and the progress bar come from rank 0, and no other rank
writes to the output directory. The checkpoint holds the bare student's state_dict and a
rank-independent plan state: `--resume` under torchrun has every rank read it, and resuming with
another number of processes is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from softcache import losses
from softcache.config import TrainConfig
from softcache.data.hashing import collate_pairs, collate_with_hashes
from softcache.errors import ConfigError, DatasetMismatchError, SpecError
from softcache.runtime.cluster import connect
from softcache.runtime.progress import Progress
from softcache.runtime.specs import instantiate
from softcache.store import LogitStore
from softcache.trainer import ddp
from softcache.trainer.distill import AlignedBatches, distillation_loss
from softcache.trainer.plan import EpochPlan
from softcache.trainer.stream import PlanSampler, equal_steps, plan_from_state

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
# Settings a resumed run must share with the checkpoint, or its result would be a different run.
_RESUME_KEYS = (
    "student", "dataset", "store", "mode", "teacher", "epochs", "batch_size", "lr", "optimizer",
    "weight_decay", "schedule", "temperature", "alpha", "seed", "block_rows", "window_blocks",
    "view_policy", "augment", "augment_seed",
)  # fmt: skip


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced: the metrics (as in metrics.json) and where it wrote them.

    Under DDP every rank gets one; only rank 0's metrics hold the eval results.
    """

    metrics: dict[str, Any]
    output: Path
    student: nn.Module
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        """Whether this process reports (rank 0, or the only process): print results only there."""
        return self.rank == 0


def train(config: TrainConfig, *, progress: bool = True, client: Any | None = None) -> TrainResult:
    """Train a student as `config` says; write checkpoints and metrics.json under `config.output`.

    Under `torchrun` (RANK, WORLD_SIZE and LOCAL_RANK set, WORLD_SIZE > 1) every process runs this
    as one DDP rank; see the module docstring. Without them it trains in this one process.

    Args:
        config: the training configuration.
        progress: show a progress bar on stderr (rank 0 only).
        client: a `distributed.Client` for the soft-label stream (overrides `dask_scheduler`).

    Raises:
        SoftcacheError: bad specs, a store that is incomplete or does not match the dataset, or a
            checkpoint that belongs to another configuration or another number of ranks.
    """
    if config.lm:
        from softcache.trainer.tokens import train_lm

        return train_lm(config, progress=progress, client=client)
    with contextlib.ExitStack() as stack:
        ranks, device = ddp.join(config, stack)
        return _train(config, ranks, device, progress=progress, client=client, stack=stack)


def _train(
    config: TrainConfig,
    ranks: ddp.Ranks,
    device: torch.device,
    *,
    progress: bool,
    client: Any | None,
    stack: contextlib.ExitStack,
) -> TrainResult:
    cuda = device.type == "cuda"
    dataset = instantiate(config.dataset, "dataset")
    options = config.storage_options
    store = LogitStore.open(config.store, storage_options=options) if config.store else None
    if store is not None and store.meta.tokens:
        raise ConfigError(
            f"store {config.store} holds per-token soft labels of a language model; pass --lm "
            "to train a causal-LM student from it"
        )
    if store is not None and len(dataset) != store.meta.num_samples:
        raise DatasetMismatchError(
            f"the dataset has {len(dataset)} samples but store {config.store} was built from "
            f"{store.meta.num_samples}; use the dataset the store was built from"
        )
    torch.manual_seed(config.seed)  # the same initial student on every rank
    student = module_from_spec(config.student, "student").to(device)
    teacher = (
        module_from_spec(config.teacher, "teacher").eval().to(device) if config.teacher else None
    )
    plan = EpochPlan(
        num_samples=len(dataset),
        block_rows=store.meta.shard_samples if store else config.block_rows,
        batch_size=config.batch_size,
        seed=config.seed,
        window_blocks=config.window_blocks,
        rank=ranks.rank,
        world_size=ranks.world_size,
    )
    ddp.check_ranks(plan, ranks)
    steps_total = ddp.total_steps(plan, config.epochs)
    optimizer = make_optimizer(config, student)
    schedule = make_schedule(config, optimizer, steps_total)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and cuda)
    output = Path(config.output)
    if ranks.main:
        output.mkdir(parents=True, exist_ok=True)
    metrics = _new_metrics(config, store, ranks)
    partial = _EpochStats()
    if config.resume:  # every rank reads the checkpoint; only rank 0 ever writes it
        state = _load_checkpoint(output, config, ranks)
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        plan.load_state_dict({**state["plan"], "rank": ranks.rank})
        torch.set_rng_state(state["torch_rng"])
        metrics = state["metrics"]
        if ranks.main:  # the saved sums are global: counted once, on rank 0
            partial = _EpochStats(**state["partial"])
    model: nn.Module = student
    if ranks.world_size > 1:
        # Broadcasts rank 0's weights and buffers (identical anyway: same seed or checkpoint).
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if cuda else None
        )
    if client is None and config.dask_scheduler:
        client = connect(config.dask_scheduler)
        stack.callback(client.close)  # a client we opened, we close
    evaluator = _Evaluator(config, teacher, device) if ranks.main else None
    aligned = None
    if config.mode == "offline":
        assert store is not None
        aligned = AlignedBatches(
            dataset,
            store,
            num_workers=config.num_workers,
            pin_memory=cuda,
            prefetch_blocks=config.prefetch_blocks,
            client=client,
            view_policy=config.view_policy,
            # A GPU widens fp16 -> fp32 for free after a copy of half the bytes; a CPU student
            # leaves it to the reader thread.
            values="stored" if cuda else "float32",
        )
    fresh = _fresh_augmentation(config, store, dataset)

    first_epoch = plan.epoch
    for epoch in range(plan.epoch, config.epochs):
        if plan.epoch != epoch:
            plan.set_epoch(epoch)
        steps = equal_steps(plan)  # the same on every rank: collectives stay in step
        rows = ddp.RowCount(plan, steps)
        start_cursor = plan.cursor
        stats, partial = partial, _EpochStats()
        bar = Progress(
            rows.total,
            f"epoch {epoch + 1}/{config.epochs}",
            enabled=progress and ranks.main,
            initial=rows.before(start_cursor),
        )
        t_epoch = time.perf_counter()
        t_ready = t_epoch
        model.train()
        stride = _hash_stride(config, first_epoch=epoch == first_epoch)
        batches = _batches(config, dataset, aligned, plan, steps, cuda, stride)
        for step, (inputs, labels, soft, indices) in enumerate(batches):
            if fresh is not None:  # a new random view of every sample, every epoch
                inputs = fresh.views(inputs, indices, epoch)
            stats.wait += time.perf_counter() - t_ready
            inputs = inputs.to(device, non_blocking=cuda)
            labels = labels.to(device, non_blocking=cuda)
            with _autocast(device, config.amp):
                logits = model(inputs)
                loss = _loss(config, logits, labels, soft, teacher, inputs, store, device)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # under DDP: the gradient all-reduce
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            loss_value = float(loss.detach())  # syncs the device: the step is done here
            if metrics["first_step_loss"] is None:
                metrics["first_step_loss"] = ddp.global_mean(loss_value, len(labels), ranks, device)
            stats.loss_sum += loss_value * len(labels)
            stats.samples += len(labels)
            cursor = start_cursor + step + 1
            bar.update(rows.at(cursor - 1))
            if config.checkpoint_steps and cursor % config.checkpoint_steps == 0 and cursor < steps:
                stats.seconds += time.perf_counter() - t_epoch
                t_epoch = time.perf_counter()
                so_far = _global_stats(stats, ranks, device)  # a collective: on every rank
                if ranks.main:
                    at = dict(plan.state_dict(), cursor=cursor)
                    _save_checkpoint(
                        output, student, optimizer, schedule, scaler, at, metrics, so_far
                    )
            t_ready = time.perf_counter()
        bar.close()
        stats.seconds += time.perf_counter() - t_epoch
        epoch_stats = _global_stats(stats, ranks, device)
        # Rank 0 evaluates and writes while the others go on to the next epoch's first
        # all-reduce, where they wait for it (within the process group's timeout).
        eval_accuracy, agreement = evaluator(student) if evaluator else (None, None)
        _record_epoch(metrics, epoch_stats, eval_accuracy, agreement)
        plan.set_epoch(epoch + 1)
        if ranks.main:
            _save_checkpoint(
                output,
                student,
                optimizer,
                schedule,
                scaler,
                plan.state_dict(),
                metrics,
                _EpochStats(),
            )
            write_json(output / METRICS, metrics)
    if ranks.main:
        write_json(output / METRICS, metrics)
    return TrainResult(
        metrics=metrics,
        output=output,
        student=student,
        rank=ranks.rank,
        world_size=ranks.world_size,
    )


# ---- the step ----------------------------------------------------------------------------------


def _batches(
    config: TrainConfig,
    dataset: Any,
    aligned: AlignedBatches | None,
    plan: EpochPlan,
    steps: int,
    cuda: bool,
    hash_stride: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, Any, np.ndarray]]:
    """The epoch's batches from the plan's cursor up to batch `steps`: inputs, labels, soft
    labels (None without a store) and the batch's dataset indices."""
    if aligned is not None:
        assert aligned.steps(plan) == steps
        then = None
        if plan.epoch + 1 < config.epochs:
            then = plan_from_state(dict(plan.state_dict(), cursor=0))
            then.set_epoch(plan.epoch + 1)
        for inputs, labels, soft in aligned.epoch(plan, hash_stride=hash_stride, then=then):
            yield inputs, labels, soft, soft.indices
        return
    loader = DataLoader(
        dataset,
        batch_sampler=PlanSampler(plan, steps),  # type: ignore[arg-type]  # int64 arrays index like lists
        collate_fn=collate_pairs,
        num_workers=config.num_workers,
        pin_memory=cuda,
    )
    # A second, independent copy of the plan names each batch's rows (a sampler's own cursor
    # is shared by its iterators).
    for indices, (inputs, labels, _) in zip(PlanSampler(plan, steps), loader, strict=True):
        yield inputs, labels, None, indices


def _fresh_augmentation(config: TrainConfig, store: LogitStore | None, dataset: Any) -> Any:
    """`--augment` for runs that draw new views each epoch (hard, online, or a store without
    views); None otherwise. A store with views replays its own augmentation instead."""
    if not config.augment:
        return None
    if config.mode == "offline" and store is not None and store.meta.augmentation:
        raise ConfigError(
            f"store {store.location} holds {store.meta.views} view(s) per sample made with "
            f"{store.meta.augmentation['spec']!r} and replays them; drop --augment (it is for "
            "hard, online and view-less offline runs, which draw new views every epoch)"
        )
    from softcache.data.augment import parse_augment
    from softcache.data.views import FreshViews

    return FreshViews(parse_augment(config.augment), config.augment_seed)


def _hash_stride(config: TrainConfig, *, first_epoch: bool) -> int:
    """Rows between alignment-checked rows this epoch (1: all, 0: none); see `hash_check`."""
    if config.hash_check == "all" or (config.hash_check == "first-epoch" and first_epoch):
        return 1
    return config.hash_stride if config.hash_check == "first-epoch" else 0


def _loss(
    config: TrainConfig,
    logits: torch.Tensor,
    labels: torch.Tensor,
    soft: Any,
    teacher: nn.Module | None,
    inputs: torch.Tensor,
    store: LogitStore | None,
    device: torch.device,
) -> torch.Tensor:
    if config.mode == "hard":
        return losses.hard_loss(logits, labels)
    if config.mode == "online":
        assert teacher is not None
        with torch.inference_mode():
            teacher_logits = teacher(inputs)
        return losses.kd_loss_dense(
            logits,
            teacher_logits.clone(),
            labels,
            temperature=config.temperature,
            alpha=config.alpha,
        )
    assert store is not None
    return distillation_loss(
        logits,
        soft.to(device, non_blocking=device.type == "cuda"),
        labels,
        temperatures=store.meta.temperatures,
        temperature=config.temperature,
        alpha=config.alpha,
    )


# ---- evaluation --------------------------------------------------------------------------------


class _Evaluator:
    """Accuracy on the eval set and top-1 agreement with the teacher there, when it is known."""

    def __init__(
        self, config: TrainConfig, teacher: nn.Module | None, device: torch.device
    ) -> None:
        self.device = device
        self.amp = config.amp
        self.loader: DataLoader | None = None
        self.teacher_top1: torch.Tensor | None = None
        if not config.eval_dataset:
            return
        dataset = instantiate(config.eval_dataset, "eval dataset")
        self.loader = DataLoader(dataset, batch_size=512, collate_fn=collate_with_hashes)
        if config.eval_store:
            eval_store = LogitStore.open(config.eval_store, storage_options=config.storage_options)
            self.teacher_top1 = self._store_top1(eval_store, dataset)
        elif teacher is not None:
            with torch.inference_mode():
                self.teacher_top1 = torch.cat(
                    [teacher(x.to(device)).argmax(1).cpu() for x, _, _ in self.loader]
                )

    def _store_top1(self, store: LogitStore, dataset: Any) -> torch.Tensor:
        if len(dataset) != store.meta.num_samples:
            raise DatasetMismatchError(
                f"the eval dataset has {len(dataset)} samples but eval store {store.location} "
                f"holds {store.meta.num_samples}"
            )
        assert self.loader is not None
        hashes = np.concatenate([h for _, _, h in self.loader])
        bad = np.flatnonzero(hashes != store.sample_hashes())
        if bad.size:
            raise DatasetMismatchError(
                f"eval dataset sample {int(bad[0])} does not match eval store {store.location}"
            )
        return torch.from_numpy(store.top1()).long()

    def __call__(self, student: nn.Module) -> tuple[float | None, float | None]:
        if self.loader is None:
            return None, None
        student.eval()
        correct = labelled = 0
        predictions = []
        with torch.inference_mode(), _autocast(self.device, self.amp):
            for inputs, labels, _ in self.loader:
                pred = student(inputs.to(self.device)).argmax(1).cpu()
                predictions.append(pred)
                has_label = labels >= 0
                correct += int((pred[has_label] == labels[has_label]).sum())
                labelled += int(has_label.sum())
        student.train()
        accuracy = correct / labelled if labelled else None
        agreement = None
        if self.teacher_top1 is not None:
            agreement = float((torch.cat(predictions) == self.teacher_top1).float().mean())
        return accuracy, agreement


# ---- bookkeeping -------------------------------------------------------------------------------


@dataclass
class _EpochStats:
    """Running sums of the current epoch, carried through a mid-epoch checkpoint."""

    loss_sum: float = 0.0
    samples: int = 0
    wait: float = 0.0
    seconds: float = 0.0


def _new_metrics(config: TrainConfig, store: LogitStore | None, ranks: ddp.Ranks) -> dict[str, Any]:
    return {
        "mode": config.mode,
        "world_size": ranks.world_size,
        "epoch": [],
        "train_loss": [],
        "eval_accuracy": [],
        "teacher_agreement": [],
        "epoch_seconds": [],
        "samples_per_second": [],
        "data_wait_fraction": [],
        "first_step_loss": None,
        "store_bytes_per_sample": (
            store.nbytes_stored() / store.meta.num_samples if store is not None else None
        ),
        "config": config.to_dict(),
    }


def _record_epoch(
    metrics: dict[str, Any], stats: _EpochStats, accuracy: float | None, agreement: float | None
) -> None:
    metrics["epoch"].append(len(metrics["epoch"]) + 1)
    metrics["train_loss"].append(stats.loss_sum / max(stats.samples, 1))
    metrics["eval_accuracy"].append(accuracy)
    metrics["teacher_agreement"].append(agreement)
    metrics["epoch_seconds"].append(stats.seconds)
    metrics["samples_per_second"].append(stats.samples / stats.seconds if stats.seconds else None)
    metrics["data_wait_fraction"].append(stats.wait / stats.seconds if stats.seconds else None)


def _global_stats(stats: _EpochStats, ranks: ddp.Ranks, device: torch.device) -> _EpochStats:
    """Loss and sample sums over all ranks (a collective); times are this rank's."""
    if ranks.world_size == 1:
        return _EpochStats(**vars(stats))
    loss_sum, samples = ddp.all_sum([stats.loss_sum, stats.samples], device)
    return _EpochStats(loss_sum, round(samples), stats.wait, stats.seconds)


def _save_checkpoint(
    output: Path,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    scaler: Any,
    plan_state: dict[str, Any],
    metrics: dict[str, Any],
    stats: _EpochStats,
) -> None:
    state = {
        "student": student.state_dict(),  # the bare student, never the DDP wrapper
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "scaler": scaler.state_dict(),
        # Rank-independent: every rank resumes at the same cursor with its own rank.
        "plan": {k: v for k, v in plan_state.items() if k != "rank"},
        "torch_rng": torch.get_rng_state(),
        "metrics": metrics,
        "partial": vars(stats).copy(),
    }
    tmp = output / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, output / CHECKPOINT)  # atomic: a kill never leaves half a checkpoint


def _load_checkpoint(output: Path, config: TrainConfig, ranks: ddp.Ranks) -> dict[str, Any]:
    path = output / CHECKPOINT
    if not path.is_file():
        where = "" if ranks.world_size == 1 else f" (as seen by rank {ranks.rank})"
        raise ConfigError(
            f"--resume: no checkpoint at {path}{where}; drop --resume to start a new run"
            + ("" if ranks.world_size == 1 else ", or put --output where every rank can read it")
        )
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved_world = state["plan"].get("world_size", 1)
    if saved_world != ranks.world_size:
        raise ConfigError(
            f"--resume: the checkpoint in {output} was written by a run of {saved_world} "
            f"process(es) but this run has {ranks.world_size}; the epoch plan splits the data "
            f"between processes, so resume with {saved_world} (torchrun --nproc_per_node, "
            "times nodes) or choose another --output"
        )
    check_resume_settings(state["metrics"]["config"], config, _RESUME_KEYS, output)
    return state


def check_resume_settings(
    saved: dict[str, Any], config: TrainConfig, keys: tuple[str, ...], output: Path
) -> None:
    """Refuse to resume a checkpoint whose run had other values for any of `keys`."""
    now = config.to_dict()
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


# ---- pieces ------------------------------------------------------------------------------------


def module_from_spec(spec: str, what: str) -> nn.Module:
    """Instantiate a spec that must build an `nn.Module` (`what` names it in errors)."""
    module = instantiate(spec, what)
    if not isinstance(module, nn.Module):
        raise SpecError(
            f"{what} factory {spec!r} returned a {type(module).__name__}, not an nn.Module"
        )
    return module


def make_optimizer(config: TrainConfig, student: nn.Module) -> torch.optim.Optimizer:
    """The optimiser `config` names, over the student's parameters."""
    params = student.parameters()
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)


def make_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer, steps: int) -> Any:
    """The per-step learning-rate schedule `config` names, over `steps` steps."""
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()
