"""Tests for softcache.losses.targets: the prepared-targets loss equals the reference losses.

`kd_loss_targets` (the teacher's side made ahead, one fused cross-entropy on the step) must give
`kd_loss_dense`'s and `kd_loss_topk`'s values and gradients: dense and top-k stores, both top-k
forms (dense targets, and the sparse ones large heads get), any k (k = C leaves no tail),
temperatures, alpha with labelled, unlabelled and mixed batches, and tails the student has almost
no mass in. The dense form is checked on both of its ways to the tail's mass (summed, and in log
space), against float64 gradients, and to second order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softcache.losses import kd_loss_dense, kd_loss_topk, topk_kernel
from softcache.losses import targets as tg
from softcache.losses.targets import dense_targets, kd_loss_targets, topk_targets

MANY = settings(max_examples=150, deadline=None)
NEEDS_NUMBA = pytest.mark.skipif(
    not topk_kernel.available(), reason="numba is not installed (softcache[fast])"
)


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
    log_space=st.booleans(),
    compiled=st.booleans(),
)
def test_topk_targets_give_kd_loss_topk(
    seed, batch, classes, k_fraction, scale, temperature, alpha, sparse, log_space, compiled
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
    with _tail_in_log_space(log_space), _compiled_kernel(compiled):
        got = _loss_and_grad(lambda s: kd_loss_targets(s, targets, labels, alpha=alpha), student)
    _close(got, want, temperature)


@contextmanager
def _tail_in_log_space(on: bool) -> Iterator[None]:
    """The dense form's tail mass taken in log space for every batch (as off the CPU), if `on`."""
    with pytest.MonkeyPatch.context() as mp:
        if on:
            mp.setattr(tg, "TAIL_EXACT_BELOW", math.inf)
        yield


@contextmanager
def _compiled_kernel(on: bool) -> Iterator[None]:
    """The CPU top-k dense form from numba's compiled pass (`on`, where numba is installed) or
    from torch ops."""
    with pytest.MonkeyPatch.context() as mp:
        if not on:
            mp.setattr(topk_kernel, "_compiled", None)
        yield


KERNELS = [
    pytest.param(True, id="compiled", marks=NEEDS_NUMBA),
    pytest.param(False, id="torch-ops"),
]


