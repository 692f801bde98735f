"""The token layout of the trainer: a causal-LM student per token, from a per-token store.

Modes (``TrainConfig.mode``), each over the same epoch plan of samples:

- ``offline``: KD from the store. ``topk`` stores: `softcache.losses.tokens.topk_residual_kl` (the
  kept tokens plus one residual bin); ``sampled`` stores: `softcache.losses.tokens.sampled_kl` (an
  unbiased estimate of the full KL). The temperature is the store's: its log-probabilities and
  draws were taken at it.
- ``online``: the teacher runs on every batch; the loss is the full per-token KL at
  ``config.temperature`` (Hinton et al., 2015), the reference an offline cache approximates.
- ``hard``: next-token cross-entropy only.

With ``alpha > 0`` the loss is ``alpha * CE + (1 - alpha) * KD``. Every loss is a mean over the
batch's real tokens (`softcache.data.sequences`: padding never counts). A batch is
`(SequenceBatch, TokenLabels or None)`: inputs through a DataLoader over the plan, soft labels
through the one `SoftLabelStream`, in blocks of consecutive samples (`block_samples_for`). The
alignment check hashes every sample's tokens once, before training (`hash_check` off skips it).
After each epoch, a held-out dataset gives the student's perplexity and next-token accuracy, its
agreement with the teacher's top-1 (from ``eval_store``, or from the teacher when one is given)
and, with a teacher, its KL to the teacher's full distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from softcache.config import TrainConfig
from softcache.data.sequences import (
    IGNORE_INDEX,
    SequenceBatch,
    causal_logits,
    collate_sequences,
    item_tokens,
    scan,
)
from softcache.errors import ConfigError, DatasetMismatchError
from softcache.losses import tokens as token_losses
from softcache.losses.tokens import dense_kl
from softcache.runtime.devices import autocast
from softcache.runtime.specs import dataset_from
from softcache.store import LogitStore
from softcache.store.token_codec import TokenCodec
from softcache.trainer.ddp import Ranks
from softcache.trainer.plan import EpochPlan
from softcache.trainer.stream import PlanSampler, SoftLabelStream
from softcache.trainer.token_labels import TokenLabels, block_samples_for
from softcache.trainer.vocab import (
    check_logit_width,
    check_student_tokenizer,
    check_student_width,
    load_student_tokenizer,
)

TokenBatch = tuple[SequenceBatch, TokenLabels | None]

EVAL_KEYS = (
    "eval_perplexity",
    "eval_bits_per_token",
    "eval_accuracy",
    "teacher_agreement",
    "eval_kl_to_teacher",
)


class TokenLayout:
    """Tokens: one store row per real token of each sample. See the module docstring."""

    unit = "tokens"
    resume_keys: tuple[str, ...] = ()
    eval_keys: tuple[str, ...] = EVAL_KEYS

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
        self.dataset = dataset_from(config.dataset, "dataset")
        if not hasattr(self.dataset, "__getitem__") or not hasattr(self.dataset, "__len__"):
            raise ConfigError(
                f"dataset {config.dataset!r} must be map-style (__len__, __getitem__)"
            )
        self.num_samples = len(self.dataset)
        self.store = _open_store(config, self.dataset)
        # The student's tokenizer: checked against the store's, saved with an HF student.
        found = load_student_tokenizer(config.tokenizer, config.student)
        self.tokenizer = None if found is None else found[0]
        if self.store is not None:
            whose = "the student's tokenizer" + ("" if found is None else f" ({found[1]})")
            check_student_tokenizer(self.store.meta, self.store.location, self.tokenizer, whose)
        if (config.mode == "hard" or config.alpha > 0) and not _has_labels(self.dataset):
            raise ConfigError(
                f"dataset {config.dataset} has no labels (item 0 gives input_ids only), so there "
                "is no hard-label loss; give (input_ids, labels) items, or use --alpha 0 with a "
                "store"
            )
        store = self.store
        self.block_rows = (
            block_samples_for(store, config.batch_size, ranks.world_size)
            if store
            else config.block_rows
        )
        self.stream: SoftLabelStream | None = None
        self.codec: TokenCodec | None = None
        if store is not None and config.mode == "offline":
            # assemble_ahead=0: the training loop runs these batches on a thread of their own.
            self.stream = SoftLabelStream(
                store, prefetch_blocks=config.prefetch_blocks, client=client, assemble_ahead=0
            )
            self.codec = store.meta.codec

    def batches(
        self, plan: EpochPlan, steps: int, *, hash_stride: int, then: EpochPlan | None
    ) -> Iterator[TokenBatch]:
        loader = DataLoader(
            self.dataset,
            batch_sampler=PlanSampler(plan, steps),  # type: ignore[arg-type]  # int64 arrays index like lists
            collate_fn=collate_sequences,
            num_workers=self.config.num_workers,
            pin_memory=self.pin_memory,
        )
        if self.stream is None:
            for batch in loader:
                yield batch, None
            return
        assert self.stream.stop(plan) == steps
        for batch, labels in zip(loader, self.stream.batches(plan, then=then), strict=True):
            assert isinstance(labels, TokenLabels)
            yield batch, labels

    def loss(
        self, model: nn.Module, batch: TokenBatch, teacher: nn.Module | None
    ) -> tuple[Tensor, int]:
        """The batch's loss, a mean over its real tokens (see the module docstring)."""
        config, device = self.config, self.device
        inputs, labels = batch
        inputs = inputs.to(device)
        logits = causal_logits(model, inputs.input_ids, inputs.attention_mask)
        rows = logits[inputs.attention_mask].float()
        count = rows.shape[0]
        if count == 0:  # every sample of the batch is empty: no token, nothing to learn
            return rows.sum() * 0.0, 0
        if config.mode == "hard":
            return _cross_entropy(rows, inputs.labels[inputs.attention_mask]), count
        if config.mode == "online":
            assert teacher is not None
            with torch.no_grad():
                t_logits = causal_logits(teacher, inputs.input_ids, inputs.attention_mask)
            kd = dense_kl(rows, t_logits[inputs.attention_mask].float(), config.temperature)
        else:
            assert labels is not None and self.codec is not None
            kd = token_kd_loss(rows, labels.to(device, non_blocking=self.cuda).fields, self.codec)
        if config.alpha == 0:
            return kd, count
        ce = _cross_entropy(rows, inputs.labels[inputs.attention_mask])
        return config.alpha * ce + (1 - config.alpha) * kd, count

    def check_student(self, student: nn.Module) -> None:
        """Refuse a student whose logits are narrower than the store's vocabulary."""
        if self.codec is not None:
            check_student_width(student, self.codec)

    def evaluator(self, teacher: nn.Module | None) -> Callable[[nn.Module], dict[str, Any]]:
        return _Evaluator(self.config, teacher, self.device)

    def metrics(self) -> dict[str, Any]:
        store = self.store if self.config.mode == "offline" else None
        return {
            "lm": True,
            "store_encoding": store.meta.codec.to_dict() if store else None,
            "store_bytes_per_token": (
                store.nbytes_stored() / store.meta.num_tokens if store else None
            ),
        }

    def warm_up(self) -> None:
        """Nothing to warm: the token losses are torch ops."""

    def close(self) -> None:
        """Nothing to release: the stream's reader threads stop with their epoch."""


