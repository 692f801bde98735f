"""The row layout of the trainer: a student over per-sample inputs, from a dense or top-k store.

A batch is `(inputs, labels, soft labels or None, dataset indices)`; the soft labels arrive as the
teacher's side of the loss, prepared with the batch (in the batch process, or on the batch thread),
but for a GPU student's large dense rows (see `HOST_TARGETS_ELEMENTS`). Offline runs read it through
`AlignedBatches` (inputs and the store's soft labels in the plan's order, hash-checked, views
replayed); hard and online runs through a DataLoader over the same plan, so every mode sees the same
data order. With `augment`, hard, online and view-less offline runs draw a new view of every sample
each epoch. The evaluation reports accuracy on the eval set and top-1 agreement with the teacher
(from `eval_store`, or from the teacher).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from softcache import losses
from softcache.config import TrainConfig
from softcache.data.fetch import batch_fetching
from softcache.data.hashing import collate_pairs, collate_with_hashes
from softcache.errors import ConfigError, DatasetMismatchError
from softcache.losses import targets as loss_targets
from softcache.losses import topk_kernel
from softcache.runtime.devices import autocast
from softcache.runtime.specs import dataset_from
from softcache.store import LogitStore
from softcache.trainer.ddp import Ranks
from softcache.trainer.distill import (
    AlignedBatches,
    check_sample_count,
    renormalised_topk_loss,
    store_teacher_targets,
    warn_unstored_temperature,
)
from softcache.trainer.plan import EpochPlan
from softcache.trainer.stream import PlanSampler, SoftLabels

RowBatch = tuple[torch.Tensor, torch.Tensor, Any, np.ndarray]

# A GPU student's teacher targets are made with the batch, on the host, unless they are dense rows
# of more elements than this per batch: then the stored dtype crosses (half the bytes of float32
# targets) and the targets are made on the device. Made on the device, they cost the training
# thread every step about 20 aten calls for top-k (7 dense) and their Python, where made on the
# host they cost 4 copies (2 dense). On the host (one core of this machine), dense targets take
# 0.25 ms at 64 x 512 (2**15 elements) and 170 ms at 256 x 32,768, which a GPU step would wait
# for; top-k targets 0.13 ms at 64 x 100 (k = 5) and 0.19 ms at 256 x 32,768 (k = 32), small at
# any head width (their sparse form is (B, k)).
HOST_TARGETS_ELEMENTS = 1 << 15


class RowLayout:
    """Rows: one store row per sample (or per view of a sample). See the module docstring."""

    unit = "samples"
    resume_keys: tuple[str, ...] = ("view_policy", "augment", "augment_seed")
    eval_keys: tuple[str, ...] = ("eval_accuracy", "teacher_agreement")
    tokenizer: Any = None  # row students have none

    def __init__(
        self,
        config: TrainConfig,
        ranks: Ranks,
        device: torch.device,
        client: Any | None,
        *,
        pin_memory: bool | None = None,
    ) -> None:
        self.config = config
        self.device = device
        self.cuda = device.type == "cuda"
        # Pinned batches copy to a GPU asynchronously (default: on CUDA).
        self.pin_memory = self.cuda if pin_memory is None else pin_memory
        self._pin_targets = self.pin_memory and torch.cuda.is_available()
        self.dataset = dataset_from(config.dataset, "dataset")
        self.num_samples = len(self.dataset)
        self.store = (
            LogitStore.open(
                config.store,
                storage_options=config.storage_options,
                expect_digest=config.expect_digest,
            )
            if config.store
            else None
        )
        store = self.store
        if store is not None and store.meta.tokens:
            raise ConfigError(
                f"store {config.store} holds per-token soft labels of a language model; pass "
                "--lm to train a causal-LM student from it"
            )
        if store is not None:
            check_sample_count(self.dataset, store)
        self.block_rows = store.meta.shard_samples if store else config.block_rows
        self.aligned: AlignedBatches | None = None
        if config.mode == "offline":
            assert store is not None
            device_targets = self._device_targets(store)
            self.aligned = AlignedBatches(
                self.dataset,
                store,
                num_workers=config.num_workers,
                pin_memory=self.pin_memory,
                prefetch_blocks=config.prefetch_blocks,
                client=client,
                view_policy=config.view_policy,
                # A GPU widens fp16 -> fp32 for free after a copy of half the bytes; a CPU
                # student leaves it to the reader thread.
                values="stored" if self.cuda else "float32",
                # The training loop runs this layout's batches on a thread of their own
                # (`Ahead`): gathering there too spares a thread and a handoff per batch.
                assemble_ahead=0,
                # The teacher's side of the loss, made with the batches (a top-k store's once
                # per read group); not for a GPU student's large dense rows (`_prepared`).
                temperature=None if device_targets else config.temperature,
            )
            if device_targets:  # else AlignedBatches warned, given the temperature
                warn_unstored_temperature(store.meta, config.temperature)
        self.fresh = _fresh_augmentation(config, store)
        self._warming: threading.Thread | None = None

    def batches(
        self, plan: EpochPlan, steps: int, *, hash_stride: int, then: EpochPlan | None
    ) -> Iterator[RowBatch]:
        for inputs, labels, soft, indices in self._batches(plan, steps, hash_stride, then):
            if self.fresh is not None:  # a new random view of every sample, every epoch
                inputs = self.fresh.views(inputs, indices, plan.epoch)
            yield inputs, labels, self._prepared(soft), indices

    def _prepared(self, soft: SoftLabels | None) -> SoftLabels | losses.TeacherTargets | None:
        """The teacher's side of the loss, made here with the batch (`losses.kd_loss_targets`):
        the step then runs only the student's side, and a GPU student's copies it. A GPU
        student's dense rows of more than `HOST_TARGETS_ELEMENTS` a batch stay in the stored
        dtype, widened and prepared on the device after a copy of half the bytes.
        """
        if soft is None:
            return None
        if soft.targets is not None:  # made by `AlignedBatches` (top-k: with its read group)
            targets: SoftLabels | losses.TeacherTargets = soft.targets
        elif self.cuda and soft.logits is not None and soft.logits.numel() > HOST_TARGETS_ELEMENTS:
            return soft
        else:
            targets = self._targets(soft)
        # The batch thread's (the batch process pins its slots in the parent instead); a
        # pinning stream's group targets come pinned.
        if (
            self._pin_targets
            and isinstance(targets, losses.TeacherTargets)
            and not targets.weights.is_pinned()
        ):
            targets = targets.pin_memory()
        return targets

    def _device_targets(self, store: LogitStore) -> bool:
        """Whether a GPU student's batches of this store are dense rows of more than
        `HOST_TARGETS_ELEMENTS`, whose targets are made on the device."""
        meta = store.meta
        large = self.config.batch_size * meta.num_classes > HOST_TARGETS_ELEMENTS
        return self.cuda and meta.encoding == "dense" and large

    def _targets(self, soft: SoftLabels) -> SoftLabels | losses.TeacherTargets:
        """The batch's teacher targets, or its soft labels for the renormalised top-k fallback
        (a temperature without a normaliser, warned about once per run in `__init__`)."""
        assert self.store is not None
        prepared = store_teacher_targets(soft, self.store.meta, self.config.temperature)
        return soft if prepared is None else prepared

    def _batches(
        self, plan: EpochPlan, steps: int, hash_stride: int, then: EpochPlan | None
    ) -> Iterator[RowBatch]:
        if self.aligned is not None:
            assert self.aligned.steps(plan) == steps
            for inputs, labels, soft in self.aligned.epoch(
                plan, hash_stride=hash_stride, then=then
            ):
                yield inputs, labels, soft, soft.indices
            return
        loader = DataLoader(
            batch_fetching(self.dataset),
            batch_sampler=PlanSampler(plan, steps),  # type: ignore[arg-type]  # int64 arrays index like lists
            collate_fn=collate_pairs,
            num_workers=self.config.num_workers,
            pin_memory=self.pin_memory,
        )
        # A second, independent copy of the plan names each batch's rows (a sampler's own cursor
        # is shared by its iterators).
        for indices, (inputs, labels, _) in zip(PlanSampler(plan, steps), loader, strict=True):
            yield inputs, labels, None, indices

    def loss(
        self, model: nn.Module, batch: RowBatch, teacher: nn.Module | None
    ) -> tuple[torch.Tensor, int]:
        config, device = self.config, self.device
        inputs, labels, soft, _ = batch
        inputs = inputs.to(device, non_blocking=self.cuda)
        labels = labels.to(device, non_blocking=self.cuda)
        logits = model(inputs)
        if config.mode == "hard":
            return losses.hard_loss(logits, labels), len(labels)
        if config.mode == "online":
            assert teacher is not None
            with torch.inference_mode():
                teacher_logits = teacher(inputs)
            loss = losses.kd_loss_dense(
                logits,
                teacher_logits.clone(),
                labels,
                temperature=config.temperature,
                alpha=config.alpha,
            )
            return loss, len(labels)
        if not isinstance(soft, losses.TeacherTargets):  # large dense rows, or the fallback
            soft = self._targets(soft.to(device, non_blocking=self.cuda))
        elif self.cuda:  # made on the host, with the batch
            soft = soft.to(device, non_blocking=True)
        if isinstance(soft, losses.TeacherTargets):
            return losses.kd_loss_targets(logits, soft, labels, alpha=config.alpha), len(labels)
        loss = renormalised_topk_loss(
            logits, soft, labels, temperature=config.temperature, alpha=config.alpha
        )
        return loss, len(labels)

    def check_student(self, student: nn.Module) -> None:
        """Nothing to check before training: a row student's width shows at its first batch."""

    def evaluator(self, teacher: nn.Module | None) -> Callable[[nn.Module], dict[str, Any]]:
        return _Evaluator(self.config, teacher, self.device)

    def metrics(self) -> dict[str, Any]:
        store = self.store
        return {
            "store_bytes_per_sample": (
                store.nbytes_stored() / store.meta.num_samples if store is not None else None
            ),
        }

    def warm_up(self) -> None:
        """Load the compiled top-k kernel on a thread (`losses.topk_kernel.warm_up`) where this
        run's steps call it: offline, a top-k store, a CPU student, batches in the dense form
        (`losses.for_batch`). A temperature the store keeps no normaliser for takes the
        renormalised loss instead, without the kernel: there the thread costs its CPU for
        nothing (about half a second), which is not worth a second copy of that rule here."""
        store, config = self.store, self.config
        if (
            config.mode == "offline"
            and store is not None
            and store.meta.encoding == "topk"
            and self.device.type == "cpu"
            and loss_targets.dense_form(config.batch_size, store.meta.num_classes)
        ):
            self._warming = topk_kernel.warm_up()

    def close(self) -> None:
        """Wait for `warm_up`'s thread (numba must not be left mid-load at exit); the stream's
        reader threads stop with their epoch."""
        if self._warming is not None:
            self._warming.join()
            self._warming = None


def _fresh_augmentation(config: TrainConfig, store: LogitStore | None) -> Any:
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
        dataset = dataset_from(config.eval_dataset, "eval dataset")
        self.loader = DataLoader(
            batch_fetching(dataset), batch_size=512, collate_fn=collate_with_hashes
        )
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

    def __call__(self, student: nn.Module) -> dict[str, Any]:
        if self.loader is None:
            return {"eval_accuracy": None, "teacher_agreement": None}
        student.eval()
        correct = labelled = 0
        predictions = []
        with torch.inference_mode(), autocast(self.device, self.amp):
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
        return {"eval_accuracy": accuracy, "teacher_agreement": agreement}
