"""`softcache fidelity`: what a lossy store costs, measured against the teacher's full rows.

A store is a compression of the teacher: top-k drops the tail, float16 and bfloat16 round the
logits, ``--value-bits`` quantises log-probabilities, sampled stores keep a few draws. This module
measures, on a seeded sample of rows, how far the distribution a store can give back (``p~``) is
from the full one (``p``), at one temperature ``T``:

- ``KL(p || p~)`` per row, in nats: its mean and percentiles. ``p~`` is what the store can rebuild:
  dense rows exactly as stored; top-k rows with their kept probabilities (exact, from the stored
  normaliser) and the tail mass spread evenly over the classes left out. A sampled row's ``p~`` is
  the draws' frequencies, zero on undrawn ids, so its KL is infinite: reported as None (the loss
  of a sampled store is unbiased all the same; what it costs is variance, not bias).
- top-1 agreement: ``argmax p~ == argmax p``.
- kept mass: the share of ``p`` on the classes the store keeps (1 for dense rows).
- calibration: the expected calibration error (15 equal-width confidence bins; Guo et al., "On
  Calibration of Modern Neural Networks", ICML 2017) of ``p~`` and of ``p`` against the labels,
  where the dataset has labels.
- bytes per sample (per token for a token store): `LogitStore.nbytes_stored()`, everything on disk,
  and the per-row arrays' shard objects alone (what a sweep's candidates are compared with: the
  store's metadata is a few kB whatever its size).

The reference ``p`` is, in order of preference, a dense store of the same data (`reference`,
checked row by row through its sample hashes), the teacher run over the sampled rows (`teacher`
and `dataset`; the inputs are checked against the store's hashes first), or, for a dense store
with neither, the store itself (then only its calibration says anything). Token stores need the
teacher: no dense token store exists.

The trade-off: a sample of rows (``rows``, default 2,048) rather than the whole store, so a check
of a 1M-row store costs seconds and one teacher pass over a few thousand inputs; percentiles
beyond the 99th of a 2,048-row sample are noise, so none is reported. `softcache.tools.sweep`
re-encodes the same reference rows in candidate encodings to find the smallest one under a KL
budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from softcache.data.hashing import collate_with_hashes
from softcache.data.sequences import causal_logits, collate_sequences, item_tokens
from softcache.errors import ConfigError, DatasetMismatchError, SoftcacheError
from softcache.losses.tokens import kl_terms
from softcache.runtime.devices import resolve_device
from softcache.runtime.specs import dataset_from, module_from
from softcache.store import LSE, TOPK_INDICES, TOPK_VALUES, LogitStore, decode_token_rows
from softcache.store.format import LOGITS, SAMPLE_HASH

ECE_BINS = 15
PERCENTILES = (50, 90, 99)
BATCH = 256


class FidelityError(SoftcacheError):
    """A fidelity measurement cannot be made as asked (no reference, wrong temperature, ...)."""


@dataclass
class Reference:
    """The sample a store is measured on: rows, their full teacher logits, and their labels.

    Attributes:
        rows: ``(n,)`` int64 row indices of the store, ascending.
        logits: ``(n, C)`` float32 full teacher logits of those rows.
        labels: ``(n,)`` int64 labels (-1 where there is none), or None without a dataset.
        source: what the logits came from, in words.
        samples: how many dataset samples the rows come from.
    """

    rows: np.ndarray
    logits: Tensor
    labels: Tensor | None
    source: str
    samples: int


@dataclass
class FidelityReport:
    """What `fidelity` measured (see the module docstring); `to_dict` for `--json`."""

    store: str
    layout: str
    encoding: str
    temperature: float
    reference: str
    rows: int
    samples: int
    bytes_per_unit: float
    data_bytes_per_unit: float
    unit: str
    kl_mean: float | None
    kl_percentiles: dict[str, float] | None
    agreement: float
    kept_mass: float
    ece: float | None
    ece_reference: float | None
    labelled: int
    sweep: dict[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RowFigures:
    """Per-row figures of a stored distribution against the reference (all ``(n,)``)."""

    kl: np.ndarray  # float64, inf where p~ is 0 at some p > 0
    agree: np.ndarray  # bool
    kept: np.ndarray  # float64
    confidence: np.ndarray  # float64: max p~
    predicted: np.ndarray  # int64: argmax p~
    confidence_ref: np.ndarray  # float64: max p
    predicted_ref: np.ndarray  # int64: argmax p


def fidelity(
    location: str,
    *,
    reference: str | None = None,
    teacher: Any = None,
    dataset: Any = None,
    rows: int = 2048,
    seed: int = 0,
    temperature: float | None = None,
    device: str = "auto",
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[FidelityReport, Reference, LogitStore]:
    """Measure a store against its reference on a sample of rows (see the module docstring).

    Args:
        location: the store.
        reference: a dense row store of the same data (same rows, same sample hashes).
        teacher: teacher spec (or module), run over the sampled rows of `dataset`.
        dataset: the dataset the store was built from: inputs for the teacher, labels for ECE.
        rows: rows to sample (all of them when the store has fewer); token stores take whole
            sequences until at least this many tokens.
        seed: seeds the sample.
        temperature: ``T``; default 1 for row stores, the store's own for token stores (whose
            log-probabilities exist at that temperature only).
        device: where the teacher runs.
        storage_options: fsspec options for URL stores.

    Returns:
        ``(report, reference, store)``: the figures, the reference rows (for a sweep) and the
        open store.

    Raises:
        FidelityError: no reference can be had, or the temperature is not one the store keeps.
        DatasetMismatchError: the reference or the dataset is not the store's data.
    """
    store = LogitStore.open(location, storage_options=storage_options)
    meta = store.meta
    tau = _temperature(store, temperature)
    ref = load_reference(
        store,
        reference=reference,
        teacher=teacher,
        dataset=dataset,
        rows=rows,
        seed=seed,
        device=device,
        storage_options=storage_options,
    )
    figures = concat_figures(
        row_figures(_log_softmax(t, tau), stored)
        for t, stored in zip(
            _batches(ref.logits), stored_log_probs(store, ref.rows, tau), strict=True
        )
    )
    unit = "token" if meta.tokens else "sample"
    per = meta.num_tokens if meta.tokens else meta.num_samples
    labelled, ece, ece_ref = calibration(figures, ref.labels)
    finite = bool(np.isfinite(figures.kl).all())
    report = FidelityReport(
        store=location,
        layout=meta.layout,
        encoding=_describe_encoding(store),
        temperature=tau,
        reference=ref.source,
        rows=len(ref.rows),
        samples=ref.samples,
        bytes_per_unit=store.nbytes_stored() / max(per, 1),
        data_bytes_per_unit=row_data_bytes(store) / max(per, 1),
        unit=unit,
        kl_mean=float(figures.kl.mean()) if finite else None,
        kl_percentiles=(
            {f"p{q}": float(np.percentile(figures.kl, q)) for q in PERCENTILES} if finite else None
        ),
        agreement=float(figures.agree.mean()),
        kept_mass=float(figures.kept.mean()),
        ece=ece,
        ece_reference=ece_ref,
        labelled=labelled,
    )
    return report, ref, store


# ---- the figures (pure) --------------------------------------------------------------------------


def row_figures(log_p: Tensor, stored: tuple[Tensor, Tensor]) -> RowFigures:
    """Per-row figures of a stored distribution against the full one.

    Args:
        log_p: ``(n, C)`` float32 full log-probabilities at ``T``.
        stored: ``(log_q, kept)``: ``(n, C)`` float32 log-probabilities the store gives back
            (``-inf`` where it gives none) and ``(n, C)`` bool, the classes it keeps.

    Returns:
        `RowFigures` as float64 / int64 / bool numpy arrays.
    """
    log_q, kept = stored
    kl = kl_terms(log_p, log_q).sum(dim=1)
    # kl_terms reads p * (log p - log q); where q = 0 and p > 0 that is +inf, as it should be.
    p = log_p.exp()
    conf_q, pred_q = log_q.max(dim=1)
    conf_p, pred_p = log_p.max(dim=1)
    return RowFigures(
        kl=kl.double().numpy(),
        agree=(pred_q == pred_p).numpy(),
        kept=(p * kept).sum(dim=1).double().numpy(),
        confidence=conf_q.exp().double().numpy(),
        predicted=pred_q.numpy(),
        confidence_ref=conf_p.exp().double().numpy(),
        predicted_ref=pred_p.numpy(),
    )


def concat_figures(parts: Iterator[RowFigures] | list[RowFigures]) -> RowFigures:
    """`RowFigures` of consecutive batches, joined."""
    parts = list(parts)
    return RowFigures(
        **{k: np.concatenate([getattr(p, k) for p in parts]) for k in RowFigures.__annotations__}
    )


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> float:
    """``sum_b |B_b| / n * |accuracy(B_b) - mean confidence(B_b)|`` over equal-width bins.

    Args:
        confidence: ``(n,)`` the predicted class's probability, in [0, 1].
        correct: ``(n,)`` bool, whether the predicted class is the label.
        bins: equal-width bins over [0, 1]; a confidence of exactly 1 falls in the last.

    Returns:
        The ECE, in [0, 1] (0 for an empty input).
    """
    n = len(confidence)
    if n == 0:
        return 0.0
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() / n * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def calibration(
    figures: RowFigures, labels: Tensor | None
) -> tuple[int, float | None, float | None]:
    """``(labelled rows, ECE of p~, ECE of p)``; the ECEs are None without labelled rows."""
    if labels is None:
        return 0, None, None
    y = labels.numpy()
    have = y >= 0
    if not have.any():
        return 0, None, None
    ece = expected_calibration_error(figures.confidence[have], figures.predicted[have] == y[have])
    ece_ref = expected_calibration_error(
        figures.confidence_ref[have], figures.predicted_ref[have] == y[have]
    )
    return int(have.sum()), ece, ece_ref


def reconstruct_topk(log_kept: Tensor, ids: Tensor, log_tail: Tensor, num_classes: int) -> Tensor:
    """The full distribution a top-k row can give back: ``(n, C)`` float32 log-probabilities.

    The ``k + 1`` bins (kept log-probabilities and the log tail mass) are renormalised (a no-op for
    exact values; needed after rounding or quantisation), and the tail's mass is spread evenly over
    the ``C - k`` classes left out.

    Args:
        log_kept: ``(n, k)`` log-probabilities of the kept classes.
        ids: ``(n, k)`` int64 their class ids, distinct within a row.
        log_tail: ``(n,)`` log of the mass left out (``-inf`` for none).
        num_classes: C.
    """
    k = ids.shape[1]
    bins = torch.cat([log_kept.float(), log_tail.float().unsqueeze(1)], dim=1)
    bins = bins - torch.logsumexp(bins, dim=1, keepdim=True)
    spread = bins[:, -1:] - math.log(max(num_classes - k, 1))
    out = spread.expand(-1, num_classes).clone()
    return out.scatter_(1, ids.long(), bins[:, :-1])


def topk_tail(log_kept: Tensor) -> Tensor:
    """``(n,)`` log of ``1 - sum exp(log_kept)``, floored at 1e-30 so that rounding that pushes
    the kept mass just over 1 leaves a finite (negligible) tail rather than a zero."""
    tail = -torch.expm1(torch.logsumexp(log_kept.float(), dim=1))
    return torch.log(tail.clamp_min(1e-30))


def row_data_bytes(store: LogitStore) -> int:
    """Bytes of the shard objects of a store's per-row arrays (no metadata, no per-sample
    arrays of a token store)."""
    return sum(
        store.shard_object_size(name, shard) or 0
        for name in store.row_array_names
        for shard in range(store.meta.num_shards)
    )


# ---- what a store gives back ---------------------------------------------------------------------


def stored_log_probs(
    store: LogitStore, rows: np.ndarray, temperature: float
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(log p~, kept)`` of `rows` (ascending), in batches of `BATCH`: ``(b, C)`` float32 and
    ``(b, C)`` bool each (see `row_figures`)."""
    meta = store.meta
    for start in range(0, len(rows), BATCH):
        chunk = rows[start : start + BATCH]
        arrays = {name: _take(store, name, chunk) for name in store.data_array_names}
        if meta.tokens:
            yield _token_log_probs(store, arrays, temperature)
        elif meta.encoding == "dense":
            logits = torch.from_numpy(store.decode_values(arrays[LOGITS]))
            log_q = _log_softmax(logits, temperature)
            yield log_q, torch.ones_like(log_q, dtype=torch.bool)
        else:
            values = torch.from_numpy(store.decode_values(arrays[TOPK_VALUES]))
            ids = torch.from_numpy(arrays[TOPK_INDICES].astype(np.int64))
            t = meta.temperatures.index(temperature)
            lse = torch.from_numpy(np.asarray(arrays[LSE][:, t], dtype=np.float32))
            log_kept = values / temperature - lse.unsqueeze(1)
            yield _topk_pair(log_kept, ids, topk_tail(log_kept), meta.num_classes)


