"""Tests for softcache.losses.targets: the prepared-targets loss equals the reference losses.

`kd_loss_targets` (the teacher's side made ahead, one fused cross-entropy on the step) must give
`kd_loss_dense`'s and `kd_loss_topk`'s values and gradients: dense and top-k stores, both top-k
forms (dense targets, and the sparse ones large heads get), any k (k = C leaves no tail),
temperatures, alpha with labelled, unlabelled and mixed batches, and tails the student has almost
no mass in.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softcache.losses import kd_loss_dense, kd_loss_topk
from softcache.losses import targets as tg
from softcache.losses.targets import dense_targets, kd_loss_targets, topk_targets

MANY = settings(max_examples=150, deadline=None)


def _case(seed: int, batch: int, classes: int, scale: float) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=gen) * scale
    teacher = torch.randn(batch, classes, generator=gen) * scale
    labels = torch.randint(0, classes, (batch,), generator=gen)
    labels[torch.rand(batch, generator=gen) < 0.4] = -100
    return student, teacher, labels


def _loss_and_grad(fn, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = student.clone().requires_grad_()
    loss = fn(s)
    loss.backward()
    assert s.grad is not None
    return loss.detach(), s.grad


def _close(got, want, temperature: float) -> None:
    # float32 sums of O(1) terms that cancel to a small KL, scaled by T^2 (as in test_losses).
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=2e-6 * max(1.0, temperature**2))
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)


@MANY
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 8),
    classes=st.integers(2, 40),
    scale=st.sampled_from([0.1, 3.0, 12.0]),
    temperature=st.floats(0.25, 8.0),
    alpha=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_dense_targets_give_kd_loss_dense(seed, batch, classes, scale, temperature, alpha):
    student, teacher, labels = _case(seed, batch, classes, scale)
    teacher = teacher.half()  # as stored
    want = _loss_and_grad(
        lambda s: kd_loss_dense(s, teacher, labels, temperature=temperature, alpha=alpha), student
    )
    targets = dense_targets(teacher, temperature)
    got = _loss_and_grad(lambda s: kd_loss_targets(s, targets, labels, alpha=alpha), student)
    _close(got, want, temperature)


@MANY
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 8),
    classes=st.integers(2, 40),
    k_fraction=st.floats(0.0, 1.0),
    scale=st.sampled_from([0.1, 3.0, 12.0]),
    temperature=st.floats(0.25, 8.0),
    alpha=st.sampled_from([0.0, 0.3, 1.0]),
    sparse=st.booleans(),
)
def test_topk_targets_give_kd_loss_topk(
    seed, batch, classes, k_fraction, scale, temperature, alpha, sparse
):
    student, teacher, labels = _case(seed, batch, classes, scale)
    k = max(1, round(k_fraction * classes))
    values, indices = teacher.half().topk(k, dim=1)
    lse = torch.logsumexp(teacher.half().float() / temperature, dim=1)
    want = _loss_and_grad(
        lambda s: kd_loss_topk(
            s, values, indices.to(torch.int32), lse, labels, temperature=temperature, alpha=alpha
        ),
        student,
    )
    targets = _topk_targets(sparse, values, indices.to(torch.int32), lse, classes, temperature)
    got = _loss_and_grad(lambda s: kd_loss_targets(s, targets, labels, alpha=alpha), student)
    _close(got, want, temperature)


def _topk_targets(sparse: bool, *args) -> tg.TeacherTargets:
    """`topk_targets` in the form asked for (sparse: the lean kernel's), whatever the batch size."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "DENSE_TOPK_ELEMENTS", 0 if sparse else 1 << 40)
        targets = topk_targets(*args)
    assert (targets.ids is not None) == sparse
    return targets


@pytest.mark.parametrize("sparse", [False, True])
def test_a_tail_the_student_has_no_mass_in_still_gets_its_gradient(sparse):
    """The student puts ~all its mass on the kept class, the teacher 30 % on the tail: the
    reference's q_tail underflows in float32; both prepared forms keep the tail's gradient
    finite (the dense form spreads the tail's weight by the student's tail softmax, the lean
    kernel works in log space) and push the tail up."""
    student = torch.tensor([[200.0, 0.0, -1.0, -2.0]])
    values = torch.tensor([[2.0]])
    indices = torch.tensor([[0]])
    lse = torch.logsumexp(torch.tensor([[2.0, 1.0, 0.5, 0.0]]), dim=1)
    targets = _topk_targets(sparse, values, indices, lse, 4, 1.0)
    loss, grad = _loss_and_grad(lambda s: kd_loss_targets(s, targets, None), student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad[0, 0] > 0 and (grad[0, 1:] < 0).all()  # mass moves from the kept class to the tail


def test_targets_of_another_batch_or_head_are_refused():
    targets = dense_targets(torch.zeros(4, 10), 2.0)
    with pytest.raises(ValueError, match="batch of 4 rows"):
        kd_loss_targets(torch.zeros(3, 10), targets, None)
    with pytest.raises(ValueError, match="over 10 classes, the student has 11"):
        kd_loss_targets(torch.zeros(4, 11), targets, None)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss_targets(torch.zeros(4, 10), targets, None, alpha=1.5)


def test_teacher_targets_of_another_shape_are_refused_with_what_differs():
    with pytest.raises(ValueError, match="2-D"):
        dense_targets(torch.zeros(10), 1.0)
    values, indices = torch.zeros(4, 3), torch.tensor([[0, 1, 2]] * 4)
    with pytest.raises(ValueError, match="k=3 classes but the student has only 2"):
        topk_targets(values, indices, torch.zeros(4), 2, 1.0)
    with pytest.raises(ValueError, match="hold class 11 but the student has 10"):
        topk_targets(values, indices + 9, torch.zeros(4), 10, 1.0)
    with pytest.raises(ValueError, match="topk_indices has shape"):
        topk_targets(values, indices[:, :2], torch.zeros(4), 10, 1.0)


def test_sparse_targets_refuse_a_student_of_another_width():
    values, indices = torch.zeros(4, 3), torch.tensor([[0, 1, 2]] * 4)
    targets = _topk_targets(True, values, indices, torch.zeros(4), 10, 1.0)
    with pytest.raises(ValueError, match="over 10 classes, the student has 8"):
        kd_loss_targets(torch.zeros(4, 8), targets, None)
