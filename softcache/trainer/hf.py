"""Distillation from a token store inside the Hugging Face `Trainer` (the ``hf`` extra).

LLM teams train with `transformers.Trainer` (and TRL's trainers built on it) under `torchrun` or
`accelerate`. Three pieces put a softcache token store there:

- `DistillDataset`: a map-style dataset over (the tokenised dataset the store was built from, the
  store). Item ``i`` is the sample's real ``input_ids`` and the teacher's decoded rows for its
  tokens, its length and hash checked against the store's. Rows come through `TokenTargets`'
  bounded cache of whole decoded shards, so access is by sample (any sampler, any world size,
  `accelerate`'s sharding) without one Zarr read per item. `DistillDataset.hf_dataset` gives the
  same items as a `datasets.Dataset`, for trainers that take only those (TRL's `SFTTrainer`).
- `DistillCollator`: right-pads the inputs (``input_ids``, ``attention_mask``, and ``labels`` =
  the inputs with ``-100`` on padding, which the model shifts itself, as for any causal LM) and
  concatenates the samples' targets in the order of ``logits[attention_mask]``.
- The student's tokenizer, given to `DistillDataset` (``tokenizer=``) or to `DistillTrainer`
  (``processing_class=``), is checked against the teacher's the store records: a mismatch is
  refused, a padded vocabulary allowed (`softcache.trainer.vocab`).
- `DistillTrainer` (or `DistillMixin` on another `Trainer` subclass, e.g. TRL's): its
  `compute_loss` is ``alpha * LM loss + (1 - alpha) * KD``, the KD term being softcache's own
  per-token loss (`softcache.trainer.tokens.token_kd_loss`: top-k with its tail bin, or the
  sampled estimator, at the store's temperature, on the memory-lean kernel), a mean over the
  batch's real tokens. ``remove_unused_columns`` is turned off (the targets are not model inputs).

Under DDP each rank's loss is its own batch's mean, and the Trainer averages gradients over ranks,
as it does for its LM loss. `transformers` is imported here at module level: import this module
only with the ``hf`` extra installed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import transformers
from torch import Tensor, nn
from torch.utils.data import Dataset

from softcache.data.sequences import IGNORE_INDEX, collate_sequences, item_tokens
from softcache.errors import ConfigError, DatasetMismatchError
from softcache.store import LogitStore
from softcache.store.token_codec import TokenCodec
from softcache.trainer.token_targets import TokenTargets, concat_targets
from softcache.trainer.tokens import token_kd_loss
from softcache.trainer.vocab import check_student_tokenizer, check_student_width

log = logging.getLogger("softcache")

TARGETS_KEY = "softcache_targets"  # the batch entry holding the concatenated targets


class DistillDataset(Dataset):
    """Inputs and the teacher's per-token targets, by sample (see the module docstring).

    Args:
        dataset: the map-style tokenised dataset the store was built from (a `datasets.Dataset`
            with an ``input_ids`` column, or any sequence dataset of `softcache.data.sequences`).
        store: the token store's path or URL, an open `LogitStore`, or a `TokenTargets`.
        cache_shards: decoded shards kept per process (`TokenTargets`).
        check_hashes: check each sample's tokens against the store's length and hash.
        storage_options: fsspec options for a store URL.
        tokenizer: the student's tokenizer: checked against the one the store records
            (`softcache.trainer.vocab`); a mismatch raises `TokenizerMismatchError`, a padded
            vocabulary is allowed and logged. `DistillTrainer` checks its ``processing_class``
            the same way.

    Items are dicts: ``input_ids`` (n,) int64 and ``softcache_targets``, the sample's decoded
    rows (`TokenTargets.rows`).
    """

    def __init__(
        self,
        dataset: Any,
        store: str | LogitStore | TokenTargets,
        *,
        cache_shards: int = 8,
        check_hashes: bool = True,
        storage_options: Mapping[str, Any] | None = None,
        tokenizer: Any = None,
    ) -> None:
        self.dataset = dataset
        self.targets = (
            store
            if isinstance(store, TokenTargets)
            else TokenTargets(store, cache_shards=cache_shards, storage_options=storage_options)
        )
        if len(dataset) != len(self.targets):
            raise DatasetMismatchError(
                f"the dataset has {len(dataset)} samples but store {self.targets.location} was "
                f"built from {len(self.targets)}; use the tokenised dataset the store was built "
                "from"
            )
        self.check_hashes = check_hashes
        self.tokenizer_checked = False
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Refuse a student tokenizer other than the one the store records (padded: allowed)."""
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        check_student_tokenizer(
            self.targets.meta, self.targets.location, tokenizer, f"the student's tokenizer ({name})"
        )
        self.tokenizer_checked = True

    @property
    def codec(self) -> TokenCodec:
        """The store's codec: which loss, at which temperature."""
        return self.targets.meta.codec

    def __len__(self) -> int:
        return len(self.targets)

    def hf_dataset(self) -> Any:
        """The same items as a `datasets.Dataset`, for trainers that take only those (TRL's
        `SFTTrainer` refuses other datasets).

        It holds one ``sample`` column; `with_transform` turns each accessed row into this
        dataset's item, so access stays by sample and the targets are read on demand (nothing
        is materialised). Give it with ``SFTConfig(dataset_kwargs={"skip_prepare_dataset":
        True})``: the items are tokenised already.
        """
        import datasets  # the hf extra's; imported here only

        table = datasets.Dataset.from_dict({"sample": list(range(len(self)))})
        return table.with_transform(self._transform)

    def _transform(self, batch: Mapping[str, list[int]]) -> dict[str, list[Any]]:
        items = [self[int(i)] for i in batch["sample"]]
        return {key: [item[key] for item in items] for key in ("input_ids", TARGETS_KEY)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids, _ = item_tokens(self.dataset[index], index)
        if self.check_hashes:
            self.targets.check(index, ids)
        return {"input_ids": ids, TARGETS_KEY: self.targets.rows(index)}


class DistillCollator:
    """Pads `DistillDataset` items into a causal-LM batch with the KD targets beside it.

    Args:
        pad_id: the id of padding in ``input_ids`` (masked out; any id works).

    Returns (from a call on a list of items): ``input_ids`` (B, L) int64, ``attention_mask``
    (B, L) int64, ``labels`` (B, L) int64 (the inputs, ``-100`` on padding) and
    ``softcache_targets``, the items' rows concatenated (``sum(n_i)`` rows).
    """

    def __init__(self, pad_id: int = 0) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = collate_sequences(
            [{"input_ids": item["input_ids"]} for item in items], pad_id=self.pad_id
        )
        return {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask.long(),
            "labels": batch.input_ids.masked_fill(~batch.attention_mask, IGNORE_INDEX),
            TARGETS_KEY: concat_targets([item[TARGETS_KEY] for item in items]),
        }


def kd_loss_of_batch(
    logits: Tensor, attention_mask: Tensor, targets: Mapping[str, Tensor], codec: TokenCodec
) -> Tensor:
    """The per-token KD loss of a collated batch: ``token_kd_loss(logits[mask], targets)``.

    Args:
        logits: (B, L, V) the student's logits, any float dtype.
        attention_mask: (B, L) int or bool, ones then zeros per row.
        targets: the batch's ``softcache_targets`` (one row per real token, in row-major order).
        codec: the store's codec.

    Returns:
        A float32 scalar, the mean over the real tokens (0, with a gradient, when there is none).
    """
    rows = logits[attention_mask.bool()]
    if rows.shape[0] == 0:
        return logits.sum() * 0.0
    fields = {k: v.to(logits.device) for k, v in targets.items()}
    return token_kd_loss(rows, fields, codec)


class DistillMixin:
    """`compute_loss` for a `transformers.Trainer` subclass: ``alpha * LM + (1 - alpha) * KD``.

    Put it first among the bases (``class MyTrainer(DistillMixin, SFTTrainer)``) and call
    `setup_distillation` in the constructor (`DistillTrainer` does both).
    """

    kd_codec: TokenCodec
    kd_alpha: float

    def setup_distillation(
        self, args: Any, codec: TokenCodec, alpha: float, *, model: Any = None
    ) -> None:
        """Record the loss settings and turn ``remove_unused_columns`` off (the targets are no
        input of the model's ``forward``, and the Trainer would drop them). Given the ``model``,
        refuse it now if its logits are narrower than the store's vocabulary."""
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
        if model is not None:
            check_student_width(model, codec)
        if args is not None and getattr(args, "remove_unused_columns", False):
            args.remove_unused_columns = False
        self.kd_codec, self.kd_alpha = codec, alpha

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The batch's loss (the Trainer's hook; ``num_items_in_batch`` is not used: both terms
        are means over this batch's tokens)."""
        inputs = dict(inputs)
        targets = inputs.pop(TARGETS_KEY)
        labels = inputs.pop("labels", None)
        if self.kd_alpha > 0 and labels is not None:
            inputs["labels"] = labels
        outputs = model(**inputs)
        kd = kd_loss_of_batch(outputs.logits, inputs["attention_mask"], targets, self.kd_codec)
        loss = kd
        if self.kd_alpha > 0:
            if getattr(outputs, "loss", None) is None:
                raise ConfigError(
                    "alpha > 0 mixes in the model's LM loss, but the model returned none; give "
                    "batches with labels (DistillCollator makes them) or use alpha = 0"
                )
            loss = self.kd_alpha * outputs.loss + (1 - self.kd_alpha) * kd
        return (loss, outputs) if return_outputs else loss


class DistillTrainer(DistillMixin, transformers.Trainer):
    """`transformers.Trainer` with softcache's per-token KD loss (see the module docstring).

    Args:
        *args, **kwargs: the `Trainer`'s (``model``, ``args``, ``train_dataset``, ...).
        alpha: weight of the model's own LM loss (0: KD only).
        codec: the store's codec; by default the ``train_dataset``'s (a `DistillDataset`).

    ``data_collator`` defaults to a `DistillCollator`. A ``processing_class`` (the student's
    tokenizer) is checked against the tokenizer the store records (`DistillDataset.
    check_tokenizer`) and, as in any `Trainer`, saved by ``save_model`` beside the weights, so
    the saved folder loads with ``AutoTokenizer.from_pretrained`` too.
    """

    def __init__(
        self, *args: Any, alpha: float = 0.0, codec: TokenCodec | None = None, **kwargs: Any
    ) -> None:
        dataset = kwargs.get("train_dataset")
        if codec is None:
            if not isinstance(dataset, DistillDataset):
                raise ConfigError(
                    "DistillTrainer needs the store's codec: give train_dataset=DistillDataset("
                    "tokenised, store) or codec=store.meta.codec"
                )
            codec = dataset.codec
        tokenizer = kwargs.get("processing_class")
        if (
            tokenizer is not None
            and isinstance(dataset, DistillDataset)
            and not dataset.tokenizer_checked
            and callable(getattr(tokenizer, "get_vocab", None))
        ):
            dataset.check_tokenizer(tokenizer)
        kwargs.setdefault("data_collator", DistillCollator())
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        model = kwargs.get("model", args[0] if args else None)
        self.setup_distillation(training_args, codec, alpha, model=model)
        super().__init__(*args, **kwargs)