def _token_log_probs(
    store: LogitStore, arrays: Mapping[str, np.ndarray], temperature: float
) -> tuple[Tensor, Tensor]:
    meta = store.meta
    decoded = decode_token_rows(dict(arrays), meta)
    vocab = meta.num_classes
    if meta.encoding == "topk":
        return _topk_pair(decoded["values"], decoded["indices"], decoded["residual"], vocab)
    return sampled_log_probs(decoded["ids"], decoded["counts"], vocab)


def sampled_log_probs(ids: Tensor, counts: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """A sampled row's draw frequencies as ``(n, V)`` log-probabilities (``-inf`` on undrawn
    ids) and the ``(n, V)`` bool drawn ids. ``counts`` is 0 on padding."""
    weights = counts.float()
    freq = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    probs = torch.zeros(ids.shape[0], vocab).scatter_add_(1, ids.long(), freq)
    # Padding may repeat a drawn id: add counts rather than overwrite flags.
    drawn = torch.zeros(ids.shape[0], vocab).scatter_add_(1, ids.long(), weights)
    return probs.log(), drawn > 0


def _topk_pair(
    log_kept: Tensor, ids: Tensor, log_tail: Tensor, vocab: int
) -> tuple[Tensor, Tensor]:
    kept = torch.zeros(ids.shape[0], vocab, dtype=torch.bool).scatter_(1, ids.long(), True)
    return reconstruct_topk(log_kept, ids, log_tail, vocab), kept


# ---- the reference -------------------------------------------------------------------------------


def load_reference(
    store: LogitStore,
    *,
    reference: str | None,
    teacher: Any,
    dataset: Any,
    rows: int,
    seed: int,
    device: str = "auto",
    storage_options: Mapping[str, Any] | None = None,
) -> Reference:
    """The reference rows of a store (see `fidelity` and the module docstring)."""
    meta = store.meta
    if rows < 1:
        raise ConfigError(f"rows must be >= 1, got {rows}")
    if teacher is not None and dataset is None:
        raise FidelityError("--teacher runs over the store's dataset: pass --dataset as well")
    data = dataset_from(dataset) if dataset is not None else None
    if meta.tokens:
        if teacher is None or data is None:
            raise FidelityError(
                f"store {store.location} is a token store, which keeps no full rows: pass "
                "--teacher and --dataset (the teacher is run over a sample of its sequences)"
            )
        return _token_reference(store, teacher, data, rows, seed, device)
    chosen = _sample(meta.num_rows, rows, seed)
    labels = _row_labels(data, chosen, meta.views) if data is not None else None
    if reference is not None:
        logits = _reference_store_rows(store, reference, chosen, storage_options)
        return Reference(chosen, logits, labels, f"dense store {reference}", _samples(chosen, meta))
    if teacher is not None and data is not None:
        logits = _teacher_rows(store, teacher, data, chosen, device)
        return Reference(chosen, logits, labels, "the teacher", len(chosen))
    if meta.encoding == "dense":
        logits = torch.cat(
            [
                torch.from_numpy(store.decode_values(_take(store, LOGITS, chosen[s : s + BATCH])))
                for s in range(0, len(chosen), BATCH)
            ]
        )
        return Reference(chosen, logits, labels, "the store itself", _samples(chosen, meta))
    raise FidelityError(
        f"store {store.location} is a top-k store: measuring it needs the full rows; pass "
        "--reference DENSE_STORE (a dense store of the same data) or --teacher and --dataset"
    )


def _sample(n: int, rows: int, seed: int) -> np.ndarray:
    if rows >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=rows, replace=False)).astype(np.int64)


