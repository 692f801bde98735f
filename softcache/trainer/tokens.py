"""`softcache train --lm`: train a causal-LM student per token, from a per-token store or baselines.

Modes (``TrainConfig.mode``), each over the same epoch plan of samples:

- ``offline``: KD from the store. ``topk`` stores: `softcache.tokens.topk_residual_kl` (the
  kept tokens plus one residual bin); ``sampled`` stores: `softcache.tokens.sampled_kl` (an
  unbiased estimate of the full KL). The temperature is the store's: its log-probabilities and
  draws were taken at it.
- ``online``: the teacher runs on every batch; the loss is the full per-token KL at
  ``config.temperature`` (Hinton et al., 2015), the reference an offline cache approximates.
- ``hard``: next-token cross-entropy only.

With ``alpha > 0`` the loss is ``alpha * CE + (1 - alpha) * KD``. Every loss is a mean over the
batch's real tokens (`softcache.sequences`: padding never counts). After each epoch, a held-out
dataset gives the student's perplexity and next-token accuracy, its agreement with the teacher's
top-1 (from ``eval_store``, or from the teacher when one is given) and, with a teacher, its KL to
the teacher's full distribution.

A checkpoint is written at every epoch end and, with ``checkpoint_steps``, every that many steps
inside an epoch (atomically); ``--resume`` continues from the last, mid-epoch included, to the
weights an uninterrupted run reaches.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softcache.config import TrainConfig
from softcache.data.sequences import (
    IGNORE_INDEX,
    causal_logits,
    collate_sequences,
    item_tokens,
    scan,
)
from softcache.errors import ConfigError, DatasetMismatchError
from softcache.losses import tokens as token_losses
from softcache.losses.tokens import dense_kl
from softcache.runtime.cluster import connect
from softcache.runtime.devices import autocast, resolve_device
from softcache.runtime.progress import Progress
from softcache.runtime.specs import instantiate
from softcache.store import LogitStore
from softcache.trainer.plan import EpochPlan
from softcache.trainer.rows import (
    CHECKPOINT,
    METRICS,
    TrainResult,
    check_resume_settings,
    make_optimizer,
    make_schedule,
    module_from_spec,
    write_json,
)
from softcache.trainer.token_stream import TokenLabelStream, block_samples_for

# Settings a resumed run must share with its checkpoint.
_RESUME_KEYS = (
    "student", "dataset", "store", "mode", "teacher", "epochs", "batch_size", "lr", "optimizer",
    "weight_decay", "schedule", "temperature", "alpha", "seed", "block_rows", "window_blocks",
    "max_steps",
)  # fmt: skip


def train_lm(
    config: TrainConfig, *, progress: bool = True, client: Any | None = None
) -> TrainResult:
    """Train a causal-LM student as `config` says (``config.lm``); see the module docstring.

    Returns:
        A `TrainResult` whose metrics (also in ``output/metrics.json``) hold, per epoch,
        ``train_loss``, ``eval_perplexity``, ``eval_bits_per_token``, ``eval_accuracy``,
        ``teacher_agreement`` and ``eval_kl_to_teacher`` (None where not measurable).

    Raises:
        SoftcacheError: bad specs, a row store, or a store that does not match the dataset.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "train --lm runs in one process for now (no DDP); launch it without torchrun"
        )
    device = resolve_device(config.device)
    dataset = instantiate(config.dataset, "dataset")
    store = _open_store(config, dataset)
    if (config.mode == "hard" or config.alpha > 0) and not _has_labels(dataset):
        raise ConfigError(
            f"dataset {config.dataset} has no labels (item 0 gives input_ids only), so there is no "
            "hard-label loss; give (input_ids, labels) items, or use --alpha 0 with a store"
        )
    torch.manual_seed(config.seed)
    student = module_from_spec(config.student, "student").to(device)
    teacher = None
    if config.teacher:
        teacher = module_from_spec(config.teacher, "teacher").eval().to(device)
        teacher.requires_grad_(False)
    try:
        plan = EpochPlan(
            num_samples=len(dataset),
            block_rows=block_samples_for(store, config.batch_size) if store else config.block_rows,
            batch_size=config.batch_size,
            seed=config.seed,
            window_blocks=config.window_blocks,
        )
    except ValueError as exc:  # e.g. a batch wider than a shuffle window: a setting to change
        raise ConfigError(f"{exc} (--batch-size, --window-blocks)") from exc
    steps_per_epoch = len(plan)
    steps_total = steps_per_epoch * config.epochs
    if config.max_steps:
        steps_total = min(steps_total, config.max_steps)
    optimizer = make_optimizer(config, student)
    schedule = make_schedule(config, optimizer, steps_total)
    # fp16 autocast needs loss scaling, or small gradients underflow to zero (a no-op elsewhere).
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    metrics = _new_metrics(config, store if config.mode == "offline" else None)
    first_epoch, step, resume_plan, partial = 0, 0, None, None
    if config.resume:
        state = _load_checkpoint(output, config)
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        metrics, first_epoch, step = state["metrics"], state["epoch"], state["step"]
        if state.get("plan") and state["plan"]["cursor"] > 0:  # a checkpoint inside an epoch
            resume_plan, partial = state["plan"], state["partial"]
    evaluator = _Evaluator(config, teacher, device)
    if client is None and config.dask_scheduler:
        client = connect(config.dask_scheduler)
    stream = (
        TokenLabelStream(
            store, plan.block_rows, prefetch_blocks=config.prefetch_blocks, client=client
        )
        if store and config.mode == "offline"
        else None
    )
    codec = store.meta.codec if stream is not None and store is not None else None
    bar = Progress(steps_total, "train", enabled=progress, initial=step, unit="steps")
    try:
        for epoch in range(first_epoch, config.epochs):
            if step >= steps_total:
                break
            so_far = {"loss_sum": 0.0, "tokens": 0, "wait": 0.0, "seconds": 0.0}
            if resume_plan is not None and resume_plan["epoch"] == epoch:
                plan.load_state_dict(resume_plan)  # continue at the checkpoint's batch
                so_far = dict(partial or so_far)
            else:
                plan.set_epoch(epoch)
            if stream is not None:
                stream.start_epoch(plan)
            student.train()
            t0, loss_sum, tokens_seen = (
                time.perf_counter(),
                so_far["loss_sum"],
                int(so_far["tokens"]),
            )
            wait = so_far["wait"]
            for samples in plan:
                if step >= steps_total:
                    break
                t_wait = time.perf_counter()
                batch = collate_sequences([dataset[int(i)] for i in samples]).to(device)
                labels = stream.labels(samples.tolist()) if stream is not None else None
                wait += time.perf_counter() - t_wait
                with autocast(device, config.amp):
                    logits = causal_logits(student, batch.input_ids, batch.attention_mask)
                rows = logits[batch.attention_mask].float()
                targets = batch.labels[batch.attention_mask]
                loss = _loss(config, rows, targets, labels, codec, teacher, batch, device)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                step += 1
                loss_sum += float(loss.detach()) * rows.shape[0]
                tokens_seen += rows.shape[0]
                bar.update(1)
                every = config.checkpoint_steps
                if every and step % every == 0 and plan.cursor < len(plan) and step < steps_total:
                    metrics["steps"] = step
                    _save_checkpoint(
                        output, student, optimizer, schedule, scaler, metrics, epoch, step,
                        plan_state=plan.state_dict(),
                        partial={
                            "loss_sum": loss_sum, "tokens": tokens_seen, "wait": wait,
                            "seconds": so_far["seconds"] + time.perf_counter() - t0,
                        },
                    )  # fmt: skip
            seconds = so_far["seconds"] + time.perf_counter() - t0
            results = evaluator(student)
            _record_epoch(
                metrics, loss_sum / max(tokens_seen, 1), results, seconds, wait, tokens_seen
            )
            metrics["steps"] = step
            _save_checkpoint(output, student, optimizer, schedule, scaler, metrics, epoch + 1, step)
            write_json(output / METRICS, metrics)
    finally:
        bar.close()
        if stream is not None:
            stream.close()
    return TrainResult(metrics=metrics, output=output, student=student)


