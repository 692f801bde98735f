"""The Python API for a training loop of your own: aligned batches and the matching KD loss.

    store = softcache.open_store("teacher.zarr")
    plan = softcache.EpochPlan(num_samples=len(dataset), block_rows=store.meta.shard_samples,
                               batch_size=64, seed=0)
    aligned = softcache.AlignedBatches(dataset, store)
    for epoch in range(epochs):
        plan.set_epoch(epoch)
        for inputs, labels, soft in aligned.epoch(plan):
            loss = softcache.distillation_loss(student(inputs), soft, labels,
                                               temperatures=store.meta.temperatures,
                                               temperature=2.0, alpha=0.1)

`block_rows` is the store's samples per shard (`shard_samples`: `shard_rows` over the views per
sample). A framework that iterates its loader once per epoch (Lightning, Accelerate, a `for` over
epochs) takes `aligned.loader(plan)`: a re-iterable whose every `iter()` runs the next epoch.

`AlignedBatches` zips a DataLoader over the inputs with the store's soft-label stream; both follow the
same plan, and the batches' input hashes are checked against the store's, so a reordered or altered
dataset stops training at its first wrong sample (every row by default; `hash_stride` trades
coverage for speed, see `TrainConfig.hash_check`).

By default that work runs in the process that iterates `epoch`: the inputs' collation and hashing
on its thread, the soft labels' reads and assembly on threads of the stream's, all under the
training thread's GIL. `AlignedBatches(dataset, store, batch_process=True)` makes the same batches,
bit for bit, in a child process (`softcache.trainer.batch_process`, as `softcache train` does), and
hands each over in shared memory, where a batch stays for as long as anything holds it (a wrapper
that fetches one batch ahead, as accelerate's do, or a list of them: each held batch keeps its own
memory, and the child makes new). With
`temperature=T` the teacher's side of the loss is made there too (`SoftLabels.targets`, which
`distillation_loss` at T takes). Measured on a fast CPU student (`python -m benchmarks.run --only
own-loop`, 2 cores; two runs), the loop's offline epoch over a hard-label loop's went from
1.48-1.71x (dense and top-5) to 1.26-1.34x with `batch_process`, and to 0.91x dense / 1.11x
top-5 with `temperature` as well.

Under DDP (e.g. `torchrun --nproc_per_node 4 train.py`), give the plan the process's rank and world
size; each rank then loads the inputs and reads the soft-label blocks of its own rows only, and every
rank takes the same number of steps (`aligned.steps(plan)`; see `softcache.trainer.stream.equal_steps`), so
DDP's gradient all-reduce never waits for a rank that has run out of batches:

    dist.init_process_group("nccl")  # "gloo" on CPU; torchrun sets RANK, WORLD_SIZE, ...
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.manual_seed(0)  # the same initial student on every rank
    model = DistributedDataParallel(student.to(device), device_ids=[device.index])
    plan = softcache.EpochPlan(num_samples=len(dataset), block_rows=store.meta.shard_samples,
                               batch_size=64, seed=0, rank=dist.get_rank(),
                               world_size=dist.get_world_size())
    aligned = softcache.AlignedBatches(dataset, store)
    for epoch in range(epochs):
        plan.set_epoch(epoch)
        for inputs, labels, soft in aligned.epoch(plan):  # aligned.steps(plan) batches
            logits = model(inputs.to(device))
            loss = softcache.distillation_loss(logits, soft.to(device), labels.to(device), ...)

`batch_size` is per rank (the global batch is `world_size` times larger), and which rows a rank
drops to keep the step counts equal changes from epoch to epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import torch
from torch.utils.data import DataLoader

from softcache import losses
from softcache.data.fetch import batch_fetching
from softcache.data.hashing import collate_pairs, hash_rows, sampled_collate
from softcache.data.sequences import (
    IGNORE_INDEX,
    SequenceBatch,
    collate_sequences,
    item_tokens,
)
from softcache.data.views import augmentation_of, replay
from softcache.errors import ConfigError, DatasetMismatchError
from softcache.store import LogitStore, StoreMeta
from softcache.trainer.batch_process import BatchProcess, BatchProcessError
from softcache.trainer.plan import EpochPlan
from softcache.trainer.stream import PlanSampler, SoftLabels, SoftLabelStream
from softcache.trainer.token_labels import TokenLabels, block_samples_for
from softcache.trainer.tokens import token_kd_loss

if TYPE_CHECKING:
    from softcache.store.token_codec import TokenCodec

log = logging.getLogger("softcache")
_warned_temperatures: set[float] = set()


def distillation_loss(
    student_logits: torch.Tensor,
    soft: SoftLabels,
    targets: torch.Tensor | None,
    *,
    temperatures: Sequence[float],
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """The KD loss for a batch of cached soft labels, dense or top-k.

    Args:
        student_logits: (B, C) student logits.
        soft: the batch's soft labels (on the student's device).
        targets: (B,) int64 hard labels, -1 for none; or None.
        temperatures: the store's temperatures with normalisers (`store.meta.temperatures`).
        temperature: the distillation temperature T.
        alpha: weight of the hard-label term.

    Returns:
        A float32 scalar: `losses.kd_loss_dense`'s or `losses.kd_loss_topk`'s value (see
        `softcache.losses` for the formulas), computed through `teacher_targets` where it can:
        the batch's own (`soft.targets`, from `AlignedBatches(..., temperature=T)`) when they
        are at `temperature` over the student's classes, else made here.
    """
    prepared = soft.targets
    if (
        prepared is None
        or prepared.temperature != temperature
        or prepared.num_classes != student_logits.shape[-1]
    ):
        prepared = teacher_targets(
            soft,
            temperatures=temperatures,
            temperature=temperature,
            num_classes=student_logits.shape[-1],
        )
    if prepared is not None:
        return losses.kd_loss_targets(student_logits, prepared, targets, alpha=alpha)
    return renormalised_topk_loss(
        student_logits, soft, targets, temperature=temperature, alpha=alpha
    )


def teacher_targets(
    soft: SoftLabels,
    *,
    temperatures: Sequence[float],
    temperature: float,
    num_classes: int,
    warn: bool = True,
    rows: bool = False,
) -> losses.TeacherTargets | None:
    """The teacher's side of the batch's KD loss at `temperature` (`losses.kd_loss_targets`).

    Needs no student, so a loop can make it beside the step (the training loop does, on its
    batch thread, for CPU students).

    Args:
        soft: the batch's soft labels (float32 values, or the stored dtypes).
        temperatures: the store's temperatures with normalisers (`store.meta.temperatures`).
        temperature: the distillation temperature T.
        num_classes: C, the student's classes.
        warn: log the renormalising fallback (once per process and temperature); a caller that
            warned already (`warn_unstored_temperature`) passes False.
        rows: `soft` holds rows to be sliced into batches later (a read group), not a batch:
            top-k targets stay in their sparse form (`losses.topk_rows`; `losses.for_batch`
            gives each batch its form).

    Returns:
        The targets; None for a top-k store without a normaliser at `temperature`, whose loss
        renormalises over the kept classes (`losses.kd_loss_topk` with ``lse=None``).
    """
    if soft.logits is not None:
        return losses.dense_targets(soft.logits, temperature)
    assert soft.topk_values is not None and soft.topk_indices is not None and soft.lse is not None
    column = _lse_column(temperatures, temperature)
    if column is not None:
        lse = soft.lse[:, column]
        make = losses.topk_rows if rows else losses.topk_targets
        return make(soft.topk_values, soft.topk_indices, lse, num_classes, temperature)
    if warn and temperature not in _warned_temperatures:
        _warned_temperatures.add(temperature)
        _warn_renormalised(temperature, temperatures)
    return None


def store_teacher_targets(
    soft: SoftLabels, meta: StoreMeta, temperature: float, *, rows: bool = False
) -> losses.TeacherTargets | None:
    """`teacher_targets` over the store's classes, from its temperatures, not warning: for a
    batch maker that warned once already (`warn_unstored_temperature`). `rows`: as
    `teacher_targets` (a read group's rows, for `SoftLabelStream`'s `targets`)."""
    return teacher_targets(
        soft,
        temperatures=meta.temperatures,
        temperature=temperature,
        num_classes=meta.num_classes,
        warn=False,
        rows=rows,
    )


def warn_unstored_temperature(meta: StoreMeta, temperature: float) -> None:
    """Log that a top-k store's loss will renormalise, if it keeps no normaliser at
    `temperature` (the training loop's warning, once per run)."""
    if meta.encoding == "topk" and _lse_column(meta.temperatures, temperature) is None:
        _warn_renormalised(temperature, meta.temperatures)


def renormalised_topk_loss(
    student_logits: torch.Tensor,
    soft: SoftLabels,
    targets: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """The top-k loss of a store without a normaliser at `temperature`: renormalised over the
    kept classes (`losses.kd_loss_topk` with ``lse=None``), where `teacher_targets` gives None."""
    assert soft.topk_values is not None and soft.topk_indices is not None
    return losses.kd_loss_topk(
        student_logits,
        soft.topk_values,
        soft.topk_indices,
        None,
        targets,
        temperature=temperature,
        alpha=alpha,
    )


def _lse_column(temperatures: Sequence[float], temperature: float) -> int | None:
    """The store's normaliser column for `temperature`, or None when it keeps none for it."""
    for column, t in enumerate(temperatures):
        if abs(t - temperature) < 1e-9:
            return column
    return None


def _warn_renormalised(temperature: float, temperatures: Sequence[float]) -> None:
    log.warning(
        "the store has no normaliser for temperature %s (it has %s): the top-k loss "
        "renormalises over the kept classes, which drops the tail mass",
        temperature,
        list(temperatures),
    )


class _BatchProcessOwner:
    """What `AlignedBatches` and `AlignedTokenBatches` share with ``batch_process=True``."""

    _process: BatchProcess | None = None

    def close(self) -> None:
        """Stop the batch process, if there is one (idempotent); `epoch` then makes batches here."""
        if self._process is not None:
            self._process.close()
            self._process = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AlignedBatches(_BatchProcessOwner):
    """(inputs, labels, soft labels) batches in the order of an epoch plan, alignment-checked.

    Args:
        dataset: the map-style dataset the store was built from.
        store: an open, complete store.
        num_workers: DataLoader workers for the inputs (they open nothing from the store).
        pin_memory: pin input and soft-label batches (for CUDA: non-blocking copies).
        prefetch_blocks: store blocks read ahead.
        client: a `distributed.Client` for the stream, or None for threads.
        hash_stride: check the input hashes of every `hash_stride`-th row of each batch against
            the store's (1: every row; 0: no check). `epoch` can override it per epoch.
        equal_steps: end each epoch after `steps(plan)` batches, the same on every DDP rank
            (False: all of this rank's batches, which differ between ranks). No difference with
            one rank.
        view_policy: for a store with views, which view each sample gets in an epoch (`cycle`
            or `random`, see `softcache.data.augment.choose_views`). The inputs are replayed with
            the view's stored parameters, and their hashes checked against the view's.
        values: what the stream delivers, `float32` or `stored` (see `SoftLabelStream`):
            `stored` for a GPU student, whose `soft.to(device)` then widens on the device.
        assemble_ahead: runs of soft-label batches gathered ahead on a thread of the stream's own (see
            `SoftLabelStream`); 0 gathers them on the thread that iterates `epoch`, for a
            caller that runs it off the training thread already (`softcache.trainer.ahead.Ahead`).
        temperature: the distillation temperature T, if the teacher's side of the loss is to be
            made with the batches (`SoftLabels.targets`, float32; `distillation_loss` at T uses
            it): off the training thread with `batch_process`. A GPU student's step then
            copies the targets rather than making them (top-k: 4 copies against about 20 calls,
            dense: 2 against 7), as `softcache train` does; for dense rows of a large head
            (over `softcache.trainer.rows.HOST_TARGETS_ELEMENTS` a batch) the float32 targets
            are twice the stored bytes and slow to make on the host: leave it None there and
            make them on the device. A top-k store without a normaliser at T gets none (its
            loss renormalises, as `distillation_loss` logs).
        batch_process: make the batches in a child process (`softcache.trainer.batch_process`,
            as `softcache train` does): input collation, the hash check, the store's reads and
            the soft labels' assembly all leave this process and its GIL, and each batch
            arrives in shared memory (page-locked with `pin_memory` on a CUDA machine). A
            batch's tensors are then views of that memory, which the child reuses only once
            nothing holds them (holding many batches costs their memory, not a stall). The
            dataset and the store cross pickled (a dataset's torch tensors move to shared
            memory), so neither may be defined in the script being run (`__main__`). Call
            `close()` (or use a `with` block) to stop the child; it also stops when this object
            is collected. Not with `client`.

    The plan runs over samples: `block_rows = store.meta.shard_samples`.

    Raises:
        ConfigError: a token store; `batch_process` with a `client`, or a dataset or store the
            child cannot receive (unpicklable, or defined in `__main__`).
        DatasetMismatchError: the dataset's length is not the store's.
    """

    def __init__(
        self,
        dataset: Any,
        store: LogitStore,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_blocks: int = 4,
        client: Any | None = None,
        hash_stride: int = 1,
        equal_steps: bool = True,
        view_policy: str = "cycle",
        values: str = "float32",
        assemble_ahead: int = 2,
        temperature: float | None = None,
        batch_process: bool = False,
    ) -> None:
        if store.meta.tokens:
            raise ConfigError(
                f"store {store.location} holds per-token soft labels of a language model; "
                "AlignedBatches pairs row stores with their datasets; for a token store use "
                "softcache.AlignedTokenBatches(dataset, store) (inputs and decoded per-token "
                "targets) and softcache.token_distillation_loss"
            )
        check_sample_count(dataset, store)
        if temperature is not None and not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        self.dataset = dataset
        self.store = store
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.stream = SoftLabelStream(
            store,
            prefetch_blocks=prefetch_blocks,
            client=client,
            equal_steps=equal_steps,
            view_policy=view_policy,
            values=values,
            assemble_ahead=assemble_ahead,
            pin_memory=pin_memory,
            # A top-k store's: made once per read group and sliced into the batches
            # (`row_labels.RowBlocks`); a dense store's batches make their own (`epoch`).
            targets=None
            if temperature is None
            else functools.partial(
                store_teacher_targets, meta=store.meta, temperature=temperature, rows=True
            ),
        )
        self.hash_stride = hash_stride
        self.augmentation = augmentation_of(store.meta.augmentation)
        self.temperature = temperature
        if temperature is not None:
            warn_unstored_temperature(store.meta, temperature)
        self._process = None
        if batch_process:
            self._process = _start_process(
                AlignedBatches,
                dataset,
                store,
                pin_memory=pin_memory,
                client=client,
                num_workers=num_workers,
                prefetch_blocks=prefetch_blocks,
                hash_stride=hash_stride,
                equal_steps=equal_steps,
                view_policy=view_policy,
                values=values,
                assemble_ahead=assemble_ahead,
                temperature=temperature,
            )

    def steps(self, plan: EpochPlan) -> int:
        """Batches `epoch` yields for the plan's epoch, counted from its start."""
        return self.stream.stop(plan)

    def loader(self, plan: EpochPlan, **epoch_kwargs: Any) -> AlignedLoader:
        """A re-iterable over the plan's epochs: each `iter()` runs one, from the plan's epoch on.

        For frameworks that iterate a loader once per epoch (`trainer.fit(model, aligned.loader(
        plan))` in Lightning). `epoch_kwargs` go to `epoch` (`hash_stride`).
        """
        return AlignedLoader(self, plan, epoch_kwargs)

    def epoch(
        self, plan: EpochPlan, *, hash_stride: int | None = None, then: EpochPlan | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, SoftLabels]]:
        """Yield the plan's remaining batches of its current epoch.

        Args:
            plan: the epoch plan, at the epoch and cursor to read from.
            hash_stride: overrides the constructor's `hash_stride` for this epoch.
            then: the next epoch's plan, whose first soft labels are then read ahead during the
                end of this epoch (see `SoftLabelStream.batches`).

        `plan` is not advanced: the caller counts the batches it consumed, which is what a
        checkpoint must record (a DataLoader with workers draws batches ahead of the step).
        The epoch ends after `steps(plan)` batches.

        Yields:
            inputs (B, ...) (the stored views, replayed, for a store with views), labels (B,)
            int64 (-1: none), and the batch's `SoftLabels`.
        """
        stride = self.hash_stride if hash_stride is None else hash_stride
        if self._process is not None:
            # The child runs this same method (without a process of its own) on its copy.
            yield from self._process.batches(plan, self.steps(plan), hash_stride=stride, then=then)
            return
        augmentation = self.augmentation
        loader = DataLoader(
            batch_fetching(self.dataset),
            batch_sampler=PlanSampler(plan, self.steps(plan)),  # type: ignore[arg-type]  # int64 arrays index like lists
            # With views, what the teacher saw is the replayed view: hash after replaying it.
            collate_fn=collate_pairs if augmentation else sampled_collate(stride),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
        for (inputs, labels, hashes), soft in zip(
            loader, self.stream.batches(plan, then=then), strict=True
        ):
            assert isinstance(soft, SoftLabels)  # a row store's (checked in __init__)
            if augmentation is not None:
                assert soft.view_params is not None
                inputs = replay(augmentation, inputs, soft.view_params)
                hashes = hash_rows(inputs[::stride]) if stride else None
            if stride:
                soft.check_alignment(np.asarray(hashes), stride)
            if self.temperature is not None and soft.targets is None:
                soft = self._with_targets(soft, self.temperature)  # a dense store's
            yield inputs, labels, soft

    def _with_targets(self, soft: SoftLabels, temperature: float) -> SoftLabels:
        targets = store_teacher_targets(soft, self.store.meta, temperature)  # warned in __init__
        return dataclasses.replace(soft, targets=targets)


class _AlignedInChild:
    """The batch process's `BatchSource` for `AlignedBatches` / `AlignedTokenBatches` made with
    ``batch_process=True``: the same class, made in the child without a process of its own."""

    def __init__(
        self, kind: type[AlignedBatches | AlignedTokenBatches], dataset: Any, store: LogitStore,
        options: dict[str, Any],
    ) -> None:  # fmt: skip
        self.aligned = kind(dataset, store, **options)

    def batches(
        self, plan: EpochPlan, steps: int, *, hash_stride: int, then: EpochPlan | None
    ) -> Iterator[Any]:
        del steps  # `epoch` ends after `steps(plan)` batches, as the parent counted them
        if isinstance(self.aligned, AlignedBatches):
            return self.aligned.epoch(plan, hash_stride=hash_stride, then=then)
        return self.aligned.epoch(plan, then=then)


def _start_process(
    kind: type[AlignedBatches | AlignedTokenBatches],
    dataset: Any,
    store: LogitStore,
    *,
    pin_memory: bool,
    client: Any | None,
    **options: Any,
) -> BatchProcess:
    """A batch process making `kind(dataset, store, **options)`'s epochs."""
    name = f"{kind.__name__}(batch_process=True)"
    if client is not None:
        raise ConfigError(
            f"{name} reads the store in its child process, not through a Dask client: pass one "
            "of client= and batch_process=True"
        )
    # The slots are page-locked for a CUDA student's asynchronous copies; the child pins nothing.
    cuda = pin_memory and torch.cuda.is_available()
    if kind is AlignedBatches:
        options["pin_memory"] = False
    source = functools.partial(_AlignedInChild, kind, dataset, store, options)
    try:
        return BatchProcess(source, torch.device("cuda" if cuda else "cpu"))
    except BatchProcessError as exc:
        raise ConfigError(
            f"{name} cannot start its batch process: {exc} (or pass batch_process=False to make "
            "the batches in this process)"
        ) from exc


class AlignedLoader:
    """`AlignedBatches.loader`: each `iter()` sets the plan to the next epoch and yields it.

    The first `iter()` runs the plan's current epoch (from its cursor); `set_epoch` chooses the
    epoch of the next `iter()`, as with a `DistributedSampler`. `len()` is the batches of the
    coming epoch.
    """

    def __init__(
        self, aligned: AlignedBatches, plan: EpochPlan, epoch_kwargs: dict[str, Any]
    ) -> None:
        self.aligned = aligned
        self.plan = plan
        self.epoch_kwargs = epoch_kwargs
        self._next_epoch = plan.epoch
        self._started = False

    def set_epoch(self, epoch: int) -> None:
        """Run epoch `epoch` at the next `iter()`."""
        self._next_epoch = epoch
        self._started = False

    def __len__(self) -> int:
        return self.aligned.steps(self.plan)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, SoftLabels]]:
        if self._started or self.plan.epoch != self._next_epoch:
            self.plan.set_epoch(self._next_epoch)
        self._started = True
        self._next_epoch += 1
        return self.aligned.epoch(self.plan, **self.epoch_kwargs)