def _samples(chosen: np.ndarray, meta: Any) -> int:
    return len(np.unique(chosen // meta.views))


def _row_labels(data: Any, chosen: np.ndarray, views: int) -> Tensor:
    if len(data) * views <= int(chosen.max(initial=0)):
        raise DatasetMismatchError(
            f"the dataset has {len(data)} samples, fewer than the store's {len(chosen)} sampled "
            "rows need; pass the dataset the store was built from"
        )
    labels = []
    for i in chosen // views:
        y = data[int(i)][1]
        labels.append(-1 if y is None or int(y) < 0 else int(y))
    return torch.tensor(labels, dtype=torch.int64)


def _reference_store_rows(
    store: LogitStore,
    reference: str,
    chosen: np.ndarray,
    storage_options: Mapping[str, Any] | None,
) -> Tensor:
    ref = LogitStore.open(reference, storage_options=storage_options)
    rm, sm = ref.meta, store.meta
    if ref.meta.tokens or rm.encoding != "dense":
        raise FidelityError(
            f"the reference {reference} is a {rm.layout} {rm.encoding} store; a reference must "
            "be a dense row store (build one with --encoding dense)"
        )
    if (rm.num_rows, rm.num_classes) != (sm.num_rows, sm.num_classes):
        raise DatasetMismatchError(
            f"the reference {reference} has {rm.num_rows} rows of {rm.num_classes} classes, the "
            f"store {sm.num_rows} of {sm.num_classes}; build the reference over the same dataset"
        )
    ours = _take(store, SAMPLE_HASH, chosen)
    theirs = _take(ref, SAMPLE_HASH, chosen)
    bad = np.flatnonzero(ours != theirs)
    if len(bad):
        raise DatasetMismatchError(
            f"the reference {reference} holds other inputs than the store at {len(bad)} of "
            f"{len(chosen)} sampled rows (first: row {int(chosen[bad[0]])}); build it over the "
            "same dataset, in the same order"
        )
    return torch.cat(
        [
            torch.from_numpy(ref.decode_values(_take(ref, LOGITS, chosen[s : s + BATCH])))
            for s in range(0, len(chosen), BATCH)
        ]
    )


@torch.inference_mode()
def _teacher_rows(
    store: LogitStore, teacher: Any, data: Any, chosen: np.ndarray, device: str
) -> Tensor:
    meta = store.meta
    if meta.views > 1:
        raise FidelityError(
            f"store {store.location} keeps {meta.views} augmented views per sample; measure it "
            "against a dense store of the same views (--reference) rather than the teacher"
        )
    if len(data) != meta.num_samples:
        raise DatasetMismatchError(
            f"the dataset has {len(data)} samples, the store {meta.num_samples}; pass the "
            "dataset the store was built from"
        )
    where = resolve_device(device)
    model = module_from(teacher, "teacher").eval().to(where)
    loader = DataLoader(
        Subset(data, chosen.tolist()), batch_size=BATCH, collate_fn=collate_with_hashes
    )
    stored_hashes = _take(store, SAMPLE_HASH, chosen)
    out, seen = [], 0
    for x, _, hashes in loader:
        n = len(hashes)
        bad = np.flatnonzero(hashes != stored_hashes[seen : seen + n])
        if len(bad):
            raise DatasetMismatchError(
                f"sample {int(chosen[seen + bad[0]])} of the dataset hashes differently from the "
                "input the store's teacher saw; pass the dataset the store was built from"
            )
        logits = model(x.to(where)).float().cpu()
        if logits.shape != (n, meta.num_classes):
            raise FidelityError(
                f"the teacher gave {tuple(logits.shape)} logits for {n} inputs; the store has "
                f"{meta.num_classes} classes"
            )
        out.append(logits)
        seen += n
    return torch.cat(out)


@torch.inference_mode()
def _token_reference(
    store: LogitStore, teacher: Any, data: Any, rows: int, seed: int, device: str
) -> Reference:
    meta = store.meta
    if len(data) != meta.num_samples:
        raise DatasetMismatchError(
            f"the dataset has {len(data)} sequences, the store {meta.num_samples}; pass the "
            "dataset the store was built from"
        )
    offsets = store.offsets()
    lengths = np.diff(offsets)
    order = np.random.default_rng(seed).permutation(meta.num_samples)
    taken = np.cumsum(lengths[order])
    count = int(np.searchsorted(taken, min(rows, int(taken[-1]) if len(taken) else 0)) + 1)
    samples = np.sort(order[:count])
    where = resolve_device(device)
    model = module_from(teacher, "teacher").eval().to(where)
    logits, labels = [], []
    for s in range(0, len(samples), 16):
        idx = samples[s : s + 16]
        items = [data[int(i)] for i in idx]
        for i, item in zip(idx, items, strict=True):
            n = len(item_tokens(item, int(i))[0])
            if n != lengths[i]:
                raise DatasetMismatchError(
                    f"sequence {int(i)} has {n} tokens in the dataset and {int(lengths[i])} in "
                    "the store; pass the dataset the store was built from"
                )
        batch = collate_sequences(items)
        mask = batch.attention_mask
        out = causal_logits(model, batch.input_ids.to(where), mask.to(where))[mask.to(where)]
        logits.append(out.float().cpu())
        labels.append(batch.labels[mask])
    chosen = np.concatenate(
        [np.arange(offsets[i], offsets[i + 1], dtype=np.int64) for i in samples]
    )
    full = torch.cat(logits) if logits else torch.zeros(0, meta.num_classes)
    if full.shape[1] != meta.num_classes:
        raise FidelityError(
            f"the teacher gives {full.shape[1]} logits per token, the store has a vocabulary "
            f"of {meta.num_classes}"
        )
    return Reference(chosen, full, torch.cat(labels), "the teacher", len(samples))


# ---- helpers -------------------------------------------------------------------------------------


def _temperature(store: LogitStore, temperature: float | None) -> float:
    meta = store.meta
    if meta.tokens:
        tau = meta.codec.temperature
        if temperature is not None and temperature != tau:
            raise FidelityError(
                f"store {store.location} keeps log-probabilities at temperature {tau} only; "
                f"drop --temperature {temperature} (or pass {tau})"
            )
        return tau
    tau = 1.0 if temperature is None else float(temperature)
    if not tau > 0:
        raise ConfigError(f"temperature must be > 0, got {tau}")
    if meta.encoding == "topk" and tau not in meta.temperatures:
        kept = ", ".join(f"{t:g}" for t in meta.temperatures)
        raise FidelityError(
            f"store {store.location} keeps top-k normalisers for temperatures {kept} only, not "
            f"{tau:g}; pass --temperature with one of them"
        )
    return tau


def _describe_encoding(store: LogitStore) -> str:
    meta = store.meta
    if meta.tokens:
        codec = meta.codec
        if codec.encoding == "sampled":
            return f"sampled {codec.width} draws"
        bits = f"{codec.value_bits}-bit" if codec.value_bits else "float16"
        return f"top-{codec.width} {bits}"
    if meta.encoding == "dense":
        return f"dense {meta.value_dtype}"
    return f"top-{meta.k} {meta.value_dtype}"


def _take(store: LogitStore, name: str, rows: np.ndarray) -> np.ndarray:
    """Rows of an array at sorted indices (Zarr reads only the chunks holding them)."""
    return np.asarray(store.array(name).oindex[rows])


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    return torch.log_softmax(logits.float() / temperature, dim=1)


def _batches(logits: Tensor) -> Iterator[Tensor]:
    for start in range(0, logits.shape[0], BATCH):
        yield logits[start : start + BATCH]
