"""Tests for softcache.losses.sparse: the chunked kernel against autograd and the reference loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from softcache.losses import tokens as token_losses
from softcache.losses.sparse import sparse_cross_entropy
from softcache.store import token_coding as tk

FEW = settings(max_examples=30, deadline=None)


def _logits(seed: int, rows: int, vocab: int, scale: float = 3.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _topk_weights(teacher: torch.Tensor, k: int, temperature: float):
    """(ids, p at the ids, p of the tail) of a teacher row set, in the teacher's dtype."""
    p = torch.softmax(teacher / temperature, dim=1)
    weights, ids = p.topk(k, dim=1)
    return ids, weights, (1 - weights.sum(1)).clamp_min(0)


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
def test_custom_backward_passes_gradcheck_in_float64(tail: bool, chunk_rows: int) -> None:
    """torch.autograd.gradcheck compares the hand-written backward with finite differences."""
    student = _logits(0, 5, 11, dtype=torch.float64).requires_grad_()
    ids, weights, tail_weight = _topk_weights(_logits(1, 5, 11, dtype=torch.float64), 4, 1.7)
    if not tail:  # sampled-style: repeated padding ids with weight 0
        ids[:, -1] = ids[:, -2]
        weights[:, -1] = 0.0
        weights = weights / weights.sum(1, keepdim=True)

    def ce(s: torch.Tensor) -> torch.Tensor:
        return sparse_cross_entropy(
            s, ids, weights, tail_weight if tail else None, temperature=1.7, chunk_rows=chunk_rows
        )

    assert torch.autograd.gradcheck(ce, (student,), eps=1e-6, atol=1e-7, rtol=1e-5)


@FEW
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 9),
    vocab=st.integers(2, 50),
    k_fraction=st.floats(0.0, 1.0),
    temperature=st.floats(0.25, 8.0),
    scale=st.sampled_from([1.0, 3.0, 30.0]),
    chunk_rows=st.integers(1, 10),
)
def test_lean_topk_loss_matches_the_autograd_reference(
    seed, rows, vocab, k_fraction, temperature, scale, chunk_rows
):
    """Value and gradient of `topk_residual_kl` equal the plain-autograd reference's, in float64
    (where both are exact to ~1e-12, so a wrong formula cannot hide in rounding)."""
    k = max(1, round(k_fraction * vocab))
    student = _logits(seed, rows, vocab, scale, torch.float64)
    teacher = _logits(seed + 1, rows, vocab, scale, torch.float64)
    log_p = F.log_softmax(teacher / temperature, dim=1)
    values, indices = log_p.topk(k, dim=1)
    residual = torch.logsumexp(log_p.scatter(1, indices, -math.inf), dim=1)
    lean_s, ref_s = student.clone().requires_grad_(), student.clone().requires_grad_()
    args = (values, indices, residual)
    lean = token_losses.topk_residual_kl(
        lean_s, *args, temperature=temperature, reduction="none", chunk_rows=chunk_rows
    )
    ref = _reference64(ref_s, *args, temperature=temperature)
    lean.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(lean.double(), ref, rtol=1e-6, atol=1e-9 * temperature**2)
    torch.testing.assert_close(lean_s.grad, ref_s.grad, rtol=1e-6, atol=1e-9 * temperature)