# ---- token stores (language models) --------------------------------------------------------------


class AlignedTokenBatches(_BatchProcessOwner):
    """(inputs, per-token targets) batches of a token store, in the order of an epoch plan.

    What `AlignedBatches` is for row stores, for a causal LM's per-token store::

        store = softcache.open_store("teacher.zarr")
        aligned = softcache.AlignedTokenBatches(dataset, store)
        plan = softcache.EpochPlan(num_samples=len(dataset), block_rows=aligned.block_rows(64),
                                   batch_size=64, seed=0)
        for epoch in range(epochs):
            plan.set_epoch(epoch)
            for inputs, targets in aligned.epoch(plan):
                logits = student(inputs.input_ids, attention_mask=inputs.attention_mask).logits
                loss = softcache.token_distillation_loss(logits, inputs, targets, store.meta.codec)

    The inputs are a right-padded `SequenceBatch` (``input_ids``, ``attention_mask``, ``labels``
    of `softcache.data.sequences`); the targets a `TokenLabels` whose fields hold one decoded row
    per real token, in the order of ``logits[inputs.attention_mask]``. Both follow the plan (the
    targets through the one Dask stream, whole blocks ahead), and every sample's length and input
    hash are checked against the store's before its batch is yielded.

    Args:
        dataset: the map-style sequence dataset the store was built from.
        store: an open, complete token store.
        num_workers: DataLoader workers for the inputs.
        prefetch_blocks: store blocks read ahead.
        client: a `distributed.Client` for the stream, or None for threads.
        hash_check: check every sample of every batch (False: none).
        pad_id: the id padding takes in ``input_ids``.
        batch_process: make the batches in a child process, as `AlignedBatches` does (see
            there): the collation, the hash checks and the targets' decoding leave this
            process, and each batch arrives in shared memory, reused only once nothing holds it.
            Call `close()` (or use a `with` block) to stop the child. Not with `client`.
    """

    def __init__(
        self,
        dataset: Any,
        store: LogitStore,
        *,
        num_workers: int = 0,
        prefetch_blocks: int = 2,
        client: Any | None = None,
        hash_check: bool = True,
        pad_id: int = 0,
        batch_process: bool = False,
    ) -> None:
        if not store.meta.tokens:
            raise ConfigError(
                f"store {store.location} has one row per sample; AlignedTokenBatches reads "
                "per-token stores (softcache build --lm); use softcache.AlignedBatches"
            )
        check_sample_count(dataset, store)
        self.dataset = dataset
        self.store = store
        self.num_workers = num_workers
        self.hash_check = hash_check
        self.pad_id = pad_id
        self.stream = SoftLabelStream(store, prefetch_blocks=prefetch_blocks, client=client)
        # Read at the first epoch made here (with a batch process, the child reads them).
        self._hashes: np.ndarray | None = None
        self._process = None
        if batch_process:
            self._process = _start_process(
                AlignedTokenBatches,
                dataset,
                store,
                pin_memory=False,
                client=client,
                num_workers=num_workers,
                prefetch_blocks=prefetch_blocks,
                hash_check=hash_check,
                pad_id=pad_id,
            )

    def block_rows(self, batch_size: int = 1, world_size: int = 1) -> int:
        """The plan's ``block_rows`` for this store: samples per block (`block_samples_for`)."""
        return block_samples_for(self.store, batch_size, world_size)

    def steps(self, plan: EpochPlan) -> int:
        """Batches `epoch` yields for the plan's epoch (the same on every DDP rank)."""
        return self.stream.stop(plan)

    def epoch(
        self, plan: EpochPlan, *, then: EpochPlan | None = None
    ) -> Iterator[tuple[SequenceBatch, TokenLabels]]:
        """Yield the plan's remaining batches of its current epoch (`plan` is not advanced).

        Yields:
            ``(inputs, targets)``: a `SequenceBatch` and the `TokenLabels` of its samples.

        Raises:
            DatasetMismatchError: a sample's tokens differ from those the teacher saw.
        """
        if self._process is not None:
            # The child runs this same method (without a process of its own) on its copy.
            yield from self._process.batches(plan, self.steps(plan), hash_stride=0, then=then)
            return
        loader = DataLoader(
            self.dataset,
            batch_sampler=PlanSampler(plan, self.steps(plan)),  # type: ignore[arg-type]  # int64 arrays index like lists
            collate_fn=_SequencesWithHashes(self.pad_id, self.hash_check),
            num_workers=self.num_workers,
        )
        for (inputs, hashes), targets in zip(
            loader, self.stream.batches(plan, then=then), strict=True
        ):
            assert isinstance(targets, TokenLabels)  # a token store's (checked in __init__)
            if self.hash_check:
                if self._hashes is None:
                    self._hashes = self.store.sample_hashes()
                _check_token_batch(inputs, hashes, targets, self._hashes, self.store.location)
            yield inputs, targets