def _topk_targets(sparse: bool, *args) -> tg.TeacherTargets:
    """`topk_targets` in the form asked for (sparse: the lean kernel's), whatever the batch size."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "DENSE_TOPK_ELEMENTS", 0 if sparse else 1 << 40)
        targets = topk_targets(*args)
    assert (targets.ids is not None) == sparse
    return targets


@pytest.mark.parametrize("compiled", KERNELS)
@pytest.mark.parametrize("sparse", [False, True])
def test_a_tail_the_student_has_no_mass_in_still_gets_its_gradient(sparse, compiled):
    """The student puts ~all its mass on the kept class, the teacher 30 % on the tail: the
    reference's q_tail underflows in float32; both prepared forms keep the tail's gradient
    finite (the dense form spreads the tail's weight by the student's tail softmax, the lean
    kernel works in log space) and push the tail up."""
    student = torch.tensor([[200.0, 0.0, -1.0, -2.0]])
    values = torch.tensor([[2.0]])
    indices = torch.tensor([[0]])
    lse = torch.logsumexp(torch.tensor([[2.0, 1.0, 0.5, 0.0]]), dim=1)
    targets = _topk_targets(sparse, values, indices, lse, 4, 1.0)
    with _compiled_kernel(compiled):
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
    with pytest.raises(ValueError, match="alpha"):
        kd_loss_targets(torch.zeros(4, 10), targets, None, alpha=float("nan"))
    with pytest.raises(ValueError, match=r"shape \(40,\), the targets are for a batch of 4 rows"):
        kd_loss_targets(torch.zeros(40), targets, None)
    with pytest.raises(ValueError, match=r"shape \(4, 10, 1\)"):
        kd_loss_targets(torch.zeros(4, 10, 1), targets, None)
    # Targets made by hand are checked too: their temperature was never validated.
    for temperature in (0.0, -1.0, float("inf"), float("nan")):
        made = dataclasses.replace(targets, temperature=temperature)
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            kd_loss_targets(torch.zeros(4, 10), made, None)


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


def _exact_topk_kl(student: torch.Tensor, targets: tg.TeacherTargets) -> torch.Tensor:
    """The top-k KL in float64 from its definition over the teacher's bins (the kept classes and
    the tail), summed over rows and times T^2 / B as `kd_loss_targets` averages it."""
    assert targets.tail_classes is not None and targets.tail is not None
    temperature = targets.temperature
    log_q = torch.log_softmax(student.double() / temperature, dim=1)
    in_tail = targets.tail_classes.double() > 0
    log_q_tail = torch.logsumexp(log_q.masked_fill(~in_tail, -math.inf), dim=1)
    weights, tail = targets.weights.double(), targets.tail.double()
    cross = (weights * log_q).sum(dim=1) + torch.where(tail > 0, tail * log_q_tail, 0.0)
    kl = targets.neg_entropy.double() - cross
    return kl.mean() * temperature**2


@pytest.mark.parametrize("compiled", KERNELS)
@pytest.mark.parametrize("path", ["summed", "fallback", "log space"])
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16])
def test_dense_form_gradient_is_the_float64_gradient(path, student_dtype, compiled):
    """Value and gradient against float64 autograd of the definition, on students whose tail
    mass ranges from most of the row to far below float32 (where summing q would lose it). Each
    way to the tail's mass is taken for sure: summed (the threshold at 0, on the rows whose tail
    float32 holds), the automatic fallback (the default threshold, a batch with faint tails) and
    log space throughout (as off the CPU)."""
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(6, 12, generator=gen) * 2
    student[:, :2] += torch.tensor([0.0, 5.0, 30.0, 90.0, 150.0, 400.0]).unsqueeze(1)
    teacher = torch.randn(6, 12, generator=gen)
    rows = 3 if path == "summed" else 6  # rows 3-5: tails under float32's normal range
    student, teacher = student[:rows], teacher[:rows]
    values, indices = teacher[:, :2], torch.tensor([[0, 1]] * rows)  # the student's top two
    lse = torch.logsumexp(teacher / 1.5, dim=1)
    targets = _topk_targets(False, values, indices, lse, 12, 1.5)
    student = student.to(student_dtype)
    threshold = {"summed": 0.0, "fallback": tg.TAIL_EXACT_BELOW, "log space": math.inf}[path]
    with pytest.MonkeyPatch.context() as mp, _compiled_kernel(compiled):
        mp.setattr(tg, "TAIL_EXACT_BELOW", threshold)
        loss, grad = _loss_and_grad(lambda s: kd_loss_targets(s, targets, None), student)
    want_loss, want_grad = _loss_and_grad(lambda s: _exact_topk_kl(s, targets), student.double())
    assert grad.dtype == student_dtype and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    tolerance = {"rtol": 1e-4, "atol": 1e-6} if student_dtype == torch.float32 else {}
    torch.testing.assert_close(grad, want_grad.to(student_dtype), **tolerance)
    assert (want_grad[3:, 2:] < 0).all()  # the faint tails are pushed up, not dropped


@pytest.mark.parametrize("log_space", [False, True])
@pytest.mark.parametrize("kind", ["dense", "topk", "topk-no-tail"])
def test_dense_form_passes_gradcheck(log_space, kind):
    gen = torch.Generator().manual_seed(5)
    student = torch.randn(3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 7, generator=gen) * 2
    if kind == "dense":
        targets = dense_targets(teacher, 2.0)
    else:
        k = 7 if kind == "topk-no-tail" else 3
        values, indices = teacher.topk(k, dim=1)
        targets = _topk_targets(False, values, indices, torch.logsumexp(teacher / 2.0, 1), 7, 2.0)
    assert (targets.tail_classes is None) == (kind != "topk")
    with _tail_in_log_space(log_space):
        assert torch.autograd.gradcheck(
            lambda s: kd_loss_targets(s, targets, None, alpha=0.25), (student,)
        )


@pytest.mark.parametrize("kind", ["dense", "topk"])
def test_second_derivatives_through_the_dense_form_are_right(kind):
    """A gradient penalty needs the loss's second derivatives: a create_graph backward gives a
    differentiable first derivative equal to the plain one, and the second passes gradgradcheck."""
    gen = torch.Generator().manual_seed(9)
    student = torch.randn(3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 6, generator=gen)
    if kind == "dense":
        targets = dense_targets(teacher, 2.0)
    else:
        values, indices = teacher.topk(2, dim=1)
        targets = _topk_targets(False, values, indices, torch.logsumexp(teacher / 2.0, 1), 6, 2.0)
    loss = kd_loss_targets(student, targets, None)
    (fast,) = torch.autograd.grad(loss, student, retain_graph=True)
    (graphed,) = torch.autograd.grad(loss, student, create_graph=True)
    assert graphed.requires_grad
    torch.testing.assert_close(graphed.detach(), fast)
    assert torch.autograd.gradgradcheck(lambda s: kd_loss_targets(s, targets, None), (student,))


def _autograd_form(student: torch.Tensor, targets: tg.TeacherTargets) -> tuple[torch.Tensor, ...]:
    """The loss (alpha 0) in autograd's form, neither the compiled pass nor the given gradient's
    ops, and its gradient in `student`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "_tail_kl_with_its_gradient", lambda *args: None)
        loss = kd_loss_targets(student, targets, None, alpha=0.0)
        assert type(loss.grad_fn).__name__ == "AddBackward0"
        (grad,) = torch.autograd.grad(loss, student)
    return loss, grad


