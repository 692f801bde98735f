"""The training loop, written once for every layout: plan, steps, checkpoints, metrics, DDP.

Three modes share everything but the loss: the same student initialisation (seeded), the same data
order (one epoch plan), the same optimiser and schedule, so their numbers compare:

- `offline`: soft labels streamed from the store (the point of softcache);
- `online`: the teacher runs in the loop on every batch (the baseline offline KD replaces);
- `hard`: hard labels only.

What differs between row stores and token stores (what a batch is, how its loss is computed, what
the evaluation reports) is a layout object the loop calls: `softcache.trainer.rows.RowLayout` or
`softcache.trainer.tokens.TokenLayout`. A new layout is one new class, not edits across the loop.

A checkpoint (student, optimiser, schedule, RNG, the plan's epoch and cursor, metrics so far) is
written atomically at each epoch end (and every `checkpoint_steps` steps when asked); `--resume`
continues from it and ends with the weights an uninterrupted run reaches.

Distributed (DDP): run the same command under torchrun
(`torchrun --nproc_per_node P -m softcache.cli train ...`; see `softcache.trainer.ddp`), for row
and token stores alike. Each rank trains a `DistributedDataParallel` student from the same seeded
weights, loads the inputs and reads the soft-label blocks of its own samples only (the epoch plan
gives ranks disjoint whole blocks), and all ranks take `equal_steps(plan)` steps per epoch, so at
most about a block of samples per rank is left out of an epoch (different ones each epoch).
`batch_size` is per rank. Train loss and throughput are global; metrics, checkpoints, the eval pass
and the progress bar come from rank 0, and no other rank writes to the output directory. Resuming
with another number of processes is refused.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softcache.config import TrainConfig
from softcache.errors import ConfigError
from softcache.runtime.cluster import connect
from softcache.runtime.devices import autocast
from softcache.runtime.progress import Progress
from softcache.runtime.specs import module_from
from softcache.runtime.threads import (
    batch_maker_read_threads,
    intra_op_threads,
    local_ranks,
    read_threads,
    reading_threads,
    student_threads,
)
from softcache.trainer import checkpoint as ckpt
from softcache.trainer import ddp
from softcache.trainer.ahead import Ahead
from softcache.trainer.batch_process import NextEpoch
from softcache.trainer.layout_process import open_batch_process, ready_or_none
from softcache.trainer.layouts import TrainLayout, open_layout
from softcache.trainer.plan import EpochPlan
from softcache.trainer.stream import equal_steps, plan_from_state

# Settings a resumed run must share with its checkpoint, or its result would be another run's.
RESUME_KEYS = (
    "student", "dataset", "store", "mode", "teacher", "epochs", "batch_size", "lr", "optimizer",
    "weight_decay", "schedule", "temperature", "alpha", "seed", "block_rows", "window_blocks",
    "max_steps",
)  # fmt: skip


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced: the metrics (as in metrics.json) and where it wrote them.

    The trained weights are also in `output / "student.pt"` (a plain state dict). Under DDP every
    rank gets one; only rank 0's metrics hold the eval results.
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


# Called after each epoch's evaluation and checkpoint: (the epoch's index from 0, the run's metrics).
EpochHook = Callable[[int, dict[str, Any]], None]


def train(
    config: TrainConfig,
    *,
    progress: bool = True,
    client: Any | None = None,
    on_epoch_end: EpochHook | None = None,
) -> TrainResult:
    """Train a student as `config` says; write checkpoints, metrics.json and student.pt under
    `config.output`.

    Under `torchrun` (RANK, WORLD_SIZE and LOCAL_RANK set, WORLD_SIZE > 1) every process runs this
    as one DDP rank; see the module docstring. Without them it trains in this one process.

    A CPU student's ops run on `config.threads` intra-op threads: by default the usable cores
    less one per batch maker (`softcache.runtime.threads.student_threads`). torch's count is
    restored on return. The run's store reads (in its batch process, or on its batch thread)
    decode on the cores the student and the DataLoader workers leave, at least one
    (`batch_maker_read_threads`), unless `SOFTCACHE_READ_THREADS` says otherwise.

    Args:
        config: the training configuration (`config.lm` picks the token layout).
        progress: show a progress bar on stderr (rank 0 only).
        client: a `distributed.Client` for the soft-label stream (overrides `dask_scheduler`).
        on_epoch_end: called on every rank after each epoch's evaluation and checkpoint, with the
            epoch's index (from 0) and the run's metrics so far (as in metrics.json; the epoch's
            entries last; read them, do not change them), before the next epoch's clock starts:
            to log them elsewhere, or to stop the run early. What it raises ends the run; its
            checkpoint is kept, so `resume` continues from the next epoch. Under DDP a rank it
            holds back holds the others at their next collective.

    Returns:
        A `TrainResult`. Row runs record per epoch `train_loss`, `eval_accuracy`,
        `teacher_agreement`, `samples_per_second`; token runs `train_loss`, `eval_perplexity`,
        `eval_bits_per_token`, `eval_accuracy`, `teacher_agreement`, `eval_kl_to_teacher`,
        `tokens_per_second` (None where not measurable). Both also record per epoch
        `epoch_seconds`, `data_wait_fraction` (the share of the epoch the step waited for its
        batch) and `step_seconds_median` (the median time from one step's end to the next's,
        wait included: what a step costs, without the epoch's start or its single stalls).

    Raises:
        SoftcacheError: bad specs, a store that is incomplete or does not match the dataset, an
            output that holds another run, or a checkpoint that belongs to another
            configuration or another number of ranks.
    """
    with contextlib.ExitStack() as stack:
        ranks, device = ddp.join(config, stack)
        # The batch maker (a child process or a thread) and each DataLoader worker take a core.
        threads = student_threads(
            config.threads,
            cpu_student=device.type == "cpu",
            batch_makers=1 + config.num_workers,
            local_ranks=local_ranks(),
        )
        step_threads = stack.enter_context(intra_op_threads(threads))
        # The batch maker's reads on the cores the student leaves: decoding on every core put a
        # read group's decode on the student's core too (benchmarks/README.md, eighteenth pass).
        reads = batch_maker_read_threads(
            step_threads,
            cpu_student=device.type == "cpu",
            workers=config.num_workers,
            local_ranks=local_ranks(),
        )
        stack.enter_context(reading_threads(reads))
        if client is None and config.dask_scheduler:
            client = connect(config.dask_scheduler)
            stack.callback(client.close)  # a client we opened, we close
        return _train(
            config,
            ranks,
            device,
            progress=progress,
            client=client,
            stack=stack,
            on_epoch_end=on_epoch_end,
        )


def _train(
    config: TrainConfig,
    ranks: ddp.Ranks,
    device: torch.device,
    *,
    progress: bool,
    client: Any | None,
    stack: contextlib.ExitStack,
    on_epoch_end: EpochHook | None,
) -> TrainResult:
    cuda = device.type == "cuda"
    output = Path(config.output)
    _check_output(output, config)
    layout = open_layout(config, ranks, device, client)
    stack.callback(layout.close)
    # The batches' maker: a child process (builds its own layout from the config while this
    # process builds the student), or None for a thread of this one (see `batch_process`).
    feeder = open_batch_process(config, ranks, device) if client is None else None
    if feeder is not None:
        stack.callback(feeder.close)
    # While the child starts: what the first step would wait for (the compiled top-k kernel).
    layout.warm_up()
    torch.manual_seed(config.seed)  # the same initial student on every rank
    student = module_from(config.student, "student").to(device)
    layout.check_student(student)
    teacher = None
    if config.teacher:
        teacher = module_from(config.teacher, "teacher").eval().to(device)
        teacher.requires_grad_(False)
    try:
        plan = EpochPlan(
            num_samples=layout.num_samples,
            block_rows=layout.block_rows,
            batch_size=config.batch_size,
            seed=config.seed,
            window_blocks=config.window_blocks,
            rank=ranks.rank,
            world_size=ranks.world_size,
        )
    except ValueError as exc:  # e.g. a batch wider than a shuffle window: a setting to change
        raise ConfigError(f"{exc} (--batch-size, --window-blocks)") from exc
    ddp.check_ranks(plan, ranks)
    steps_total = ddp.total_steps(plan, config.epochs)
    if config.max_steps:
        steps_total = min(steps_total, config.max_steps)
    optimizer = make_optimizer(config, student)
    schedule = make_schedule(config, optimizer, steps_total)
    # fp16 autocast needs loss scaling, or small gradients underflow to zero (a no-op elsewhere).
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and cuda)
    if ranks.main:
        output.mkdir(parents=True, exist_ok=True)
    metrics = _new_metrics(config, layout, ranks)
    partial, step = ckpt.EpochStats(), 0
    resume_keys = RESUME_KEYS + layout.resume_keys
    if config.resume:  # every rank reads the checkpoint; only rank 0 ever writes it
        state = ckpt.load_checkpoint(
            output, config.to_dict(), resume_keys, rank=ranks.rank, world_size=ranks.world_size
        )
        student.load_state_dict(state.student)
        optimizer.load_state_dict(state.optimizer)
        schedule.load_state_dict(state.schedule)
        scaler.load_state_dict(state.scaler)
        plan.load_state_dict({**state.plan, "rank": ranks.rank})
        torch.set_rng_state(state.torch_rng)
        metrics, step = state.metrics, state.step
        metrics["threads"] = torch.get_num_threads()  # this run's, which may differ
        metrics["read_threads"] = read_threads()
        if ranks.main:  # the saved sums are global: counted once, on rank 0
            partial = state.partial
    model: nn.Module = student
    if ranks.world_size > 1:
        # Broadcasts rank 0's weights and buffers (identical anyway: same seed or checkpoint).
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if cuda else None
        )
    evaluate = layout.evaluator(teacher) if ranks.main else None
    feeder = ready_or_none(feeder)

    first_epoch = plan.epoch
    for epoch in range(plan.epoch, config.epochs):
        if step >= steps_total:
            break
        if plan.epoch != epoch:
            plan.set_epoch(epoch)
        steps = equal_steps(plan)  # the same on every rank: collectives stay in step
        rows = ddp.RowCount(plan, steps)
        start_cursor = plan.cursor
        stats, partial = partial, ckpt.EpochStats()
        loss_sum = LossSum(stats, device, lazy=cuda)
        bar = Progress(
            rows.total,
            f"epoch {epoch + 1}/{config.epochs}",
            enabled=progress and ranks.main,
            initial=rows.before(start_cursor),
        )
        then = _following(plan, config.epochs)
        t_epoch = time.perf_counter()
        t_ready = t_epoch
        periods: list[float] = []  # each step's, from the end of the one before
        model.train()
        stride = epoch_hash_stride(config, first_epoch=epoch == first_epoch)
        # Inputs and soft labels are made in the batch process, or on a background thread
        # (`Ahead`): the step only takes finished batches, so their collation, hashing and
        # gathering overlap with it.
        if feeder is not None:
            batches = feeder.batches(
                plan, steps, hash_stride=stride, then=then, after=_next_epoch(config, then)
            )
        else:
            source = layout.batches(plan, steps, hash_stride=stride, then=then)
            batches = Ahead(source, depth=2, name="batches").results()
        for i, batch in enumerate(batches):
            stats.wait += time.perf_counter() - t_ready
            with autocast(device, config.amp):
                loss, count = layout.loss(model, batch, teacher)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # under DDP: the gradient all-reduce
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            step += 1
            if metrics["first_step_loss"] is None:
                first = float(loss.detach())
                metrics["first_step_loss"] = ddp.global_mean(first, count, ranks, device)
            loss_sum.add(loss, count)  # on a GPU, without waiting for the step's kernels
            stats.count += count
            cursor = start_cursor + i + 1
            bar.update(rows.at(cursor - 1))
            if step >= steps_total:
                batches.close()  # stops the background thread before the epoch's bookkeeping
                break
            every = config.checkpoint_steps
            if every and cursor % every == 0 and cursor < steps:
                loss_sum.read(sync=True)
                stats.seconds += time.perf_counter() - t_epoch
                t_epoch = time.perf_counter()
                so_far = _global_stats(stats, ranks, device)  # a collective: on every rank
                if ranks.main:
                    metrics["steps"] = step
                    at = dict(plan.state_dict(), cursor=cursor)
                    ckpt.save_checkpoint(
                        output, student, optimizer, schedule, scaler, at, step, metrics, so_far
                    )
            now = time.perf_counter()
            periods.append(now - t_ready)
            t_ready = now
        bar.close()
        loss_sum.read(sync=True)  # the epoch's steps are done on the device too
        stats.seconds += time.perf_counter() - t_epoch
        epoch_stats = _global_stats(stats, ranks, device)
        # Rank 0 evaluates and writes while the others go on to the next epoch's first
        # all-reduce, where they wait for it (within the process group's timeout).
        results = evaluate(student) if evaluate else dict.fromkeys(layout.eval_keys)
        _record_epoch(metrics, epoch_stats, results, layout.unit, periods)
        metrics["steps"] = step
        plan.set_epoch(epoch + 1)
        if ranks.main:
            ckpt.save_checkpoint(
                output,
                student,
                optimizer,
                schedule,
                scaler,
                plan.state_dict(),
                step,
                metrics,
                ckpt.EpochStats(),
            )
            ckpt.save_student(output, student, tokenizer=layout.tokenizer)
            ckpt.write_json(output / ckpt.METRICS, metrics)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
    if ranks.main:
        ckpt.write_json(output / ckpt.METRICS, metrics)
    return TrainResult(
        metrics=metrics,
        output=output,
        student=student,
        rank=ranks.rank,
        world_size=ranks.world_size,
    )


def _check_output(output: Path, config: TrainConfig) -> None:
    """Refuse to write over another run unless told to (`resume` continues it, `overwrite`
    replaces it)."""
    if config.resume or config.overwrite:
        return
    held = [name for name in (ckpt.CHECKPOINT, ckpt.METRICS) if (output / name).exists()]
    if held:
        raise ConfigError(
            f"{output} already holds a training run ({', '.join(held)}); pass --resume to "
            "continue it, --overwrite to replace it, or choose another --output"
        )


def _following(plan: EpochPlan, epochs: int) -> EpochPlan | None:
    """A new plan at the start of the epoch after `plan`'s; None if that is past `epochs`."""
    if plan.epoch + 1 >= epochs:
        return None
    after = plan_from_state(plan.state_dict())
    after.set_epoch(plan.epoch + 1)  # from its first batch
    return after


def _next_epoch(config: TrainConfig, then: EpochPlan | None) -> NextEpoch | None:
    """The epoch after this one as the loop will ask the batch process for it (its plan and
    `then` made as the loop makes them), for the child to start as soon as this one is made;
    None after the last epoch."""
    if then is None:
        return None
    stride = epoch_hash_stride(config, first_epoch=False)
    return NextEpoch(then, equal_steps(then), stride, _following(then, config.epochs))


def epoch_hash_stride(config: TrainConfig, *, first_epoch: bool) -> int:
    """Rows between alignment-checked rows this epoch (1: all, 0: none); see `hash_check`."""
    if config.hash_check == "all" or (config.hash_check == "first-epoch" and first_epoch):
        return 1
    return config.hash_stride if config.hash_check == "first-epoch" else 0


def _new_metrics(config: TrainConfig, layout: TrainLayout, ranks: ddp.Ranks) -> dict[str, Any]:
    return {
        "mode": config.mode,
        "world_size": ranks.world_size,
        "epoch": [],
        "train_loss": [],
        **{key: [] for key in layout.eval_keys},
        "epoch_seconds": [],
        f"{layout.unit}_per_second": [],
        "data_wait_fraction": [],
        "step_seconds_median": [],
        "threads": torch.get_num_threads(),
        "read_threads": read_threads(),
        "first_step_loss": None,
        "steps": 0,
        **layout.metrics(),
        "config": config.to_dict(),
    }


def _record_epoch(
    metrics: dict[str, Any],
    stats: ckpt.EpochStats,
    results: dict[str, Any],
    unit: str,
    periods: list[float],
) -> None:
    metrics["epoch"].append(len(metrics["epoch"]) + 1)
    metrics["train_loss"].append(stats.loss_sum / max(stats.count, 1))
    for key, value in results.items():
        metrics[key].append(value)
    metrics["epoch_seconds"].append(stats.seconds)
    metrics[f"{unit}_per_second"].append(stats.count / stats.seconds if stats.seconds else None)
    metrics["data_wait_fraction"].append(stats.wait / stats.seconds if stats.seconds else None)
    # This rank's steps of this process (a resumed epoch: those after the resume). A checkpoint
    # of an earlier version has no such list: it starts at the resumed epoch.
    step = statistics.median(periods) if periods else None
    metrics.setdefault("step_seconds_median", []).append(step)


class LossSum:
    """An epoch's loss sum (each step's mean loss times its count) into `stats.loss_sum`.

    On the CPU each step's loss is read as it comes. On a GPU (`lazy`) the sum is kept on the
    device and read into `stats` only by `read`: reading a loss waits for its step's kernels, so
    a read every step kept the next step's Python (its batch's hand-off, its launches) from
    running beside the step before. A batch process's slot is not reused before the copies made
    from it are done (see `softcache.trainer.batch_process`), so the loop may run ahead.

    Args:
        stats: the epoch's running sums (its `loss_sum` carries over a mid-epoch resume).
        device: the student's device.
        lazy: keep the sum on the device until read.
    """

    def __init__(self, stats: ckpt.EpochStats, device: torch.device, *, lazy: bool) -> None:
        self.stats = stats
        self.device = device
        self._sum = (
            torch.tensor(stats.loss_sum, dtype=torch.float64, device=device) if lazy else None
        )

    def add(self, loss: torch.Tensor, count: int) -> None:
        """Add a step's mean `loss` (a scalar tensor) over `count` samples or tokens."""
        if self._sum is None:
            self.stats.loss_sum += float(loss.detach()) * count
        else:
            self._sum.add_(loss.detach().to(torch.float64), alpha=count)

    def read(self, *, sync: bool = False) -> None:
        """Bring the sum into `stats.loss_sum`; `sync`: then wait for all the device's work
        (an epoch's or a checkpoint's time ends with its steps done, not just launched)."""
        if self._sum is not None:
            self.stats.loss_sum = float(self._sum)
        if sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _global_stats(
    stats: ckpt.EpochStats, ranks: ddp.Ranks, device: torch.device
) -> ckpt.EpochStats:
    """Loss and count sums over all ranks (a collective); times are this rank's."""
    if ranks.world_size == 1:
        return ckpt.EpochStats(**vars(stats))
    loss_sum, count = ddp.all_sum([stats.loss_sum, stats.count], device)
    return ckpt.EpochStats(loss_sum, round(count), stats.wait, stats.seconds)


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