class _SequencesWithHashes:
    """Collate sequences and hash each item's real input ids (picklable for workers)."""

    def __init__(self, pad_id: int, hashes: bool) -> None:
        self.pad_id, self.hashes = pad_id, hashes

    def __call__(self, items: Sequence[Any]) -> tuple[SequenceBatch, np.ndarray | None]:
        batch = collate_sequences(items, pad_id=self.pad_id)
        if not self.hashes:
            return batch, None
        hashes = np.array(
            [hash_rows(item_tokens(item)[0].unsqueeze(0))[0] for item in items], dtype=np.uint64
        )
        return batch, hashes


def _check_token_batch(
    inputs: SequenceBatch,
    hashes: np.ndarray | None,
    targets: TokenLabels,
    stored: np.ndarray,
    where: str,
) -> None:
    lengths = inputs.lengths.numpy()
    assert hashes is not None
    bad = np.flatnonzero((lengths != targets.lengths) | (hashes != stored[targets.indices]))
    if len(bad):
        i = int(targets.indices[bad[0]])
        raise DatasetMismatchError(
            f"sample {i} ({len(bad)} of this batch) differs from the one store {where} was built "
            f"from ({int(lengths[bad[0]])} tokens against {int(targets.lengths[bad[0]])}, or "
            "another hash); use the dataset the store was built from, or rebuild the store"
        )


