"""Row KD with the teacher's side computed ahead: `teacher_targets`, then `kd_loss_targets`.

`kd_loss_dense` and `kd_loss_topk` compute everything on the training thread: the teacher's
softmax at the temperature, its entropy, the kept-class masks, then the student's side. Only the
student's side depends on the student. A training loop that makes its batches on another thread
(`softcache.trainer.ahead.Ahead`) prepares the teacher's side there, and the step runs only::

    dense:  CE(s / T; P)                              P = softmax(t / T)
    top-k:  CE(s / T; P),  P = p on the kept classes + p_tail * softmax(s / T | tail)

plus the teacher's (constant) negative entropy, so the value is the KL of `kd_loss_dense` /
`kd_loss_topk`. The top-k form is exact, value and gradient: the gradient of the top-k loss with
its tail bin is ``q - P`` with the tail's mass spread over the tail classes in proportion to the
student's own tail (``dKL/dz_j = q_j - p_tail q_j / q_tail``), which is the gradient of a
cross-entropy to ``P`` held constant; that cross-entropy exceeds the tail-bin cross-entropy by
``p_tail * H(softmax(s / T | tail))``, subtracted without gradient. One fused cross-entropy, a masked
softmax and two small no-grad terms replace the tail bin's dozen ops: on a 3 ms CPU step the
top-k loss went from 1.15-1.30 to 1.00 of a hard-label step (`benchmarks/train.py`).

Dense ``(B, C)`` top-k targets pay off for small batches of small heads, where a step is a few
milliseconds of op overhead; above `DENSE_TOPK_ELEMENTS` per batch the top-k targets stay sparse
and the loss runs the memory-lean kernel (`softcache.losses.sparse.sparse_cross_entropy`) instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from softcache.losses.rows import (
    _check_logits,
    _check_lse,
    _check_scalars,
    _check_topk,
    _combine,
    _tail_mass,
)
from softcache.losses.sparse import sparse_cross_entropy

# Top-k targets are spread into (B, C) tensors up to this many elements per batch, where one
# fused cross-entropy beats the lean kernel's chunk loop (forward + backward, 1 CPU thread: 0.35
# against 0.67 ms at 64 x 100, about even at 64 x 1,000); beyond, they stay (B, k) and the lean
# kernel's fewer full-row passes win (3.2 against 6.7 ms at 256 x 1,000, 18 against 72 ms at
# 512 x 8,192).
DENSE_TOPK_ELEMENTS = 1 << 15


@dataclass(frozen=True)
class TeacherTargets:
    """The teacher's side of a row KD loss at one temperature, made before the student's pass.

    Attributes:
        weights: ``(B, C)`` float32 teacher probabilities over every class (dense stores), or on
            the kept classes and 0 elsewhere (top-k, dense form); ``(B, k)`` at ``ids`` (top-k,
            sparse form).
        neg_entropy: ``(B,)`` float32 ``sum p log p`` over the teacher's bins (the ``k`` kept
            classes and the tail for top-k).
        temperature: the temperature ``T`` the weights are at.
        tail: ``(B, 1)`` float32 teacher tail mass (top-k; 0 for a row with an empty tail), else
            None.
        kept: ``(B, C)`` bool, the kept classes of rows whose tail is not empty (top-k, dense
            form), else None.
        ids: ``(B, k)`` int64 kept class ids (top-k, sparse form), else None.
        num_classes: ``C``, the classes the targets are over (the student's head width).
    """

    weights: Tensor
    neg_entropy: Tensor
    temperature: float
    tail: Tensor | None = None
    kept: Tensor | None = None
    ids: Tensor | None = None
    num_classes: int = 0

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TeacherTargets:
        """A copy on `device`."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            if isinstance(getattr(self, f.name), Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        }
        return TeacherTargets(**moved)


@torch.no_grad()
def dense_targets(teacher_logits: Tensor, temperature: float) -> TeacherTargets:
    """`kd_loss_dense`'s teacher side: ``softmax(t / T)`` and its negative entropy.

    Args:
        teacher_logits: ``(B, C)`` any float dtype (computed in float32).
        temperature: ``T > 0``.
    """
    _check_scalars(temperature, 0.0)
    _check_logits("teacher_logits", teacher_logits)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    p = log_p.exp()
    neg_entropy = torch.where(p > 0, p * log_p, 0.0).sum(dim=1)
    return TeacherTargets(
        weights=p, neg_entropy=neg_entropy, temperature=temperature, num_classes=p.shape[1]
    )


@torch.no_grad()
def topk_targets(
    values: Tensor, indices: Tensor, lse: Tensor, num_classes: int, temperature: float
) -> TeacherTargets:
    """`kd_loss_topk`'s teacher side (with a normaliser): kept probabilities, tail, entropy.

    Args:
        values: ``(B, k)`` raw teacher logits at the kept classes, any float dtype.
        indices: ``(B, k)`` their class ids, distinct within a row, any integer dtype.
        lse: ``(B,)`` ``logsumexp(t / T)`` of the full rows at ``temperature``.
        num_classes: ``C``, the student's number of classes.
        temperature: ``T > 0``.
    """
    _check_scalars(temperature, 0.0)
    _check_topk(values, indices, values.shape[0], num_classes)
    _check_lse(lse, values.shape[0])
    ids = indices.long()
    if ids.device.type == "cpu" and ids.numel() and int(ids.max()) >= num_classes:
        raise ValueError(
            f"topk_indices hold class {int(ids.max())} but the student has {num_classes} "
            "classes; the store's teacher had more classes than this student"
        )
    log_p = values.float() / temperature - lse.float().unsqueeze(1)
    p = log_p.exp()
    has_tail = torch.full((p.shape[0],), ids.shape[1] < num_classes, device=p.device)
    tail = torch.where(has_tail, _tail_mass(log_p), 0.0)
    neg_entropy = torch.where(p > 0, p * log_p, 0.0).sum(dim=1) + torch.where(
        tail > 0, tail * torch.log(torch.where(tail > 0, tail, 1.0)), 0.0
    )
    if p.shape[0] * num_classes > DENSE_TOPK_ELEMENTS:
        return TeacherTargets(
            p, neg_entropy, temperature, tail=tail.unsqueeze(1), ids=ids, num_classes=num_classes
        )
    weights = p.new_zeros(p.shape[0], num_classes).scatter_(1, ids, p)
    kept = torch.zeros_like(weights, dtype=torch.bool).scatter_(1, ids, True)
    kept &= has_tail.unsqueeze(1)  # a row with no tail masks nothing: its tail term is 0
    return TeacherTargets(
        weights, neg_entropy, temperature, tail=tail.unsqueeze(1), kept=kept,
        num_classes=num_classes,
    )  # fmt: skip


def kd_loss_targets(
    student_logits: Tensor,
    targets: TeacherTargets,
    hard_targets: Tensor | None,
    *,
    alpha: float = 0.0,
) -> Tensor:
    """The KD loss of `kd_loss_dense` / `kd_loss_topk` from prepared teacher targets.

    ``loss = alpha * CE(s, y) + (1 - alpha) * T^2 * KL``, KL averaged over the batch (see the
    module docstring for the top-k form).

    Args:
        student_logits: ``(B, C)`` any float dtype.
        targets: from `dense_targets` or `topk_targets`, on the student's device.
        hard_targets: ``(B,)`` integer labels, negative for "no label"; or None.
        alpha: weight of the hard-label term, in ``[0, 1]``.

    Returns:
        A float32 scalar.

    Raises:
        ValueError: ``alpha`` outside ``[0, 1]``, or targets of another batch or class count.
    """
    temperature = targets.temperature
    _check_scalars(temperature, alpha)
    rows = targets.weights.shape[0]
    if student_logits.ndim != 2 or student_logits.shape[0] != rows:
        raise ValueError(
            f"student_logits has shape {tuple(student_logits.shape)}, the targets are for a "
            f"batch of {rows} rows"
        )
    if targets.num_classes != student_logits.shape[1]:
        raise ValueError(
            f"the targets are over {targets.num_classes} classes, the student has "
            f"{student_logits.shape[1]}"
        )
    correction: Tensor | float = 0.0
    if targets.ids is not None:  # top-k, sparse form: the lean kernel
        assert targets.tail is not None
        cross = sparse_cross_entropy(
            student_logits, targets.ids, targets.weights, targets.tail[:, 0],
            temperature=temperature,
        )  # fmt: skip
    else:
        z = student_logits.float()
        if temperature != 1.0:
            z = z / temperature
        weights = targets.weights
        if targets.kept is not None:
            assert targets.tail is not None
            with torch.no_grad():
                tail_share = torch.softmax(z.masked_fill(targets.kept, -math.inf), dim=1)
                weights = torch.addcmul(weights, tail_share, targets.tail)
                correction = targets.tail[:, 0] * torch.special.entr(tail_share).sum(dim=1)
        cross = F.cross_entropy(z, weights, reduction="none")
    soft = (cross - correction + targets.neg_entropy).mean()
    return _combine(soft, student_logits, hard_targets, temperature, alpha)