def _topk_case(seed: int, temperature: float) -> tuple[tg.TeacherTargets, torch.Tensor]:
    """Top-5 targets of 6 rows over 30 classes at `temperature`, and a student that needs a
    gradient."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(6, 30, generator=gen) * 2
    values, indices = teacher.topk(5, dim=1)
    lse = torch.logsumexp(teacher / temperature, 1)
    targets = topk_targets(values, indices, lse, 30, temperature)
    return targets, (torch.randn(6, 30, generator=gen) * 2).requires_grad_()


@pytest.mark.parametrize("compiled", KERNELS)
def test_a_cpu_top_k_loss_brings_its_gradient_and_falls_back_where_it_must(compiled):
    """On the CPU the top-k dense form's gradient is made with its value (one autograd node);
    it is autograd's gradient. Autograd's form is taken without grad and for logits that need no
    gradient, and for a faint tail where the torch ops make it (the compiled pass takes that
    tail in log space itself)."""
    gen = torch.Generator().manual_seed(11)
    teacher = torch.randn(5, 20, generator=gen) * 2
    values, indices = teacher.topk(4, dim=1)
    targets = topk_targets(values, indices, torch.logsumexp(teacher / 2.0, 1), 20, 2.0)
    student = (torch.randn(5, 20, generator=gen) * 3).requires_grad_()

    with _compiled_kernel(compiled):
        loss = kd_loss_targets(student, targets, None, alpha=0.0)
        assert type(loss.grad_fn).__name__ == "_GivenGradientBackward"
        (grad,) = torch.autograd.grad(loss, student)
    plain, plain_grad = _autograd_form(student, targets)
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-5, atol=1e-7)

    with _compiled_kernel(compiled):
        with torch.no_grad():
            assert kd_loss_targets(student, targets, None).grad_fn is None
        assert kd_loss_targets(student.detach(), targets, None).grad_fn is None
        faint = student.detach().clone()
        faint[0, indices[0]] += 200.0  # row 0's tail mass under TAIL_EXACT_BELOW
        faint.requires_grad_()
        fallback = kd_loss_targets(faint, targets, None)
        node = type(fallback.grad_fn).__name__
        assert (node == "_GivenGradientBackward") == compiled
        (faint_grad,) = torch.autograd.grad(fallback, faint)
    assert torch.isfinite(faint_grad).all()
    if compiled:  # the compiled pass's log-space row is autograd's
        plain, plain_grad = _autograd_form(faint, targets)
        torch.testing.assert_close(fallback, plain, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(faint_grad, plain_grad, rtol=1e-5, atol=1e-7)


def test_a_loss_kept_after_its_backward_does_not_hold_its_targets():
    """A loss kept for logging must not keep its batch's targets (in `softcache train`, views of
    the batch process's shared memory) alive once its backward has run."""
    import gc
    import weakref

    gen = torch.Generator().manual_seed(12)
    teacher = torch.randn(4, 10, generator=gen)
    values, indices = teacher.topk(3, dim=1)
    targets = topk_targets(values, indices, torch.logsumexp(teacher, 1), 10, 1.0)
    held = [weakref.ref(t) for t in (targets.weights, targets.tail_classes, targets.tail)]
    student = torch.randn(4, 10, generator=gen, requires_grad=True)
    loss = kd_loss_targets(student, targets, None)
    assert type(loss.grad_fn).__name__ == "_GivenGradientBackward"
    loss.backward()
    del targets
    gc.collect()
    assert all(ref() is None for ref in held)
    assert torch.isfinite(loss)