def _loss(
    config: TrainConfig,
    rows: Tensor,
    targets: Tensor,
    labels: dict[str, Tensor] | None,
    codec: Any,
    teacher: nn.Module | None,
    batch: Any,
    device: torch.device,
) -> Tensor:
    """The batch's loss, a mean over its real tokens (see the module docstring)."""
    if rows.shape[0] == 0:  # every sample of the batch is empty: no token, nothing to learn
        return rows.sum() * 0.0
    ce = _cross_entropy(rows, targets)
    if config.mode == "hard":
        return ce
    if config.mode == "online":
        assert teacher is not None
        with torch.no_grad(), autocast(device, config.amp):
            t_logits = causal_logits(teacher, batch.input_ids, batch.attention_mask)
        kd = dense_kl(rows, t_logits[batch.attention_mask].float(), config.temperature)
    else:
        assert labels is not None and codec is not None
        tau = codec.temperature
        lab = {k: v.to(device, non_blocking=True) for k, v in labels.items()}
        if codec.encoding == "topk":
            kd = token_losses.topk_residual_kl(
                rows, lab["values"], lab["indices"], lab["residual"], temperature=tau
            )
        else:
            kd = token_losses.sampled_kl(
                rows, lab["ids"], lab["counts"], lab["entropy"], temperature=tau
            )
    if config.alpha == 0:
        return kd
    return config.alpha * ce + (1 - config.alpha) * kd


