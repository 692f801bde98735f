"""The memory-lean kernel under the per-token KD losses: cross-entropy to a sparse teacher.

A per-token loss over a stored support (top-k with its tail bin, or sampled ids) needs the
student's log-softmax only at ``k + 1`` points per token, yet the plain autograd form builds
several full ``(T, V)`` float32 tensors (the log-softmax, a kept mask, the masked tail, and as many
again in the backward): at ``V = 131,072`` and ``T = 8,192`` each is 4 GiB, which is how the
loss itself runs a GPU out of memory (DistillKit issue 24, unsloth 11554, verl 6593).

`sparse_cross_entropy` is a `torch.autograd.Function` that walks the tokens in chunks of about
``CHUNK_ELEMENTS`` logits. The forward keeps, per token, only the log-sum-exps it needs (of the
whole row and of its tail); the backward recomputes the chunk's softmax and writes the gradient
straight into the one ``(T, V)`` gradient tensor autograd needs anyway. With ``z = s / tau``,
``q = softmax(z)`` and teacher weights ``p_i`` on the support and ``p_r`` on the tail bin::

    CE = -sum_i p_i log q_i - p_r log q_r,   q_r = sum_{j in tail} q_j
    dCE/dz_j = m_j q_j - p_j,   m_j = 1 on the support, 1 - p_r / q_r on the tail

(``p_j = 0`` off the support): the ``m * p_student - q_teacher`` form of verl's fused KD loss. Its
peak memory beyond the student's logits is the gradient plus one chunk, where ``F.cross_entropy``
keeps a saved ``(T, V)`` log-softmax as well (`benchmarks/loss.py` measures both). The tail factor
is applied in log space, ``exp(z - L + log|1 - p_r / q_r|)``, so a tail whose student mass
underflows float32 still gets its (large) gradient instead of ``0 * inf``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

# Logits per chunk: 2**21 float32 (8 MiB; 16 tokens at V = 131,072). Chunks that fit in the
# caches keep the forward's and backward's few passes over a chunk cheap on a CPU; on a GPU
# the per-chunk launches stay under a millisecond at this size (`benchmarks/loss.py`).
CHUNK_ELEMENTS = 2**21

# Below this tail sum (relative to the row maximum's exp(0) = 1), the forward recomputes the
# row's tail log-sum-exp around the tail's own maximum: float32 subnormals lose digits below
# 2**-126, and a tail 100 nats under the top has lost every one of them.
_TAIL_RECOMPUTE = 2.0**-60


def sparse_cross_entropy(
    student_logits: Tensor,
    ids: Tensor,
    weights: Tensor,
    tail_weight: Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
) -> Tensor:
    """Per-token cross-entropy of the student to a teacher known on a support, plus a tail bin.

    ``CE_t = -sum_i w_ti log q_t[ids_ti] - w_tr log q_tr`` with ``q_t = softmax(s_t / tau)`` and
    ``q_tr`` the student's mass off the support (the term is left out where ``w_tr = 0``). The
    gradient flows to ``student_logits`` only (the teacher's weights are constants).

    Args:
        student_logits: ``(T, V)`` any float dtype; its gradient has the same dtype.
        ids: ``(T, k)`` integer ids. With ``tail_weight`` they must be distinct within a row (the
            tail is every other id); without it, repeated ids with weight 0 (padding) are fine.
        weights: ``(T, k)`` teacher probabilities at ``ids`` (``c / D`` for sampled counts).
        tail_weight: ``(T,)`` the teacher's mass off the support, or None for no tail bin.
        temperature: ``tau``, dividing the student's logits.
        chunk_rows: tokens per chunk (default: ``CHUNK_ELEMENTS / V``, at least 1).

    Returns:
        ``(T,)`` float32 per-token cross-entropies (not scaled by ``tau^2``); float64 for
        float64 logits (which the kernel then computes in, for `torch.autograd.gradcheck`).
    """
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // max(student_logits.shape[1], 1))
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    if tail_weight is not None:
        tail_weight = tail_weight.to(dtype)
    out: Tensor = _SparseCrossEntropy.apply(
        student_logits, ids.long(), weights.to(dtype), tail_weight, temperature, chunk_rows
    )
    return out


class _SparseCrossEntropy(torch.autograd.Function):
    """`sparse_cross_entropy`'s forward and backward, chunked over tokens."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        ids: Tensor,
        weights: Tensor,
        tail_weight: Tensor | None,
        temperature: float,
        chunk_rows: int,
    ) -> Tensor:
        rows, vocab = logits.shape
        tail = tail_weight is not None
        dtype = weights.dtype
        lse = logits.new_empty(rows, dtype=dtype)
        log_q_kept = weights.new_empty(ids.shape)
        log_q_tail = logits.new_full((rows,), -math.inf, dtype=dtype)
        buffer = logits.new_empty((min(chunk_rows, rows), vocab), dtype=dtype)
        for a in range(0, rows, chunk_rows):
            b = min(a + chunk_rows, rows)
            if temperature == 1.0 and logits.dtype == dtype:  # z - max in one pass, no copy
                z = logits[a:b]
                kept = z.gather(1, ids[a:b])
                top = z.amax(dim=1, keepdim=True)
                z = torch.sub(z, top, out=buffer[: b - a])
            else:
                z = _scaled(logits[a:b], temperature, buffer[: b - a])
                kept = z.gather(1, ids[a:b])
                top = z.amax(dim=1, keepdim=True)
                z.sub_(top)
            z.exp_()
            whole = z.sum(dim=1)
            lse[a:b] = top.squeeze(1) + whole.log()
            log_q_kept[a:b] = kept - lse[a:b, None]
            if tail:
                tail_sum = z.scatter_(1, ids[a:b], 0.0).sum(dim=1)
                log_q_tail[a:b] = top.squeeze(1) + tail_sum.log() - lse[a:b]
                faint = torch.nonzero(tail_sum < _TAIL_RECOMPUTE).squeeze(1)
                if len(faint) and vocab > ids.shape[1]:
                    exact = _scaled(logits[a:b][faint], temperature, None, dtype)
                    exact.scatter_(1, ids[a:b][faint], -math.inf)
                    log_q_tail[a + faint] = torch.logsumexp(exact, dim=1) - lse[a + faint]
        ce = -_weighted(weights, log_q_kept).sum(dim=1)
        if tail:
            assert tail_weight is not None
            ce = ce - _weighted(tail_weight[:, None], log_q_tail[:, None]).squeeze(1)
        ctx.save_for_backward(logits, ids, weights, lse, log_q_kept, log_q_tail, tail_weight)
        ctx.temperature, ctx.chunk_rows, ctx.tail = temperature, chunk_rows, tail
        return ce

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:
        logits, ids, weights, lse, log_q_kept, log_q_tail, tail_weight = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        tau, chunk_rows = ctx.temperature, ctx.chunk_rows
        rows, vocab = logits.shape
        dtype = weights.dtype
        scale = grad_out.to(dtype) / tau  # dCE/ds = dCE/dz / tau
        shift, sign = lse, torch.ones_like(lse)
        if ctx.tail:
            # Tail factor m = 1 - p_r / q_r, applied as exp(z - L + log|m|) * sign(m).
            ratio = torch.where(tail_weight > 0, tail_weight.log() - log_q_tail, -math.inf)
            log_m = torch.where(
                ratio < 0,
                torch.log1p(-ratio.exp()),
                ratio + torch.log1p(-(-ratio).exp()),
            )
            shift, sign = lse - log_m, torch.where(ratio > 0, -1.0, 1.0)
        grad = torch.empty_like(logits)
        direct = logits.dtype == dtype and logits.is_contiguous()
        buffer = None if direct else logits.new_empty((min(chunk_rows, rows), vocab), dtype=dtype)
        for a in range(0, rows, chunk_rows):
            b = min(a + chunk_rows, rows)
            out = grad[a:b] if direct else buffer[: b - a]  # type: ignore[index]
            if direct and tau == 1.0:  # z - L in one pass (the same values as copy, then sub)
                g = torch.sub(logits[a:b], shift[a:b, None], out=out)
            else:
                g = _scaled(logits[a:b], tau, out).sub_(shift[a:b, None])
            g.exp_().mul_((sign[a:b] * scale[a:b])[:, None])
            row_scale = scale[a:b, None]
            if ctx.tail:  # on the support m = 1: q_i - p_i, overwriting the tail's factor
                g.scatter_(1, ids[a:b], (log_q_kept[a:b].exp() - weights[a:b]) * row_scale)
            else:
                g.scatter_add_(1, ids[a:b], -weights[a:b] * row_scale)
            if not direct:
                grad[a:b] = g
        return grad, None, None, None, None, None


def _scaled(
    logits: Tensor, temperature: float, out: Tensor | None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``logits / tau`` written into ``out`` (a fresh ``dtype`` tensor when None)."""
    if out is None:
        out = torch.empty(logits.shape, dtype=dtype, device=logits.device)
    if temperature != 1.0 and logits.dtype == out.dtype:
        # One pass, the same values as copy then divide (a narrower dtype is widened first, so
        # that the division runs in float32, not in the logits' dtype).
        return torch.div(logits, temperature, out=out)
    out.copy_(logits)
    if temperature != 1.0:
        out.div_(temperature)
    return out


def _weighted(weights: Tensor, log_q: Tensor) -> Tensor:
    """``w * log q`` with ``0 * log 0 = 0`` (a zero weight never meets a ``-inf``)."""
    return torch.where(weights > 0, weights * log_q, 0.0)
