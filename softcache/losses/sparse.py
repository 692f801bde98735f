"""The memory-lean kernel under the per-token KD losses: cross-entropy to a sparse teacher.

A per-token loss over a stored support (top-k with its tail bin, or sampled ids) needs the
student's log-softmax only at ``k + 1`` points per token, yet the plain autograd form builds
several full ``(T, V)`` float32 tensors (the log-softmax, a kept mask, the masked tail, and as many
again in the backward): at ``V = 131,072`` and ``T = 8,192`` each is 4 GiB, which is how the
loss itself runs a GPU out of memory (DistillKit issue 24, unsloth 11554, verl 6593).

`sparse_cross_entropy` is a `torch.autograd.Function` that walks the tokens in chunks of about
``CHUNK_ELEMENTS`` logits. The forward keeps, per token, only the log-sum-exps it needs (of the
whole row and of its tail); the backward recomputes each chunk's softmax and writes the gradient
into the one ``(T, V)`` gradient tensor autograd needs anyway. Tokens that fit in one chunk keep
the forward's softmax instead, which the backward turns into the gradient in place: no second
softmax and no second ``(T, V)`` allocation. Each softmax is torch's fused one (on a CPU it costs
less than torch's ``exp`` alone). With ``z = s / tau``,
``q = softmax(z)`` and teacher weights ``p_i`` on the support and ``p_r`` on the tail bin::

    CE = -sum_i p_i log q_i - p_r log q_r,   q_r = sum_{j in tail} q_j
    dCE/dz_j = m_j q_j - p_j,   m_j = 1 on the support, 1 - p_r / q_r on the tail

(``p_j = 0`` off the support): the ``m * p_student - q_teacher`` form of verl's fused KD loss. Its
peak memory beyond the student's logits is the gradient plus a chunk or two (the softmax's, and
the scaled logits' at ``tau != 1``), where ``F.cross_entropy`` keeps a saved ``(T, V)``
log-softmax as well (`benchmarks/loss.py` measures both). Rows whose tail the student gives
under ``2^-60`` of its mass take the tail factor in log space,
``exp(z - L + log|1 - p_r / q_r|)``, so a tail whose student mass underflows float32 still gets
its (large) gradient instead of ``0 * inf``.
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

# Below this tail mass (of the student's softmax), the forward recomputes the row's tail
# log-sum-exp around the tail's own maximum, and the backward the row's tail gradient in log
# space: float32 subnormals lose digits below 2**-126, and a tail 100 nats under the top has lost
# every one of them. Above it, a tail's largest entries (at least 2**-60 / V) are normal floats.
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
        faint_rows: list[Tensor] = []
        buffer = (
            None if _as_is(logits, temperature, dtype) else _chunk_buffer(logits, chunk_rows, dtype)
        )
        softmax = _chunk_buffer(logits, chunk_rows, dtype)
        # scatter_ from a tensor of zeros runs several times faster on a CPU than from a scalar.
        zeros = weights.new_zeros((min(chunk_rows, rows), ids.shape[1]))
        for a in range(0, rows, chunk_rows):
            b = min(a + chunk_rows, rows)
            z = _chunk(logits, a, b, temperature, buffer)
            # The row's log-sum-exp comes back from q's largest entry (exp(0) / sum = 1 / sum).
            q = _softmax_into(z, softmax[: b - a])
            lse[a:b] = z.amax(dim=1) - q.amax(dim=1).log()
            log_q_kept[a:b] = z.gather(1, ids[a:b]) - lse[a:b, None]
            if tail:
                # q with the support zeroed is the tail's part of the backward's softmax: the
                # backward overwrites the support anyway.
                tail_sum = q.scatter_(1, ids[a:b], zeros[: b - a]).sum(dim=1)
                log_q_tail[a:b] = tail_sum.log()
                faint = torch.nonzero(tail_sum < _TAIL_RECOMPUTE).squeeze(1)
                if len(faint) and vocab > ids.shape[1]:
                    exact = _scaled(logits[a:b][faint], temperature, None, dtype)
                    exact.scatter_(1, ids[a:b][faint], -math.inf)
                    log_q_tail[a + faint] = torch.logsumexp(exact, dim=1) - lse[a + faint]
                    faint_rows.append(a + faint)
        ce = -_weighted(weights, log_q_kept).sum(dim=1)
        if tail:
            assert tail_weight is not None
            ce = ce - _weighted(tail_weight[:, None], log_q_tail[:, None]).squeeze(1)
        # One chunk's softmax is kept for the backward, which turns it into the gradient in
        # place: no recomputation and no second (T, V) allocation (whose fresh pages cost a CPU
        # more than the arithmetic). It is at most CHUNK_ELEMENTS, the size of the chunk buffer
        # the backward would otherwise need; more chunks are recomputed. Kept on ctx rather than
        # saved, because the backward consumes it (a second backward recomputes it, bit for bit).
        ctx.kept_q = softmax if rows <= chunk_rows and ctx.needs_input_grad[0] else None
        faint_all = torch.cat(faint_rows) if faint_rows else ids.new_empty(0)
        ctx.save_for_backward(
            logits, ids, weights, lse, log_q_kept, log_q_tail, tail_weight, faint_all
        )
        ctx.temperature, ctx.chunk_rows, ctx.tail = temperature, chunk_rows, tail
        return ce

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:
        logits, ids, weights, lse, log_q_kept, log_q_tail, tail_weight, faint = ctx.saved_tensors
        kept_q, ctx.kept_q = ctx.kept_q, None
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        tau, chunk_rows = ctx.temperature, ctx.chunk_rows
        rows, dtype = logits.shape[0], weights.dtype
        scale = grad_out.to(dtype) / tau  # dCE/ds = dCE/dz / tau
        factor, ratio = scale, None
        if ctx.tail:
            # The tail's factor m = 1 - p_r / q_r (rows whose tail underflowed: `faint`, below).
            ratio = torch.where(tail_weight > 0, tail_weight.log() - log_q_tail, -math.inf)
            factor = -torch.expm1(ratio) * scale

        def chunk_gradient(q: Tensor, a: int, b: int) -> Tensor:
            """``m * q * scale`` over rows ``[a, b)``, in place of their softmax ``q``."""
            g = q.mul_(factor[a:b, None])
            row_scale = scale[a:b, None]
            if ctx.tail:  # on the support m = 1: q_i - p_i, overwriting the tail's factor
                return g.scatter_(1, ids[a:b], (log_q_kept[a:b].exp() - weights[a:b]) * row_scale)
            return g.scatter_add_(1, ids[a:b], -weights[a:b] * row_scale)

        if kept_q is not None:
            grad = chunk_gradient(kept_q, 0, rows).to(logits.dtype)
        else:
            grad = torch.empty_like(logits)
            buffer = (
                None if _as_is(logits, tau, dtype) else _chunk_buffer(logits, chunk_rows, dtype)
            )
            # Each chunk's softmax is written where its gradient goes (or, for a narrower or
            # strided gradient, into one chunk buffer and copied).
            direct = logits.dtype == dtype and logits.is_contiguous()
            out = grad if direct else _chunk_buffer(logits, chunk_rows, dtype)
            for a in range(0, rows, chunk_rows):
                b = min(a + chunk_rows, rows)
                where = out[a:b] if direct else out[: b - a]
                g = chunk_gradient(_softmax_into(_chunk(logits, a, b, tau, buffer), where), a, b)
                if not direct:
                    grad[a:b] = g
        if len(faint):
            assert ratio is not None
            grad[faint] = _faint_tail_rows(
                logits[faint],
                ids[faint],
                weights[faint],
                log_q_kept[faint],
                lse[faint],
                ratio[faint],
                scale[faint],
                tau,
            ).to(grad.dtype)
        return grad, None, None, None, None, None


def _softmax_into(z: Tensor, out: Tensor) -> Tensor:
    """``softmax(z, dim=1)`` written into ``out`` (same shape and dtype): torch's fused softmax,
    which on a CPU costs less than its ``exp`` alone, without a new tensor for each chunk."""
    return torch._softmax(z, 1, False, out=out)


def _as_is(logits: Tensor, temperature: float, dtype: torch.dtype) -> bool:
    """Whether the chunks are the logits themselves (no scaling, no widening copy)."""
    return temperature == 1.0 and logits.dtype == dtype


def _chunk_buffer(logits: Tensor, chunk_rows: int, dtype: torch.dtype) -> Tensor:
    """One chunk's worth of scaled (or widened) logits."""
    return logits.new_empty((min(chunk_rows, logits.shape[0]), logits.shape[1]), dtype=dtype)


