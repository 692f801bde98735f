"""Row KD with the teacher's side computed ahead: `teacher_targets`, then `kd_loss_targets`.

`kd_loss_dense` and `kd_loss_topk` compute everything on the training thread: the teacher's
softmax at the temperature, its entropy, the kept-class masks, then the student's side. Only the
student's side depends on the student. A training loop that makes its batches on another thread
or process (`softcache.trainer.ahead.Ahead`, `softcache.trainer.batch_process`) prepares the
teacher's side there, and the step runs only::

    dense:  CE(s / T; P)                              P = softmax(t / T)
    top-k:  CE(s / T; P),  P = p on the kept classes + p_tail * softmax(s / T | tail)

plus the teacher's (constant) negative entropy, so the value is the KL of `kd_loss_dense` /
`kd_loss_topk`. The top-k form is exact, value and gradient: the gradient of the top-k loss with
its tail bin is ``q - P`` with the tail's mass spread over the tail classes in proportion to the
student's own tail (``dKL/dz_j = q_j - p_tail q_j / q_tail``), which is the gradient of a
cross-entropy to ``P`` held constant.

On ``(B, C)`` targets the step computes that value directly, ``sum p log p - sum W log q - p_tail
log q_tail`` with ``q_tail`` summed from ``q`` over the tail classes: a log-softmax, an exp and
four reductions, differentiated by autograd (exact to any order, so a ``create_graph`` backward
works). On a small head every op is a few microseconds of dispatch, and this is about half the
ops of the tail-share form it replaced (a masked softmax, a soft-target cross-entropy, an entropy
correction): `python -m benchmarks.row_loss`. Summing ``q`` is exact while every tail class's
``q_j`` is a normal float32; where some row's tail mass falls under `TAIL_EXACT_BELOW`, and always
off the CPU (where the check would cost a device sync and the extra kernels cost nothing), the
tail's mass is taken in log space (``logsumexp`` over the tail), so a tail the student has no
float32 mass in still gets its gradient, ``p_tail exp(log q_j - log q_tail)``.

On the CPU, where each op a step replays in autograd costs tens of microseconds of dispatch on a
cold cache, the top-k form's gradient ``(S q - P) / T`` (``S = sum P``) is made with its value,
by log_softmax's own backward kernel, in one autograd node (`_GivenGradient`); a create_graph
backward recomputes the loss in autograd's form, so second derivatives stay exact. Where numba
is installed (`softcache[fast]`), value and gradient come from one compiled pass over each row
instead of a dozen ops (`softcache.losses.topk_kernel`), still in that one node.

Dense ``(B, C)`` top-k targets pay off for small batches of small heads, where a step is a few
milliseconds of op overhead; above `DENSE_TOPK_ELEMENTS` per batch the top-k targets stay sparse
and the loss runs the memory-lean kernel (`softcache.losses.sparse.sparse_cross_entropy`) instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from softcache.losses import topk_kernel
from softcache.losses.rows import (
    _check_logits,
    _check_lse,
    _check_scalars,
    _check_topk,
    _combine,
    _plus_hard,
    _tail_mass,
)
from softcache.losses.sparse import sparse_cross_entropy

# Top-k targets are spread into (B, C) tensors up to this many elements per batch, where one
# fused cross-entropy beats the lean kernel's chunk loop (forward + backward, 1 CPU thread: 0.35
# against 0.67 ms at 64 x 100, about even at 64 x 1,000); beyond, they stay (B, k) and the lean
# kernel's fewer full-row passes win (3.2 against 6.7 ms at 256 x 1,000, 18 against 72 ms at
# 512 x 8,192).
DENSE_TOPK_ELEMENTS = 1 << 15

# Below this tail mass a row's tail is summed in log space. Summing ``q`` loses the tail classes
# whose ``q_j`` fall under float32's normal range (2**-126 each, at most C of them): against a sum
# of at least 2**-60 that is a relative error under C * 2**-66, nothing at any head width.
TAIL_EXACT_BELOW = 2.0**-60


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
        tail: ``(B,)`` float32 teacher tail mass (top-k; 0 when every class is kept), else
            None.
        tail_classes: ``(B, C)`` float32, 1 on each row's tail classes (those not kept) and 0
            elsewhere (top-k, dense form, with fewer kept classes than ``C``), else None.
        ids: ``(B, k)`` int64 kept class ids (top-k, sparse form), else None.
        num_classes: ``C``, the classes the targets are over (the student's head width).
    """

    weights: Tensor
    neg_entropy: Tensor
    temperature: float
    tail: Tensor | None = None
    tail_classes: Tensor | None = None
    ids: Tensor | None = None
    num_classes: int = 0

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TeacherTargets:
        """A copy on `device`."""
        return self._mapped(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> TeacherTargets:
        """A copy in pinned host memory (for asynchronous copies to a GPU)."""
        return self._mapped(Tensor.pin_memory)

    def rows(self, index: slice | Tensor) -> TeacherTargets:
        """The targets of some rows: every per-row tensor indexed by `index` along its first
        dimension (a slice gives views, an index tensor copies), in the same form.

        Top-k targets in the sparse form stay so; `for_batch` gives a batch its fastest form.
        """
        return self._mapped(lambda t: t[index])

    def _mapped(self, how: Callable[[Tensor], Tensor]) -> TeacherTargets:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        changes: dict[str, Any] = {k: how(v) for k, v in values.items() if isinstance(v, Tensor)}
        return replace(self, **changes)


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
    neg_entropy = -torch.special.entr(p).sum(dim=1)
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
    return for_batch(topk_rows(values, indices, lse, num_classes, temperature))


@torch.no_grad()
def topk_rows(
    values: Tensor, indices: Tensor, lse: Tensor, num_classes: int, temperature: float
) -> TeacherTargets:
    """`topk_targets` in the sparse form whatever the rows: ``(R, k)`` weights at ``(R, k)`` ids.

    Each row's targets depend on that row alone, bit for bit, so they can be made for many rows
    at once (a read group of the stream, `softcache.trainer.row_labels.RowBlocks`) and sliced
    into batches (`TeacherTargets.rows`, then `for_batch`): a few ops per group instead of a
    dozen per batch. Arguments as `topk_targets`.
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
    has_tail = ids.shape[1] < num_classes  # else every class is kept: no tail term
    tail = _tail_mass(log_p) if has_tail else p.new_zeros(p.shape[0])
    neg_entropy = -torch.special.entr(p).sum(dim=1) - torch.special.entr(tail)
    return TeacherTargets(p, neg_entropy, temperature, tail=tail, ids=ids, num_classes=num_classes)


@torch.no_grad()
def dense_form(rows: int, num_classes: int) -> bool:
    """Whether `for_batch` spreads top-k targets of `rows` rows over `num_classes` classes into
    ``(B, C)`` tensors (at most `DENSE_TOPK_ELEMENTS` elements), where the compiled top-k
    kernel computes their loss on the CPU."""
    return rows * num_classes <= DENSE_TOPK_ELEMENTS


def for_batch(targets: TeacherTargets) -> TeacherTargets:
    """A batch's targets in the form `kd_loss_targets` runs fastest: top-k targets of at most
    `DENSE_TOPK_ELEMENTS` (batch x classes) spread into ``(B, C)`` tensors, others as they are.
    """
    ids = targets.ids
    if ids is None or not dense_form(ids.shape[0], targets.num_classes):
        return targets
    p = targets.weights
    weights = p.new_zeros(p.shape[0], targets.num_classes).scatter_(1, ids, p)
    has_tail = ids.shape[1] < targets.num_classes
    tail_classes = torch.ones_like(weights).scatter_(1, ids, 0.0) if has_tail else None
    return replace(targets, weights=weights, tail_classes=tail_classes, ids=None)


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
        A float32 scalar (float64 for float64 logits).

    Raises:
        ValueError: ``alpha`` outside ``[0, 1]``, or targets of another batch or class count.
    """
    temperature = targets.temperature
    # The step's hot path: one comparison chain and one shape test, the messages only on failure
    # (on this machine's cold caches each Python-level check and no-op `.to` cost microseconds).
    if not (0.0 <= alpha <= 1.0 and 0.0 < temperature < math.inf):
        _check_scalars(temperature, alpha)
    rows = targets.weights.shape[0]
    shape = student_logits.shape
    if len(shape) != 2 or shape[0] != rows or shape[1] != targets.num_classes:
        _check_batch(shape, rows, targets.num_classes)
    if targets.ids is None:  # (B, C) targets: the KL itself, differentiated by autograd
        soft = _dense_form_kl(student_logits, targets, (1.0 - alpha) * temperature**2 / rows)
        return _plus_hard(soft, student_logits, hard_targets, alpha)
    assert targets.tail is not None  # top-k, sparse form: the lean kernel
    cross = sparse_cross_entropy(
        student_logits, targets.ids, targets.weights, targets.tail, temperature=temperature
    )
    soft = (cross + targets.neg_entropy).mean()
    return _combine(soft, student_logits, hard_targets, temperature, alpha)


def _check_batch(shape: torch.Size, rows: int, num_classes: int) -> None:
    """Raise the ValueError for student logits of `shape` against targets of `rows` x `num_classes`."""
    if len(shape) != 2 or shape[0] != rows:
        raise ValueError(
            f"student_logits has shape {tuple(shape)}, the targets are for a batch of {rows} rows"
        )
    raise ValueError(f"the targets are over {num_classes} classes, the student has {shape[1]}")


def _dense_form_kl(student_logits: Tensor, targets: TeacherTargets, scale: float) -> Tensor:
    """``scale * sum_b KL_b`` from ``(B, C)`` targets (module docstring), in float32 (float64
    logits: float64). Dot products over the flattened batch, not products and sums: fewer ops,
    forward and backward."""
    z = student_logits if student_logits.dtype in _COMPUTE_DTYPES else student_logits.float()
    if targets.tail_classes is not None and z.is_cpu and z.requires_grad:
        kl = _tail_kl_with_its_gradient(z, targets, scale)
        if kl is not None:
            return kl
    return _autograd_form_kl(z, targets, scale)


def _autograd_form_kl(z: Tensor, targets: TeacherTargets, scale: float) -> Tensor:
    """`_dense_form_kl` of float32 or float64 logits, differentiated by autograd."""
    dtype = z.dtype
    if targets.temperature != 1.0:
        z = z * (1.0 / targets.temperature)
    log_q = torch.log_softmax(z, dim=1)
    cross = torch.vdot(_as(targets.weights, dtype).reshape(-1), log_q.reshape(-1))
    tail, tail_classes = targets.tail, targets.tail_classes
    if tail_classes is not None:
        assert tail is not None
        tail, tail_classes = _as(tail, dtype), _as(tail_classes, dtype)
        q_tail = torch.linalg.vecdot(log_q.exp(), tail_classes) if log_q.is_cpu else None
        if q_tail is not None and float(q_tail.detach().min()) >= TAIL_EXACT_BELOW:
            cross = cross + torch.vdot(tail, q_tail.log())
        else:  # log space; a row's tail is never empty
            log_q_tail = torch.logsumexp(log_q + torch.log(tail_classes), dim=1)
            cross = cross + torch.vdot(tail, torch.where(tail > 0, log_q_tail, 0.0))
    # ``scale * (sum p log p - cross)`` as one add: autograd records one node where a
    # subtraction, a division by B and a product by (1 - alpha) T^2 recorded three.
    return torch.add(_as(targets.neg_entropy, dtype).sum() * scale, cross, alpha=-scale)


def _tail_kl_with_its_gradient(z: Tensor, targets: TeacherTargets, scale: float) -> Tensor | None:
    """`_autograd_form_kl` of top-k targets on the CPU, its gradient computed with its value;
    None where some row's tail needs the log-space form (`TAIL_EXACT_BELOW`) and the compiled
    kernel is not there to take it.

    Autograd would replay a node for each of the value's dozen ops; this gradient is a few ops,
    made while the forward's tensors are at hand. In the fast student's steps (64 x 100, top-5,
    the benchmark's steps interleaved one by one) that took the top-k loss from +137 to +89 µs
    over the hard loss's forward and backward (benchmarks/README.md, eleventh pass); making it
    with log_softmax's backward kernel, and handing it out without a product by a unit upstream,
    from +167 to +89 µs in another set of rounds (twelfth pass, `benchmarks.loss_steps`). Where
    numba is installed, value and gradient come from one compiled pass instead
    (`softcache.losses.topk_kernel`: fourteenth pass).
    """
    if not torch.is_grad_enabled():
        return None
    assert targets.tail is not None and targets.tail_classes is not None
    compiled = topk_kernel.topk_kl(
        z,
        targets.weights,
        targets.tail_classes,
        targets.tail,
        targets.neg_entropy,
        targets.temperature,
        scale,
        TAIL_EXACT_BELOW,
    )
    if compiled is not None:
        value, grad = compiled
        return _GivenGradient.apply(z, value, grad, targets, scale)
    dtype = z.dtype
    inverse_t = 1.0 / targets.temperature
    with torch.no_grad():
        log_q = torch.log_softmax(z if targets.temperature == 1.0 else z * inverse_t, dim=1)
        weights, tail = _as(targets.weights, dtype), _as(targets.tail, dtype)
        in_tail = log_q.exp().mul_(_as(targets.tail_classes, dtype))
        q_tail = in_tail.sum(dim=1)
        if float(q_tail.min()) < TAIL_EXACT_BELOW:
            return None
        cross = torch.vdot(weights.reshape(-1), log_q.reshape(-1)) + torch.vdot(tail, q_tail.log())
        # d(sum p log p - cross)/dz = (S q - P) / T: P the targets with the tail's mass spread as
        # the student's tail is (module docstring), S = sum P. log_softmax's own backward kernel
        # makes ``P - S q`` from P in one pass (``g - exp(log_q) * sum g``), as autograd's form
        # does (the two agree to float32 rounding), in fewer ops than spelling it out.
        spread = torch.addcmul(weights, in_tail, (tail / q_tail).unsqueeze(1))
        if _log_softmax_backward is not None:
            grad = _log_softmax_backward(spread, log_q, 1, dtype)
        else:  # the same, spelt out
            grad = spread.sub_(log_q.exp().mul_(spread.sum(dim=1, keepdim=True)))
        grad.mul_(-scale * inverse_t)
        # As `_autograd_form_kl` adds it, so the two forms' values agree bit for bit.
        value = torch.add(_as(targets.neg_entropy, dtype).sum() * scale, cross, alpha=-scale)
    return _GivenGradient.apply(z, value, grad, targets, scale)


class _GivenGradient(torch.autograd.Function):
    """The loss's `value` (made beforehand, not differentiated) with its gradient in `z`
    (`grad`, made with it).

    The first backward hands that gradient out, as it is for a unit upstream (no product), and
    lets go of it, so nothing here reads it again whatever the caller does with it (a hook or a
    caller of `torch.autograd.grad` may change it in place). A later backward of a kept graph
    (`retain_graph=True`), and a create_graph backward (a gradient penalty: second derivatives
    exact), recompute the loss in autograd's form from `z`.
    """

    @staticmethod
    def forward(
        ctx: Any, z: Tensor, value: Tensor, grad: Tensor, targets: TeacherTargets, scale: float
    ) -> Tensor:
        # The targets as saved tensors, not as an attribute: a backward frees them, so a loss
        # kept after it (a list of losses for logging) does not hold its batch's memory (the
        # batch process's slot) as autograd's own form would not.
        ctx.save_for_backward(
            z, targets.weights, targets.neg_entropy, targets.tail, targets.tail_classes
        )
        ctx.given = grad
        ctx.temperature, ctx.num_classes, ctx.scale = (
            targets.temperature, targets.num_classes, scale,
        )  # fmt: skip
        # Not `value` itself: an input returned as it is comes out as a view, and a caller's
        # in-place op on the loss (`loss /= accumulation_steps`) would then be refused.
        return value.detach()

    @staticmethod
    def backward(ctx: Any, upstream: Tensor) -> tuple[Tensor | None, ...]:
        given, ctx.given = ctx.given, None
        if given is not None and not torch.is_grad_enabled():
            if upstream.numel() != 1 or float(upstream) != 1.0:
                given = given * upstream
            return given, None, None, None, None
        z, weights, neg_entropy, tail, tail_classes = ctx.saved_tensors
        targets = TeacherTargets(
            weights, neg_entropy, ctx.temperature, tail=tail, tail_classes=tail_classes,
            num_classes=ctx.num_classes,
        )  # fmt: skip
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            kl = _autograd_form_kl(z, targets, ctx.scale)
        (grad,) = torch.autograd.grad(kl, z, upstream, create_graph=create_graph)
        return grad, None, None, None, None


# log_softmax's backward kernel, ``g - exp(out) * sum g`` (private, with this signature since torch
# 1.11); a torch without it gets the same gradient from three ops.
_log_softmax_backward: Callable[..., Tensor] | None = getattr(
    torch, "_log_softmax_backward_data", None
)

# The dtypes the dense form computes in as they come; any other float is widened to float32.
_COMPUTE_DTYPES = (torch.float32, torch.float64)


def _as(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """`tensor` in `dtype`, without a call where it is in it already."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
