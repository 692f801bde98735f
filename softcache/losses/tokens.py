"""Per-token KD losses for language models, over the sparse rows a token store keeps.

- `topk_residual_kl`: the exact KL over the k kept tokens plus one residual bin (the teacher's
  left-out mass against the student's), like Megatron-LM's "ghost" bin. Biased: the tail's shape
  is lost (`benchmarks/tokens.py` measures how much: loss/KL 0.91 at top-32 of a 128k teacher).
- `sampled_kl`: ids drawn from the teacher with replacement; their frequencies make the loss an
  unbiased estimate of the full KL (Anshumann et al., "Sparse Logit Sampling", 2025), at the
  price of variance. `sampled_ce` is the cross-entropy part.
- `dense_kl`: the full per-token KL (Hinton et al., 2015), for online KD and evaluation.

`topk_residual_kl` and the sampled losses run on `softcache.losses.sparse.sparse_cross_entropy`,
a chunked kernel with its own backward that never holds full-vocabulary float32 buffers for all
tokens at once (the gradient flows to the student's logits only; the teacher's rows are constants).
`topk_residual_kl_reference` is the same loss in plain autograd, for tests and benchmarks.

Every loss scales by ``tau^2`` (so gradients keep their size across temperatures), computes in
float32 on the tensors' device, and takes ``reduction="mean"`` (over tokens) or ``"none"``. The
encodings themselves are in `softcache.store.token_coding`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from softcache.losses.sparse import sparse_cross_entropy
from softcache.store.token_coding import check_temperature


def topk_residual_kl(
    student_logits: Tensor,
    values: Tensor,
    indices: Tensor,
    residual: Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> Tensor:
    """KL divergence over the kept tokens plus one residual bin, scaled by ``tau^2``.

    The teacher's ``k + 1`` bins are ``p_i = exp(values_i)`` and ``p_r = exp(residual)``,
    renormalised to sum to 1 (a no-op for exact values; needed after quantisation). The student's
    are ``q_i = softmax(s / tau)_i`` at the kept ids and ``q_r = 1 - sum_i q_i``, computed as a
    log-sum-exp over the other columns::

        loss = tau^2 * mean_t [ sum_i p_i log(p_i / q_i) + p_r log(p_r / q_r) ]

    with ``0 log 0 = 0``, so ``k = V`` (``residual = -inf``) is exactly the dense KD loss of
    Hinton et al. (2015). By the chain rule of KL this is the full KL minus the tail's inner term
    ``p_r KL(p | tail || q | tail)``, which a top-k cache cannot know: the bias Anshumann et al.
    (2025) remove by sampling (`sampled_ce`).

    References: G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network",
    arXiv:1503.02531, 2015. A. Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge
    Distillation in LLMs", ACL 2025.

    Args:
        student_logits: ``(T, V)`` any float dtype.
        values: ``(T, k)`` teacher log-probabilities at temperature ``tau`` (`topk_residual`, or
            `dequantize_logprobs`), any float dtype, any order.
        indices: ``(T, k)`` integer ids of ``values``, distinct within a row.
        residual: ``(T,)`` log of the teacher's tail mass, ``-inf`` for an empty tail.
        temperature: ``tau``, the temperature the values were encoded at.
        reduction: ``"mean"`` over the rows, or ``"none"`` for the ``(T,)`` per-row losses.
        chunk_rows: tokens per chunk of the lean kernel (`softcache.losses.sparse`; default:
            about 2**21 logits per chunk).

    Returns:
        A float32 scalar (``(T,)`` with ``reduction="none"``).
    """
    check_temperature(temperature)
    _check_rows(student_logits, values, indices)
    # k = V (distinct ids) leaves no tail: its bin is empty whatever `residual` says.
    has_tail = indices.shape[1] < student_logits.shape[1]
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float64 stays float64
    probs, neg_entropy = teacher_bins(values.to(dtype), residual.to(dtype), has_tail=has_tail)
    return topk_residual_kl_of_bins(
        student_logits,
        indices,
        probs,
        neg_entropy,
        temperature=temperature,
        reduction=reduction,
        chunk_rows=chunk_rows,
    )


def teacher_bins(
    values: Tensor, residual: Tensor, *, has_tail: bool = True
) -> tuple[Tensor, Tensor]:
    """The teacher's side of `topk_residual_kl`: its ``k + 1`` bins and their negative entropy.

    It depends on the store's rows only, so a loader can compute it off the training thread
    (`softcache.trainer.token_labels` does, as each block is decoded) and hand it to
    `topk_residual_kl_of_bins`.

    Args:
        values: ``(T, k)`` teacher log-probabilities at the store's temperature, float32 or
            float64.
        residual: ``(T,)`` log of the tail mass, the same dtype.
        has_tail: False when the kept ids are the whole vocabulary (``k = V``): the tail bin is
            then empty whatever ``residual`` says.

    Returns:
        ``probs`` ``(T, k + 1)``: the bins renormalised to sum to 1 (a no-op for exact values;
        needed after quantisation), the tail's last; and ``neg_entropy`` ``(T,)``:
        ``sum_i p_i log p_i`` with ``0 log 0 = 0``. Both in ``values``' dtype, without gradient.
    """
    if not has_tail:
        residual = torch.full_like(residual, -math.inf)
    bins = torch.cat([values, residual.to(values.dtype).unsqueeze(1)], dim=1).detach()
    log_p = bins - torch.logsumexp(bins, dim=1, keepdim=True)
    return log_p.exp(), kl_terms(log_p, torch.zeros_like(log_p)).sum(dim=1)


def topk_residual_kl_of_bins(
    student_logits: Tensor,
    indices: Tensor,
    probs: Tensor,
    neg_entropy: Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> Tensor:
    """`topk_residual_kl` from the teacher's bins `teacher_bins` made beforehand.

    Args:
        student_logits: ``(T, V)`` any float dtype.
        indices: ``(T, k)`` integer ids of the kept bins, distinct within a row.
        probs: ``(T, k + 1)`` and ``neg_entropy``: ``(T,)``, `teacher_bins`' (any float dtype).
        temperature, reduction, chunk_rows: as `topk_residual_kl`'s.

    Returns:
        A float32 scalar (``(T,)`` with ``reduction="none"``); float64 for float64 logits.
    """
    check_temperature(temperature)
    _check_rows(student_logits, indices, indices)
    if probs.shape != (indices.shape[0], indices.shape[1] + 1) or neg_entropy.shape != (
        indices.shape[0],
    ):
        raise ValueError(
            f"expected probs (T, k + 1) and neg_entropy (T,) for indices {tuple(indices.shape)}, "
            f"got {tuple(probs.shape)} and {tuple(neg_entropy.shape)}; make them with teacher_bins"
        )
    has_tail = indices.shape[1] < student_logits.shape[1]
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    probs = probs.to(dtype)
    ce = sparse_cross_entropy(
        student_logits,
        indices,
        probs[:, :-1],
        probs[:, -1] if has_tail else None,
        temperature=temperature,
        chunk_rows=chunk_rows,
    )
    return _reduce(temperature**2 * (neg_entropy.to(dtype) + ce), reduction)


def topk_residual_kl_reference(
    student_logits: Tensor,
    values: Tensor,
    indices: Tensor,
    residual: Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """`topk_residual_kl` in plain autograd over full ``(T, V)`` float32 tensors.

    The same value (to float32 rounding) and gradient, at several times the memory: the
    reference the lean kernel is tested against and `benchmarks/loss.py`'s "naive KL".
    """
    check_temperature(temperature)
    _check_rows(student_logits, values, indices)
    ids = indices.long()
    log_q_all = F.log_softmax(student_logits.float() / temperature, dim=1)
    kept = torch.zeros_like(log_q_all, dtype=torch.bool).scatter_(1, ids, True)
    has_tail = ~kept.all(dim=1, keepdim=True)
    residual = torch.where(has_tail, residual.float().unsqueeze(1), -math.inf)
    bins = torch.cat([values.float(), residual], dim=1)
    log_p = bins - torch.logsumexp(bins, dim=1, keepdim=True)
    # A row with an empty tail would take a log-sum-exp over nothing but -inf, whose backward is
    # nan even times 0: such rows read zeros instead, and their p_r is 0 anyway.
    tail = torch.where(has_tail, log_q_all.masked_fill(kept, float("-inf")), 0.0)
    log_q = torch.cat([log_q_all.gather(1, ids), torch.logsumexp(tail, dim=1, keepdim=True)], 1)
    return _reduce(temperature**2 * kl_terms(log_p, log_q).sum(dim=1), reduction)


def sampled_ce(
    student_logits: Tensor,
    ids: Tensor,
    counts: Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> Tensor:
    """Unbiased estimate of the cross-entropy to the teacher, from ids drawn from it.

    With ``D`` ids drawn from ``p = softmax(t / tau)`` and ``q = softmax(s / tau)``,
    ``CE(p, q) = E_{i~p}[-log q_i]``, estimated without bias by the mean over the draws::

        loss = tau^2 * mean_t [ (1 / D) sum_j c_j (-log q_{id_j}) ],   D = sum_j c_j

    Its gradient in the student logits, ``q - c / D``, is likewise unbiased for ``q - p``. The
    per-token variance is ``Var_{i~p}[log q_i] / D``. This is the random-sampling KD of
    Anshumann et al. (2025) with the teacher itself as the proposal (importance weights 1); the
    ``tau^2`` factor is Hinton et al.'s (2015), as in `topk_residual_kl`.

    Args:
        student_logits: ``(T, V)`` any float dtype.
        ids: ``(T, W)`` integer ids and ``counts``: ``(T, W)`` their counts, 0 for padding
            (`sample_ids`; uint8 / uint16 are converted).
        temperature: ``tau``, the temperature the ids were sampled at.
        reduction: ``"mean"`` over the rows, or ``"none"`` for the ``(T,)`` per-row losses.
        chunk_rows: tokens per chunk of the lean kernel (`softcache.losses.sparse`; default:
            about 2**21 logits per chunk).

    Returns:
        A float32 scalar (``(T,)`` with ``reduction="none"``).
    """
    check_temperature(temperature)
    _check_rows(student_logits, ids, counts)
    weights = counts.to(torch.int32).float()
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    per_row = sparse_cross_entropy(
        student_logits, ids, weights, temperature=temperature, chunk_rows=chunk_rows
    )
    return _reduce(temperature**2 * per_row, reduction)


def sampled_kl(
    student_logits: Tensor,
    ids: Tensor,
    counts: Tensor,
    entropy: Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> Tensor:
    """Unbiased estimate of ``tau^2 KL(p || q)``: `sampled_ce` minus the teacher's entropy.

    ``KL(p || q) = CE(p, q) - H(p)``; with the exact ``H(p)`` stored per token
    (`teacher_entropy`), the estimate stays unbiased and has the same gradient and variance as
    `sampled_ce`, but reads as a KL (0 when the student equals the teacher, in expectation).

    ``entropy`` is ``(T,)``, any float dtype; the other arguments are `sampled_ce`'s.
    """
    ce = sampled_ce(
        student_logits,
        ids,
        counts,
        temperature=temperature,
        reduction="none",
        chunk_rows=chunk_rows,
    )
    return _reduce(ce - temperature**2 * entropy.float(), reduction)


# ---- helpers -------------------------------------------------------------------------------------


def dense_kl(student_rows: Tensor, teacher_rows: Tensor, temperature: float) -> Tensor:
    """``tau^2 * mean_t KL(softmax(t / tau) || softmax(s / tau))`` over ``(T, V)`` rows: float32."""
    log_q = F.log_softmax(student_rows.float() / temperature, dim=1)
    log_p = F.log_softmax(teacher_rows.float() / temperature, dim=1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / max(student_rows.shape[0], 1)
    return temperature**2 * kl


def _reduce(per_row: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_row.mean()
    if reduction == "none":
        return per_row
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Elementwise ``p (log p - log q)`` with ``0 log 0 = 0`` in the value and the gradient."""
    positive = log_p > -math.inf
    safe_p = torch.where(positive, log_p, 0.0)
    terms = safe_p.exp() * (safe_p - torch.where(positive, log_q, 0.0))
    return torch.where(positive, terms, 0.0)


def _check_rows(student_logits: Tensor, a: Tensor, b: Tensor) -> None:
    if student_logits.ndim != 2 or student_logits.shape[0] == 0:
        raise ValueError(f"student_logits must be (T >= 1, V), got {tuple(student_logits.shape)}")
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"expected two (T = {student_logits.shape[0]}, k) tensors, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