def token_kd_loss(
    student_rows: Tensor, fields: dict[str, Tensor], codec: TokenCodec, reduction: str = "mean"
) -> Tensor:
    """The KD loss of a token store's rows at the store's temperature.

    Args:
        student_rows: (T, W) student logits of the real tokens, ``W >= V`` (the store's
            vocabulary; a wider, padded student vocabulary is fine: its extra ids get the
            teacher's zero probability).
        fields: `TokenCodec.decode`'s tensors for the same T tokens; with ``probs`` and
            ``neg_entropy`` (`softcache.trainer.token_labels.decode_with_bins`), the top-k loss
            takes the teacher's bins from them instead of computing them here.
        codec: the store's codec (`store.meta.codec`): top-k with its residual bin, or sampled.
        reduction: `mean` over tokens, or `none` for (T,) per-token losses.
    """
    check_logit_width(student_rows.shape[1], codec)
    tau = codec.temperature
    if codec.encoding == "topk" and "probs" in fields:  # the teacher's side made by the loader
        return token_losses.topk_residual_kl_of_bins(
            student_rows,
            fields["indices"],
            fields["probs"],
            fields["neg_entropy"],
            temperature=tau,
            reduction=reduction,
        )
    if codec.encoding == "topk":
        return token_losses.topk_residual_kl(
            student_rows,
            fields["values"],
            fields["indices"],
            fields["residual"],
            temperature=tau,
            reduction=reduction,
        )
    return token_losses.sampled_kl(
        student_rows,
        fields["ids"],
        fields["counts"],
        fields["entropy"],
        temperature=tau,
        reduction=reduction,
    )


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
            dataset_from(config.eval_dataset, "eval dataset") if config.eval_dataset else None
        )
        self.top1: Tensor | None = None
        if config.eval_store and self.dataset is not None:
            eval_store = LogitStore.open(config.eval_store, storage_options=config.storage_options)
            _check_matches(eval_store, self.dataset, config.eval_store, config.eval_dataset)
            self.top1 = torch.from_numpy(eval_store.top1())

    def __call__(self, student: nn.Module) -> dict[str, Any]:
        if self.dataset is None:
            return dict.fromkeys(EVAL_KEYS)
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


def _open_store(config: TrainConfig, dataset: Any) -> LogitStore | None:
    """The store (offline: the soft labels; other modes: the block layout, so every mode sees the
    same data order), checked against the dataset."""
    if config.store is None:
        return None
    store = LogitStore.open(
        config.store, storage_options=config.storage_options, expect_digest=config.expect_digest
    )
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
    store: LogitStore, dataset: Any, where: str | None, spec: Any, *, check: bool = True
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
