"""Knowledge-distillation losses over cached teacher logits, dense or top-k.

Every function here is pure torch: no I/O, no logging, no state. Whatever dtype the inputs arrive
in (float16 or bfloat16 from a store, bfloat16 from a student under autocast), the arithmetic is
done in float32: a softmax over a 32k-class row in float16 loses most of the tail, and the tail is
exactly what distillation transfers.

Labels may be missing. A negative target (``-100`` or ``-1``; or ``targets=None``) means "no
label", the normal case when a teacher labels a new domain's unlabelled data: those samples train
from the soft labels alone, and the hard cross-entropy term averages over the labelled samples
only.

Top-k stores keep the ``k`` largest teacher logits of each row plus, per temperature, the
log-sum-exp of the full row. With it the kept probabilities are exact and the probability of
everything else (the tail) is known, so the loss is the KL divergence between teacher and student
on ``k + 1`` outcomes: "class i" for each kept i, and "some other class". Without it the loss falls
back to renormalising both distributions over the kept classes, which is biased (see
`kd_loss_topk`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from softcache.data.labels import NO_LABEL

__all__ = ["hard_loss", "kd_loss_dense", "kd_loss_topk", "topk_teacher_probs"]

_INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.int64)


def hard_loss(student_logits: Tensor, targets: Tensor | None) -> Tensor:
    """Cross-entropy with the hard labels, averaged over the labelled samples only.

    ``CE = -(1 / |L|) * sum_{n in L} log softmax(s_n)[y_n]`` with ``L = {n : y_n >= 0}``.
    When no sample is labelled (every target is negative, or ``targets`` is None) the loss is a zero
    that still belongs to the autograd graph, so ``loss.backward()`` works and gives zero gradients:
    unlabelled data trains from soft labels alone.

    Args:
        student_logits: ``(B, C)`` any float dtype; computed in float32.
        targets: ``(B,)`` integer class indices in ``[0, C)``; a negative value (``-100``,
            `softcache.data.labels.NO_LABEL`, or ``-1``) means "no label"; or None.

    Returns:
        A float32 scalar.

    Raises:
        ValueError: if the shapes or dtypes do not fit.
    """
    shape = student_logits.shape
    # The step's usual batch (2-D float32 logits, int64 labels of its length) passes one test;
    # anything else gets the checks that say what is wrong.
    if not (
        len(shape) == 2
        and shape[0] > 0
        and shape[1] > 0
        and student_logits.dtype == torch.float32
        and targets is not None
        and targets.dtype == torch.int64
        and targets.shape == (shape[0],)
    ):
        _check_logits("student_logits", student_logits)
        _check_targets(targets, shape[0])
    return _hard_loss(student_logits, targets)


def kd_loss_dense(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor | None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.0,
) -> Tensor:
    """Hinton distillation loss against the teacher's full logit rows.

    ``loss = alpha * CE(s, y) + (1 - alpha) * T^2 * KL(p_T || q_T)``, where
    ``p_T = softmax(t / T)``, ``q_T = softmax(s / T)``, the KL divergence is summed over classes and
    averaged over the batch ("batchmean"), and CE is `hard_loss` (labelled samples only; zero when
    none is labelled, so unlabelled data trains from soft labels alone). The ``T^2`` factor keeps
    the soft term's gradient scale independent of the temperature.

    Reference: G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network",
    arXiv:1503.02531, 2015.

    Args:
        student_logits: ``(B, C)`` any float dtype.
        teacher_logits: ``(B, C)`` float16, bfloat16 or float32 raw teacher logits.
        targets: ``(B,)`` integer labels, negative (-100 or -1) for "no label"; or None.
        temperature: softening temperature ``T > 0``.
        alpha: weight of the hard-label term, in ``[0, 1]``.

    Returns:
        A float32 scalar.

    Raises:
        ValueError: on a shape or dtype mismatch, ``temperature <= 0`` or ``alpha`` outside
            ``[0, 1]``.
    """
    _check_scalars(temperature, alpha)
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits has shape {tuple(teacher_logits.shape)} but student_logits has "
            f"{tuple(student_logits.shape)}; they must match (batch, num_classes)"
        )
    _check_targets(targets, student_logits.shape[0])

    if teacher_logits.requires_grad:  # a teacher trained jointly: autograd through both sides
        log_p = F.log_softmax(teacher_logits.float() / temperature, dim=1)
        log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
        soft = _kl_terms(log_p.exp(), log_p, log_q).sum(dim=1).mean()
        return _combine(soft, student_logits, targets, temperature, alpha)
    # Cached soft labels are constants: KL(p || q) = CE(q; p) - H(p), the cross-entropy with
    # probability targets one fused op (its gradient q - p), the entropy without autograd. A
    # quarter fewer ops per step than the masked elementwise form, which a small student's step
    # (a few ms) notices.
    with torch.no_grad():
        log_p = F.log_softmax(teacher_logits.float() / temperature, dim=1)
        p = log_p.exp()
        neg_entropy = torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=1)
    cross = F.cross_entropy(student_logits.float() / temperature, p, reduction="none")
    soft = (cross + neg_entropy).mean()
    return _combine(soft, student_logits, targets, temperature, alpha)


def kd_loss_topk(
    student_logits: Tensor,
    topk_values: Tensor,
    topk_indices: Tensor,
    lse: Tensor | None,
    targets: Tensor | None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.0,
) -> Tensor:
    """Distillation loss against the teacher's top-k logits, with an exact tail bucket.

    With the normaliser ``lse = logsumexp(t / T)`` of the full teacher row, the kept teacher
    probabilities are exact, ``p_i = exp(v_i / T - lse)``, and the tail mass is
    ``p_tail = max(0, 1 - sum_i p_i)``. The student's distribution ``q = softmax(s / T)`` is read
    at the kept classes, ``q_i``, and summed over all other classes, ``q_tail`` (a log-sum-exp over
    the non-kept columns, so it stays accurate when the tail is tiny). The soft term is the KL
    divergence between the two ``(k + 1)``-outcome distributions::

        KL = sum_i p_i * (log p_i - log q_i) + p_tail * (log p_tail - log q_tail)

    with ``0 * log 0 = 0`` (so ``k = C``, an empty tail, gives exactly the dense loss). As in
    `kd_loss_dense`: ``loss = alpha * CE(s, y) + (1 - alpha) * T^2 * KL``, KL averaged over the
    batch, CE over the labelled samples only. By the chain rule of KL, this is the full KL minus the
    tail's within-bucket term ``p_tail * KL(p | tail || q | tail)``, which the cache cannot know.

    Without a normaliser (``lse=None``: the store holds none for this temperature) the loss falls
    back to renormalising over the kept classes: ``p = softmax(v / T)`` over the ``k`` values and
    ``log q_i = log_softmax(s_kept / T)_i``, with no tail bucket. This is biased: the teacher's kept
    probabilities are inflated by ``1 / sum_i p_i``, and nothing stops the student from putting mass
    on classes outside the top-k (only its relative shape over the kept classes is trained). The
    bias vanishes when the kept classes hold almost all of the teacher's mass. This function does
    not warn; the caller should.

    Reference: G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network",
    arXiv:1503.02531, 2015. On the bias of top-k caches and unbiased sampled alternatives:
    A. Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs", 2025.

    Args:
        student_logits: ``(B, C)`` any float dtype.
        topk_values: ``(B, k)`` raw teacher logits (float16, bfloat16 or float32), ``1 <= k <= C``,
            conventionally sorted in descending order (the loss does not depend on the order).
        topk_indices: ``(B, k)`` integer class indices of ``topk_values``, distinct within a row.
            int64 or int32 are the expected dtypes; uint16 (as stored for ``C <= 65536``) and the
            other small integer dtypes are accepted and converted to int64 first, since torch
            supports little more than conversion on uint16 tensors.
        lse: ``(B,)`` float32 ``logsumexp(teacher_logits / T)`` over the full row at this
            temperature; or None for the renormalised fallback.
        targets: ``(B,)`` integer labels, negative (-100 or -1) for "no label"; or None.
        temperature: softening temperature ``T > 0``; must be the one ``lse`` was computed for.
        alpha: weight of the hard-label term, in ``[0, 1]``.

    Returns:
        A float32 scalar.

    Raises:
        ValueError: on a shape or dtype mismatch, ``temperature <= 0`` or ``alpha`` outside
            ``[0, 1]``.
    """
    _check_scalars(temperature, alpha)
    _check_logits("student_logits", student_logits)
    batch, num_classes = student_logits.shape
    _check_topk(topk_values, topk_indices, batch, num_classes)
    _check_lse(lse, batch)
    _check_targets(targets, batch)

    indices = topk_indices.long()
    scaled = student_logits.float() / temperature
    if lse is None:
        log_p = F.log_softmax(topk_values.float() / temperature, dim=1)
        log_q = F.log_softmax(scaled.gather(1, indices), dim=1)
        soft = _kl_terms(log_p.exp(), log_p, log_q).sum(dim=1).mean()
        return _combine(soft, student_logits, targets, temperature, alpha)

    log_p = topk_values.float() / temperature - lse.float().unsqueeze(1)
    p = log_p.exp()
    p_tail = _tail_mass(log_p)
    log_q_all = F.log_softmax(scaled, dim=1)
    log_q = log_q_all.gather(1, indices)

    # Student tail log-mass: a log-sum-exp over the non-kept columns. A row whose tail is empty
    # (k = C) would be a log-sum-exp over nothing but -inf, whose backward is nan even when
    # multiplied by zero, so such rows read a harmless row of zeros and their tail term is forced
    # to 0.
    kept = torch.zeros_like(log_q_all, dtype=torch.bool).scatter_(1, indices, True)
    has_tail = ~kept.all(dim=1)
    tail_logits = log_q_all.masked_fill(kept, float("-inf"))
    tail_logits = torch.where(has_tail.unsqueeze(1), tail_logits, torch.zeros_like(tail_logits))
    log_q_tail = torch.logsumexp(tail_logits, dim=1)
    p_tail = torch.where(has_tail, p_tail, torch.zeros_like(p_tail))
    log_p_tail = torch.log(torch.where(p_tail > 0, p_tail, torch.ones_like(p_tail)))

    kl_rows = _kl_terms(p, log_p, log_q).sum(dim=1) + _kl_terms(p_tail, log_p_tail, log_q_tail)
    return _combine(kl_rows.mean(), student_logits, targets, temperature, alpha)


def topk_teacher_probs(
    topk_values: Tensor, lse: Tensor | None, temperature: float
) -> tuple[Tensor, Tensor]:
    """The teacher's probabilities at its kept classes, and the probability mass left in the tail.

    ``p_i = exp(v_i / T - lse)`` and ``p_tail = max(0, 1 - sum_i p_i)``. With ``lse=None`` the kept
    probabilities are renormalised, ``p = softmax(v / T)`` over the ``k`` values, and the tail mass
    is reported as 0 (the same biased fallback as `kd_loss_topk`).

    Args:
        topk_values: ``(B, k)`` raw teacher logits, any float dtype.
        lse: ``(B,)`` float32 ``logsumexp(teacher_logits / T)`` of the full row, or None.
        temperature: softening temperature ``T > 0``.

    Returns:
        ``(probs, tail)``: ``(B, k)`` float32 kept probabilities and ``(B,)`` float32 tail mass.

    Raises:
        ValueError: on a shape or dtype mismatch or ``temperature <= 0``.
    """
    _check_scalars(temperature, 0.0)
    _check_logits("topk_values", topk_values)
    _check_lse(lse, topk_values.shape[0])
    if lse is None:
        probs = torch.softmax(topk_values.float() / temperature, dim=1)
        return probs, probs.new_zeros(probs.shape[0])
    log_p = topk_values.float() / temperature - lse.float().unsqueeze(1)
    return log_p.exp(), _tail_mass(log_p)


def _kl_terms(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """Elementwise ``p * (log p - log q)`` with ``0 * log 0 = 0``, in the value and the gradient."""
    positive = p > 0
    # Where p == 0, log p may be -inf: substitute 0 *before* the product, so that neither the
    # forward value nor the backward pass (which runs through both torch.where branches) sees nan.
    safe_log_p = torch.where(positive, log_p, torch.zeros_like(log_p))
    safe_log_q = torch.where(positive, log_q, torch.zeros_like(log_q))
    terms = p * (safe_log_p - safe_log_q)
    return torch.where(positive, terms, torch.zeros_like(terms))


def _tail_mass(log_p: Tensor) -> Tensor:
    """``max(0, 1 - sum_i exp(log_p_i))`` per row; ``-expm1`` keeps precision for a tiny tail."""
    return (-torch.expm1(torch.logsumexp(log_p, dim=1))).clamp_min(0.0)


def _hard_loss(student_logits: Tensor, targets: Tensor | None) -> Tensor:
    if targets is None:
        return student_logits[:0].float().sum()  # a zero that is part of the graph
    labelled_mask = targets >= 0
    labels = targets if targets.dtype == torch.int64 else targets.long()
    labels = torch.where(labelled_mask, labels, NO_LABEL)  # -1 and -100 alike
    logits = student_logits if student_logits.dtype == torch.float32 else student_logits.float()
    total = F.cross_entropy(logits, labels, ignore_index=NO_LABEL, reduction="sum")
    labelled = labelled_mask.sum().clamp_min(1)  # a tensor: no host sync on an accelerator
    return total / labelled


def _combine(
    soft: Tensor,
    student_logits: Tensor,
    targets: Tensor | None,
    temperature: float,
    alpha: float,
) -> Tensor:
    return _plus_hard((1.0 - alpha) * temperature**2 * soft, student_logits, targets, alpha)


def _plus_hard(
    soft: Tensor, student_logits: Tensor, targets: Tensor | None, alpha: float
) -> Tensor:
    """`soft` (the scaled soft term) plus ``alpha`` times the hard-label loss, if ``alpha > 0``."""
    if alpha > 0.0:
        return soft + alpha * _hard_loss(student_logits, targets)
    return soft


def _check_scalars(temperature: float, alpha: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"alpha (the weight of the hard-label term) must be in [0, 1], got {alpha!r}"
        )


def _check_logits(name: str, logits: Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"{name} must be 2-D (batch, classes), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {logits.dtype}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(
            f"{name} must have at least one row and one column, got {tuple(logits.shape)}"
        )


def _check_topk(values: Tensor, indices: Tensor, batch: int, num_classes: int) -> None:
    _check_logits("topk_values", values)
    if values.shape[0] != batch:
        raise ValueError(
            f"topk_values has {values.shape[0]} rows but student_logits has {batch}; "
            "the batch sizes must match"
        )
    if values.shape[1] > num_classes:
        raise ValueError(
            f"topk_values keeps k={values.shape[1]} classes but the student has only "
            f"{num_classes}; k must be <= num_classes"
        )
    if indices.shape != values.shape:
        raise ValueError(
            f"topk_indices has shape {tuple(indices.shape)} but topk_values has "
            f"{tuple(values.shape)}; they must match"
        )
    if indices.dtype not in _INDEX_DTYPES:
        raise ValueError(
            f"topk_indices must be an integer tensor (int64 or int32; uint16 is converted), "
            f"got {indices.dtype}"
        )


def _check_lse(lse: Tensor | None, batch: int) -> None:
    if lse is None:
        return
    if lse.shape != (batch,):
        raise ValueError(f"lse must have shape ({batch},), got {tuple(lse.shape)}")
    if not lse.is_floating_point():
        raise ValueError(f"lse must be a floating-point tensor (float32), got {lse.dtype}")


def _check_targets(targets: Tensor | None, batch: int) -> None:
    if targets is None:
        return
    if targets.shape != (batch,):
        raise ValueError(
            f"targets must have shape ({batch},) to match the logits, got {tuple(targets.shape)}"
        )
    if targets.is_floating_point() or targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(
            f"targets must be an integer tensor (int64, negative = no label), got {targets.dtype}"
        )