def _cross_entropy(rows: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token CE over the rows with a target (0 when none has one)."""
    if not bool((targets != IGNORE_INDEX).any()):
        return rows.sum() * 0.0
    return F.cross_entropy(rows, targets, ignore_index=IGNORE_INDEX)


class _Evaluator:
    """Held-out perplexity, accuracy, teacher agreement and KL to the teacher."""

    def __init__(
        self, config: TrainConfig, teacher: nn.Module | None, device: torch.device
    ) -> None:
        self.device, self.amp, self.teacher = device, config.amp, teacher
        self.batch_size = config.batch_size
        self.dataset = (
            instantiate(config.eval_dataset, "eval dataset") if config.eval_dataset else None
        )
        self.top1: Tensor | None = None
        if config.eval_store and self.dataset is not None:
            eval_store = LogitStore.open(config.eval_store, storage_options=config.storage_options)
            _check_matches(eval_store, self.dataset, config.eval_store, config.eval_dataset)
            self.top1 = torch.from_numpy(eval_store.top1())

    def __call__(self, student: nn.Module) -> dict[str, float | None]:
        empty: dict[str, float | None] = dict.fromkeys(_EVAL_KEYS)
        if self.dataset is None:
            return empty
        student.eval()
        nll, correct, counted, agree, kl, rows_seen = 0.0, 0, 0, 0, 0.0, 0
        with torch.inference_mode(), autocast(self.device, self.amp):
            for b in range(0, len(self.dataset), self.batch_size):
                items = [
                    self.dataset[i] for i in range(b, min(b + self.batch_size, len(self.dataset)))
                ]
                batch = collate_sequences(items).to(self.device)
                mask = batch.attention_mask
                rows = causal_logits(student, batch.input_ids, mask)[mask].float()
                targets = batch.labels[mask]
                has = targets != IGNORE_INDEX
                nll += float(F.cross_entropy(rows[has], targets[has], reduction="sum"))
                correct += int((rows[has].argmax(1) == targets[has]).sum())
                counted += int(has.sum())
                pred = rows.argmax(1).cpu()
                t_rows = None
                if self.teacher is not None:
                    t_rows = causal_logits(self.teacher, batch.input_ids, mask)[mask].float()
                    kl += float(dense_kl(rows, t_rows, 1.0)) * len(pred)
                if self.top1 is not None:
                    agree += int((pred == self.top1[rows_seen : rows_seen + len(pred)]).sum())
                elif t_rows is not None:
                    agree += int((pred == t_rows.argmax(1).cpu()).sum())
                rows_seen += len(pred)
        student.train()
        mean_nll = nll / counted if counted else math.nan
        has_teacher = self.top1 is not None or self.teacher is not None
        return {
            "eval_perplexity": math.exp(mean_nll) if counted else None,
            "eval_bits_per_token": mean_nll / math.log(2) if counted else None,
            "eval_accuracy": correct / counted if counted else None,
            "teacher_agreement": agree / rows_seen if has_teacher and rows_seen else None,
            "eval_kl_to_teacher": kl / rows_seen
            if self.teacher is not None and rows_seen
            else None,
        }


_EVAL_KEYS = (
    "eval_perplexity",
    "eval_bits_per_token",
    "eval_accuracy",
    "teacher_agreement",
    "eval_kl_to_teacher",
)


def _open_store(config: TrainConfig, dataset: Any) -> LogitStore | None:
    """The store (offline: the soft labels; other modes: the block layout, so every mode sees the
    same data order), checked against the dataset."""
    if config.store is None:
        return None
    store = LogitStore.open(config.store, storage_options=config.storage_options)
    if not store.meta.tokens:
        raise ConfigError(
            f"store {config.store} has one row per sample; --lm trains from a per-token store "
            "(softcache build --lm)"
        )
    _check_matches(store, dataset, config.store, config.dataset, check=config.hash_check != "off")
    return store


def _has_labels(dataset: Any) -> bool:
    return len(dataset) == 0 or item_tokens(dataset[0], 0)[1] is not None


def _check_matches(
    store: LogitStore, dataset: Any, where: str | None, spec: str | None, *, check: bool = True
) -> None:
    """Refuse a store built from other sequences (sample count, and lengths and hashes)."""
    if len(dataset) != store.meta.num_samples:
        raise DatasetMismatchError(
            f"dataset {spec} has {len(dataset)} samples but store {where} was built from "
            f"{store.meta.num_samples}; use the dataset the store was built from"
        )
    if not check:
        return
    bad = store.changed_samples(*scan(dataset))
    if len(bad):
        raise DatasetMismatchError(
            f"{len(bad)} sample(s) of dataset {spec} differ from those store {where} was built "
            f"from (first: sample {bad[0]}); use the dataset the store was built from, or "
            "rebuild the store"
        )


def _new_metrics(config: TrainConfig, store: LogitStore | None) -> dict[str, Any]:
    return {
        "mode": config.mode,
        "lm": True,
        "store_encoding": store.meta.codec.to_dict() if store else None,
        "store_bytes_per_token": store.nbytes_stored() / store.meta.num_tokens if store else None,
        "epoch": [],
        "train_loss": [],
        **{key: [] for key in _EVAL_KEYS},
        "epoch_seconds": [],
        "tokens_per_second": [],
        "data_wait_fraction": [],
        "steps": 0,
        "config": config.to_dict(),
    }


def _record_epoch(
    metrics: dict[str, Any],
    loss: float,
    results: dict[str, float | None],
    seconds: float,
    wait: float,
    tokens: int,
) -> None:
    metrics["epoch"].append(len(metrics["epoch"]) + 1)
    metrics["train_loss"].append(loss)
    for key in _EVAL_KEYS:
        metrics[key].append(results[key])
    metrics["epoch_seconds"].append(seconds)
    metrics["tokens_per_second"].append(tokens / seconds if seconds else None)
    metrics["data_wait_fraction"].append(wait / seconds if seconds else None)


def _save_checkpoint(
    output: Path,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    scaler: Any,
    metrics: dict[str, Any],
    epoch: int,
    step: int,
    *,
    plan_state: dict[str, Any] | None = None,
    partial: dict[str, Any] | None = None,
) -> None:
    """Write the checkpoint atomically. ``epoch`` is the epoch a resumed run starts in; inside
    an epoch, ``plan_state`` holds its cursor and ``partial`` the epoch's sums so far."""
    state = {
        "student": student.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "scaler": scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "metrics": metrics,
        "epoch": epoch,
        "step": step,
        "plan": plan_state,
        "partial": partial,
    }
    tmp = output / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, output / CHECKPOINT)


def _load_checkpoint(output: Path, config: TrainConfig) -> dict[str, Any]:
    path = output / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {path}; drop --resume to start a new run")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if "epoch" not in state or not state["metrics"].get("lm"):
        raise ConfigError(f"--resume: {path} is not a checkpoint of a --lm run")
    check_resume_settings(state["metrics"]["config"], config, _RESUME_KEYS, output)
    return state