def _chunk(logits: Tensor, a: int, b: int, temperature: float, buffer: Tensor | None) -> Tensor:
    """Rows ``[a, b)`` of ``logits / tau``: the logits themselves when ``buffer`` is None."""
    if buffer is None:
        return logits[a:b]
    return _scaled(logits[a:b], temperature, buffer[: b - a])


def _faint_tail_rows(
    logits: Tensor,
    ids: Tensor,
    weights: Tensor,
    log_q_kept: Tensor,
    lse: Tensor,
    ratio: Tensor,
    scale: Tensor,
    temperature: float,
) -> Tensor:
    """The gradient of rows whose tail the student gives (almost) no mass, in log space.

    The tail factor ``m = 1 - p_r / q_r`` is then huge and ``q_j`` underflows, so each tail
    entry is ``sign(m) exp(z_j - L + log|m|)`` instead of ``m * q_j``. ``(R, V)`` logits and
    ``(R, ...)`` per-row terms in; ``(R, V)`` in ``weights``' dtype out.
    """
    log_m = torch.where(ratio < 0, torch.log1p(-ratio.exp()), ratio + torch.log1p(-(-ratio).exp()))
    sign = torch.where(ratio > 0, -1.0, 1.0)
    g = _scaled(logits, temperature, None, weights.dtype).sub_((lse - log_m)[:, None])
    g.exp_().mul_((sign * scale)[:, None])
    return g.scatter_(1, ids, (log_q_kept.exp() - weights) * scale[:, None])


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