def _reference64(student, values, indices, residual, *, temperature):
    """The reference loss computed in float64 throughout (its float32 casts removed)."""
    log_q_all = F.log_softmax(student / temperature, dim=1)
    kept = torch.zeros_like(log_q_all, dtype=torch.bool).scatter_(1, indices, True)
    has_tail = ~kept.all(dim=1, keepdim=True)
    residual = torch.where(has_tail, residual.unsqueeze(1), -math.inf)
    bins = torch.cat([values, residual], dim=1)
    log_p = bins - torch.logsumexp(bins, dim=1, keepdim=True)
    tail = torch.where(has_tail, log_q_all.masked_fill(kept, -math.inf), 0.0)
    log_q = torch.cat([log_q_all.gather(1, indices), torch.logsumexp(tail, 1, keepdim=True)], 1)
    return temperature**2 * token_losses.kl_terms(log_p, log_q).sum(dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lean_losses_match_the_reference_in_the_student_dtype(dtype: torch.dtype) -> None:
    """float32 and half-precision students: the loss is float32, the gradient in the student's
    dtype, both equal to the reference to the student dtype's rounding."""
    student = _logits(3, 40, 300, 4.0, dtype)
    teacher = _logits(4, 40, 300, 4.0)
    values, indices, residual = tk.topk_residual(teacher, 16, temperature=2.0)
    ids, counts = tk.sample_ids(teacher, 24, temperature=2.0, generator=torch.Generator())
    for lean_fn, ref_fn, args in (
        (
            token_losses.topk_residual_kl,
            token_losses.topk_residual_kl_reference,
            (values, indices, residual),
        ),
        (token_losses.sampled_ce, _sampled_ce_reference, (ids, counts)),
    ):
        lean_s, ref_s = student.clone().requires_grad_(), student.clone().requires_grad_()
        lean = lean_fn(lean_s, *args, temperature=2.0, chunk_rows=7)
        ref = ref_fn(ref_s, *args, temperature=2.0)
        lean.backward()
        ref.backward()
        assert lean.dtype == torch.float32 and lean_s.grad.dtype == dtype
        torch.testing.assert_close(lean, ref, rtol=1e-5, atol=1e-6)
        tol = 1e-6 if dtype == torch.float32 else 1e-3
        torch.testing.assert_close(lean_s.grad, ref_s.grad, rtol=tol, atol=tol * 1e-2)


def _sampled_ce_reference(student, ids, counts, *, temperature):
    log_q = F.log_softmax(student.float() / temperature, dim=1).gather(1, ids.long())
    weights = counts.to(torch.int32).float()
    per_row = -(weights * log_q).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    return temperature**2 * per_row.mean()


def test_tail_whose_student_mass_underflows_keeps_its_gradient() -> None:
    """A student that puts ~e^-150 on the tail: its tail log-sum-exp is recomputed around the
    tail's own maximum, and the tail's gradient (large: p_r / q_r) is finite and equal to the
    float64 reference's."""
    student = torch.zeros(2, 6)
    student[:, :2] = 150.0
    values = torch.log(torch.tensor([[0.5, 0.3], [0.6, 0.2]]))
    indices = torch.tensor([[0, 1], [1, 0]])
    residual = torch.log(torch.tensor([0.2, 0.2]))
    lean_s = student.clone().requires_grad_()
    ref_s = student.double().requires_grad_()
    lean = token_losses.topk_residual_kl(lean_s, values, indices, residual, reduction="none")
    ref = _reference64(ref_s, values.double(), indices, residual.double(), temperature=1.0)
    lean.sum().backward()
    ref.sum().backward()
    assert bool(torch.isfinite(lean).all()) and bool(torch.isfinite(lean_s.grad).all())
    torch.testing.assert_close(lean.double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lean_s.grad.double(), ref_s.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_a_second_backward_recomputes_the_kept_softmax_bit_for_bit(
    tail: bool, temperature: float
) -> None:
    """One chunk's softmax is kept from the forward and turned into the gradient in place; a
    second backward through the same graph (retain_graph) recomputes it, to the same bits, and
    several chunks give the same gradient as one."""
    student = _logits(5, 12, 40).requires_grad_()
    ids, weights, tail_weight = _topk_weights(_logits(6, 12, 40), 6, temperature)
    upstream = torch.linspace(0.5, 2.0, 12)
    one_chunk = sparse_cross_entropy(
        student, ids, weights, tail_weight if tail else None, temperature=temperature
    )
    (first,) = torch.autograd.grad(one_chunk, student, upstream, retain_graph=True)
    (second,) = torch.autograd.grad(one_chunk, student, upstream)
    assert torch.equal(first, second)
    chunked = sparse_cross_entropy(
        student, ids, weights, tail_weight if tail else None, temperature=temperature, chunk_rows=5
    )
    (by_chunks,) = torch.autograd.grad(chunked, student, upstream)
    torch.testing.assert_close(chunked, one_chunk, rtol=0, atol=0)
    torch.testing.assert_close(by_chunks, first, rtol=0, atol=0)


def test_under_no_grad_the_value_is_the_one_with_a_gradient() -> None:
    """Under no_grad (evaluation) the forward builds no graph and gives the same bits as with
    one (which keeps its softmax for the backward)."""
    student = _logits(7, 6, 30)
    ids, weights, tail_weight = _topk_weights(_logits(8, 6, 30), 4, 1.0)
    with torch.no_grad():
        plain = sparse_cross_entropy(student, ids, weights, tail_weight)
    graded = sparse_cross_entropy(student.clone().requires_grad_(), ids, weights, tail_weight)
    assert plain.grad_fn is None
    torch.testing.assert_close(plain, graded.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("k", [5, 30])
def test_the_loss_of_teacher_bins_made_beforehand_is_topk_residual_kl(k: int) -> None:
    """`teacher_bins` (what a loader computes as it decodes) then `topk_residual_kl_of_bins` give
    `topk_residual_kl`'s value and gradient, with a tail (k < V) and without one (k = V)."""
    student = _logits(9, 10, 30, dtype=torch.float64)
    values, indices, residual = tk.topk_residual(_logits(10, 10, 30), k, temperature=1.5)
    direct_s, binned_s = student.clone().requires_grad_(), student.clone().requires_grad_()
    direct = token_losses.topk_residual_kl(direct_s, values, indices, residual, temperature=1.5)
    probs, neg_entropy = token_losses.teacher_bins(values, residual, has_tail=k < 30)
    binned = token_losses.topk_residual_kl_of_bins(
        binned_s, indices, probs, neg_entropy, temperature=1.5
    )
    direct.backward()
    binned.backward()
    torch.testing.assert_close(binned, direct, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(binned_s.grad, direct_s.grad, rtol=1e-6, atol=1e-8)
    assert probs.shape == (10, k + 1) and bool((probs[:, -1] == 0).all()) == (k == 30)
    with pytest.raises(ValueError, match=r"probs \(T, k \+ 1\)"):
        token_losses.topk_residual_kl_of_bins(student, indices, probs[:, 1:], neg_entropy)