def token_distillation_loss(
    logits: torch.Tensor,
    inputs: SequenceBatch,
    targets: TokenLabels,
    codec: TokenCodec,
    *,
    alpha: float = 0.0,
) -> torch.Tensor:
    """The per-token KD loss of a batch, mixed with next-token cross-entropy by ``alpha``.

    ``loss = alpha * CE + (1 - alpha) * KD``, both means over the batch's real tokens; KD is
    `softcache.losses.tokens.topk_residual_kl` (top-k stores, with the tail bin) or `sampled_kl`
    (sampled stores) at the store's temperature, on the memory-lean kernel.

    Args:
        logits: ``(B, L, V)`` student logits of ``inputs`` (any float dtype).
        inputs: the batch (on the logits' device: ``inputs.to(device)``).
        targets: the batch's `TokenLabels` (moved to the device here).
        codec: the store's codec, ``store.meta.codec``.
        alpha: weight of the cross-entropy to ``inputs.labels``.

    Returns:
        A float32 scalar.
    """
    mask = inputs.attention_mask.to(logits.device)
    rows = logits[mask]
    if rows.shape[0] == 0:
        return logits.sum() * 0.0
    fields = targets.to(logits.device).fields
    kd = token_kd_loss(rows, fields, codec)
    if alpha == 0:
        return kd
    labels = inputs.labels.to(logits.device)[mask]
    has = labels != IGNORE_INDEX
    ce = (
        torch.nn.functional.cross_entropy(rows[has].float(), labels[has])
        if bool(has.any())
        else rows.sum() * 0.0
    )
    return alpha * ce + (1 - alpha) * kd


def check_sample_count(dataset: Any, store: LogitStore) -> None:
    """Refuse a dataset whose length is not the number of samples the store was built from.

    Raises:
        DatasetMismatchError: naming both counts.
    """
    if len(dataset) != store.meta.num_samples:
        raise DatasetMismatchError(
            f"the dataset has {len(dataset)} samples but store {store.location} was built from "
            f"{store.meta.num_samples}; use the dataset the store was built from"
        )