def test_a_given_gradient_accumulates_right_under_retained_graphs_and_scaled_upstreams():
    """The top-k node hands its gradient out as is for a unit upstream: three backwards of a
    kept graph into a leaf must still sum to three gradients, a gradient changed in place by its
    caller must not change the next backward's, and a scaled upstream must scale it, as
    autograd's form does."""
    targets, student = _topk_case(13, 3.0)
    _, expected = _autograd_form(student, targets)

    loss = kd_loss_targets(student, targets, None)
    assert type(loss.grad_fn).__name__ == "_GivenGradientBackward"
    for _ in range(3):
        loss.backward(retain_graph=True)
    torch.testing.assert_close(student.grad, 3 * expected, rtol=1e-5, atol=1e-7)
    student.grad = None
    kept = kd_loss_targets(student, targets, None)
    (first,) = torch.autograd.grad(kept, student, retain_graph=True)
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-7)
    first.zero_()  # the caller's to change
    (second,) = torch.autograd.grad(kept, student)
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-7)
    # A fresh node: its first backward scales the gradient it made (the kept `loss` above has
    # handed its gradient out already and would recompute).
    kd_loss_targets(student, targets, None).backward(torch.tensor(-2.5))
    torch.testing.assert_close(student.grad, -2.5 * expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("compiled", KERNELS)
def test_a_top_k_loss_changed_in_place_scales_its_gradient(compiled):
    """Gradient accumulation divides the loss in place (`loss /= steps`): the node's output is
    a tensor of its own, and the gradient it hands out is scaled as autograd's form's is."""
    targets, student = _topk_case(15, 2.0)
    _, expected = _autograd_form(student, targets)
    with _compiled_kernel(compiled):
        loss = kd_loss_targets(student, targets, None)
    assert type(loss.grad_fn).__name__ == "_GivenGradientBackward"
    value = float(loss.detach())
    loss /= 4
    loss.backward()
    assert float(loss.detach()) == pytest.approx(value / 4)
    torch.testing.assert_close(student.grad, expected / 4, rtol=1e-5, atol=1e-7)


def test_the_top_k_gradient_is_the_same_without_torchs_log_softmax_backward_kernel():
    """The top-k node's gradient comes from torch's private log_softmax backward kernel where
    torch has it, and from the same sum spelt out where it does not."""
    gen = torch.Generator().manual_seed(14)
    teacher = torch.randn(7, 25, generator=gen) * 2
    values, indices = teacher.topk(4, dim=1)
    targets = topk_targets(values, indices, torch.logsumexp(teacher / 2.0, 1), 25, 2.0)
    student = (torch.randn(7, 25, generator=gen) * 2).requires_grad_()
    with _compiled_kernel(False):
        (kernel,) = torch.autograd.grad(kd_loss_targets(student, targets, None), student)
    with pytest.MonkeyPatch.context() as mp, _compiled_kernel(False):
        mp.setattr(tg, "_log_softmax_backward", None)
        loss = kd_loss_targets(student, targets, None)
        assert type(loss.grad_fn).__name__ == "_GivenGradientBackward"
        (spelt,) = torch.autograd.grad(loss, student)
    torch.testing.assert_close(spelt, kernel, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dense_up_to", [0, tg.DENSE_TOPK_ELEMENTS])
def test_top_k_targets_made_for_many_rows_slice_into_each_batchs_own(dense_up_to, monkeypatch):
    # A read group's targets (`topk_rows`), sliced and given a batch's form (`for_batch`), are
    # what the batch's own `topk_targets` makes, bit for bit, in both forms.
    monkeypatch.setattr(tg, "DENSE_TOPK_ELEMENTS", dense_up_to)
    gen = torch.Generator().manual_seed(5)
    teacher = torch.randn(300, 40, generator=gen) * 4
    values, indices = teacher.topk(6, dim=1)
    lse = torch.logsumexp(teacher / 2.0, dim=1)
    group = tg.topk_rows(values.half(), indices.int(), lse, 40, 2.0)
    assert group.ids is not None and group.weights.shape == (300, 6)
    for start, stop in ((0, 64), (64, 128), (250, 300), (7, 8)):
        got = tg.for_batch(group.rows(slice(start, stop)))
        want = topk_targets(
            values[start:stop].half(), indices[start:stop].int(), lse[start:stop], 40, 2.0
        )
        assert (got.ids is None) == ((stop - start) * 40 <= dense_up_to) == (want.ids is None)
        for field in dataclasses.fields(want):
            a, b = getattr(got, field.name), getattr(want, field.name)
            assert torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b, field.name
    picked = torch.tensor([3, 299, 0])
    got = tg.for_batch(group.rows(picked))
    want = topk_targets(values[picked].half(), indices[picked].int(), lse[picked], 40, 2.0)
    assert torch.equal(got.weights, want.weights) and torch.equal(got.tail, want.tail)
