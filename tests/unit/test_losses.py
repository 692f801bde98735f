"""Tests for softcache.losses: agreement with dense KD, hand-computed values, finite gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from softcache.losses import hard_loss, kd_loss_dense, kd_loss_topk, topk_teacher_probs

FEW = settings(max_examples=40, deadline=None)


def _logits(seed: int, batch: int, classes: int, scale: float = 3.0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=gen) * scale
    teacher = torch.randn(batch, classes, generator=gen) * scale
    return student, teacher


def _targets(kind: str, batch: int, classes: int, seed: int) -> torch.Tensor | None:
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    if kind == "none":
        return None
    if kind == "all_unlabelled":
        return torch.full((batch,), -1, dtype=torch.int64)
    if kind == "mixed":
        labels[::2] = -1
    return labels


def _topk(teacher: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, ...]:
    values, indices = teacher.topk(k, dim=1)
    lse = torch.logsumexp(teacher.float() / temperature, dim=1)
    return values, indices, lse


@FEW
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 6),
    classes=st.integers(2, 12),
    temperature=st.floats(0.25, 8.0),
    alpha=st.sampled_from([0.0, 0.3, 1.0]),
    labels=st.sampled_from(["none", "labelled", "mixed", "all_unlabelled"]),
)
def test_topk_with_all_classes_equals_dense(seed, batch, classes, temperature, alpha, labels):
    student, teacher = _logits(seed, batch, classes)
    targets = _targets(labels, batch, classes, seed)
    values, indices, lse = _topk(teacher, classes, temperature)

    s_dense = student.clone().requires_grad_()
    dense = kd_loss_dense(s_dense, teacher, targets, temperature=temperature, alpha=alpha)
    dense.backward()
    for normaliser in (lse, None):
        s_topk = student.clone().requires_grad_()
        topk = kd_loss_topk(
            s_topk, values, indices, normaliser, targets, temperature=temperature, alpha=alpha
        )
        topk.backward()
        # Both sides are float32 sums of O(1) terms that cancel to a small KL, then scaled by
        # T^2: the absolute rounding error grows with T^2, so the tolerance does too.
        torch.testing.assert_close(topk, dense, rtol=1e-5, atol=1e-6 * max(1.0, temperature**2))
        torch.testing.assert_close(s_topk.grad, s_dense.grad, rtol=1e-4, atol=1e-6)


@FEW
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 5),
    classes=st.integers(2, 16),
    k_fraction=st.floats(0.0, 1.0),
    temperature=st.floats(0.5, 4.0),
)
def test_topk_kl_is_between_zero_and_dense_kl(seed, batch, classes, k_fraction, temperature):
    # Grouping the tail into one bucket can only lose information (chain rule of KL).
    student, teacher = _logits(seed, batch, classes)
    k = max(1, round(k_fraction * classes))
    values, indices, lse = _topk(teacher, k, temperature)
    topk = kd_loss_topk(student, values, indices, lse, None, temperature=temperature)
    dense = kd_loss_dense(student, teacher, None, temperature=temperature)
    assert topk >= -1e-6
    assert topk <= dense + 1e-5


def test_topk_matches_hand_computed_example():
    temperature, alpha = 2.0, 0.25
    s = [[1.0, 2.0, 0.5, -1.0], [0.0, -0.5, 1.5, 0.2]]
    t = [[3.0, 1.0, 0.0, -2.0], [-1.0, 0.5, 0.0, 2.5]]
    kept = [[0, 1], [3, 1]]
    labels = [1, -1]

    def expected_kl(s_row, t_row, idx):
        lse = math.log(sum(math.exp(x / temperature) for x in t_row))
        z = sum(math.exp(x / temperature) for x in s_row)
        p = [math.exp(t_row[i] / temperature - lse) for i in idx]
        q = [math.exp(s_row[i] / temperature) / z for i in idx]
        p_tail, q_tail = 1 - sum(p), 1 - sum(q)
        kept_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        return kept_kl + p_tail * math.log(p_tail / q_tail)

    kl = sum(expected_kl(s[n], t[n], kept[n]) for n in range(2)) / 2
    ce = -math.log(math.exp(s[0][1]) / sum(math.exp(x) for x in s[0]))  # row 1 is unlabelled
    expected = alpha * ce + (1 - alpha) * temperature**2 * kl

    teacher = torch.tensor(t)
    indices = torch.tensor(kept)
    values = teacher.gather(1, indices).half()
    lse = torch.logsumexp(teacher / temperature, dim=1)
    loss = kd_loss_topk(
        torch.tensor(s),
        values,
        indices,
        lse,
        torch.tensor(labels),
        temperature=temperature,
        alpha=alpha,
    )
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_renormalised_fallback_matches_hand_computed_kl():
    temperature = 1.5
    s = [0.3, -1.0, 2.0, 0.7, 0.0]
    t = [2.0, -0.5, 1.0, 0.1, -3.0]
    idx = [0, 2, 3]

    p = [math.exp(t[i] / temperature) for i in idx]
    q = [math.exp(s[i] / temperature) for i in idx]
    p = [x / sum(p) for x in p]
    q = [x / sum(q) for x in q]
    expected = temperature**2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))

    indices = torch.tensor([idx])
    values = torch.tensor([t]).gather(1, indices)
    loss = kd_loss_topk(
        torch.tensor([s]), values, indices, None, None, temperature=temperature, alpha=0.0
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # The fallback differs from the exact loss: the tail is not free.
    exact = kd_loss_topk(
        torch.tensor([s]),
        values,
        indices,
        torch.logsumexp(torch.tensor([t]) / temperature, dim=1),
        None,
        temperature=temperature,
    )
    assert abs(exact.item() - loss.item()) > 1e-3


@FEW
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 6),
    classes=st.integers(2, 12),
    temperature=st.floats(0.25, 8.0),
    alpha=st.floats(0.0, 1.0),
    labels=st.sampled_from(["none", "labelled", "mixed", "all_unlabelled"]),
)
def test_dense_matches_torch_kl_div(seed, batch, classes, temperature, alpha, labels):
    student, teacher = _logits(seed, batch, classes)
    targets = _targets(labels, batch, classes, seed)
    kl = F.kl_div(
        F.log_softmax(student / temperature, dim=1),
        F.softmax(teacher / temperature, dim=1),
        reduction="batchmean",
    )
    ce = torch.tensor(0.0)
    if targets is not None and (targets != -1).any():
        keep = targets != -1
        ce = F.cross_entropy(student[keep], targets[keep])
    expected = alpha * ce + (1 - alpha) * temperature**2 * kl
    loss = kd_loss_dense(student, teacher, targets, temperature=temperature, alpha=alpha)
    # Two float32 evaluations of the same sums differ by their rounding: a few ulps of each
    # magnitude that enters them (the scaled logits a log-softmax subtracts, the KL terms
    # p (|log p| + |log q|), all scaled by T^2, and the CE's logits), times the terms per row.
    # A fixed atol failed on draws whose T^2 (up to 64) scaled the KL.
    log_p = F.log_softmax(teacher / temperature, dim=1)
    log_q = F.log_softmax(student / temperature, dim=1)
    logit_size = (student.abs().amax(1) + teacher.abs().amax(1)).mean() / temperature
    kl_size = logit_size + (log_p.exp() * (log_p.abs() + log_q.abs())).sum(1).mean()
    ce_size = ce.abs() + student.abs().max()
    size = (1 - alpha) * temperature**2 * kl_size + alpha * ce_size
    atol = 4 * classes * torch.finfo(torch.float32).eps * float(size)
    torch.testing.assert_close(loss, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_zero_when_student_equals_teacher(temperature):
    logits, _ = _logits(0, 4, 10)
    assert kd_loss_dense(logits, logits, None, temperature=temperature).abs() < 1e-6
    values, indices, lse = _topk(logits, 3, temperature)
    for normaliser in (lse, None):
        loss = kd_loss_topk(logits, values, indices, normaliser, None, temperature=temperature)
        assert loss.abs() < 1e-6
    # ...and clearly not zero for a different student.
    other, _ = _logits(1, 4, 10)
    assert kd_loss_dense(other, logits, None, temperature=temperature) > 1e-2


def _assert_finite_grads(loss: torch.Tensor, student: torch.Tensor) -> None:
    loss.backward()
    assert torch.isfinite(loss), loss
    assert student.grad is not None
    assert torch.isfinite(student.grad).all(), student.grad


@pytest.mark.parametrize("k", [1, 5, 8])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("with_lse", [True, False])
def test_gradients_finite_with_extreme_logits(k, temperature, with_lse):
    classes = 8
    student = torch.tensor([[1e4, -1e4, 0.0, 3.0, -2.0, 1e4, -1e4, 5.0]] * 2)
    student[1] = -student[1]
    teacher = torch.tensor([[-1e4, 1e4, 2.0, 0.0, 1e4, -1e4, 0.5, -3.0]] * 2, dtype=torch.float16)
    teacher[1, 0] = float("-inf")  # a masked class in the teacher
    values, indices, lse = _topk(teacher, k, temperature)
    targets = torch.tensor([2, -1])

    s = student.clone().requires_grad_()
    loss = kd_loss_topk(
        s,
        values,
        indices,
        lse if with_lse else None,
        targets,
        temperature=temperature,
        alpha=0.5,
    )
    _assert_finite_grads(loss, s)
    if k == classes:
        s = student.clone().requires_grad_()
        dense = kd_loss_dense(s, teacher, targets, temperature=temperature, alpha=0.5)
        _assert_finite_grads(dense, s)


def test_gradient_finite_when_tail_mass_rounds_to_zero():
    # k < C but the teacher's tail underflows: p_tail == 0 while the student's tail is tiny.
    teacher = torch.tensor([[50.0, 0.0, -50.0, -60.0]])
    student = torch.tensor([[80.0, -80.0, -90.0, -95.0]], requires_grad=True)
    values, indices, lse = _topk(teacher, 2, 1.0)
    _, tail = topk_teacher_probs(values, lse, 1.0)
    assert tail.item() == 0.0
    _assert_finite_grads(kd_loss_topk(student, values, indices, lse, None), student)


def test_teacher_with_gradient_gets_finite_gradient():
    teacher = torch.tensor([[0.0, float("-inf"), 1.0, 2.0]], requires_grad=True)
    student = torch.tensor([[0.5, 0.0, -1.0, 1.0]], requires_grad=True)
    loss = kd_loss_dense(student, teacher, None, temperature=2.0)
    loss.backward()
    assert torch.isfinite(teacher.grad).all()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize(
    ("student_dtype", "teacher_dtype"),
    [
        (torch.bfloat16, torch.float16),
        (torch.float16, torch.bfloat16),
        (torch.float64, torch.float32),
    ],
)
def test_any_float_dtype_gives_float32_loss(student_dtype, teacher_dtype):
    student, teacher = _logits(3, 3, 7)
    student, teacher = student.to(student_dtype), teacher.to(teacher_dtype)
    values, indices, lse = _topk(teacher, 4, 2.0)
    dense = kd_loss_dense(student, teacher, None, temperature=2.0)
    topk = kd_loss_topk(student, values, indices, lse, None, temperature=2.0)
    assert dense.dtype == topk.dtype == torch.float32
    reference = kd_loss_topk(student.float(), values.float(), indices, lse, None, temperature=2.0)
    torch.testing.assert_close(topk, reference)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.int32, torch.int64])
def test_index_dtypes_are_accepted(dtype):
    student, teacher = _logits(5, 3, 9)
    values, indices, lse = _topk(teacher, 4, 1.0)
    expected = kd_loss_topk(student, values, indices, lse, None)
    loss = kd_loss_topk(student, values, indices.to(dtype), lse, None)
    torch.testing.assert_close(loss, expected)


def test_hard_loss_averages_over_labelled_samples_only():
    student, _ = _logits(7, 5, 4)
    targets = torch.tensor([1, -1, 3, -1, 0])
    keep = targets != -1
    expected = F.cross_entropy(student[keep], targets[keep])
    torch.testing.assert_close(hard_loss(student, targets), expected)


@pytest.mark.parametrize(
    ("logits_dtype", "labels_dtype"),
    [
        (torch.float32, torch.int64),
        (torch.float16, torch.int64),
        (torch.bfloat16, torch.int32),
        (torch.float64, torch.int16),
    ],
)
def test_hard_loss_takes_any_float_logits_and_integer_labels(logits_dtype, labels_dtype):
    student, _ = _logits(8, 6, 5)
    targets = torch.tensor([4, -100, 0, -1, 2, 3])
    expected = hard_loss(student.to(logits_dtype).float(), targets)
    loss = hard_loss(student.to(logits_dtype), targets.to(labels_dtype))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("logits", "targets", "message"),
    [
        (torch.zeros(6), torch.zeros(6, dtype=torch.int64), "must be 2-D"),
        (torch.zeros(2, 3, 1), torch.zeros(2, dtype=torch.int64), "must be 2-D"),
        (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), "floating"),
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), "at least one row"),
        (torch.zeros(2, 0), torch.zeros(2, dtype=torch.int64), "at least one row"),
        (torch.zeros(2, 3), torch.zeros(3, dtype=torch.int64), r"shape \(2,\)"),
        (torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.int64), r"shape \(2,\)"),
        (torch.zeros(2, 3), torch.zeros(2), "integer tensor"),
        (torch.zeros(2, 3), torch.zeros(2, dtype=torch.bool), "integer tensor"),
    ],
)
def test_hard_loss_refuses_what_does_not_fit(logits, targets, message):
    with pytest.raises(ValueError, match=message):
        hard_loss(logits, targets)


@pytest.mark.parametrize("targets", [None, torch.full((3,), -1)])
def test_hard_loss_without_labels_is_a_differentiable_zero(targets):
    student = torch.randn(3, 4, requires_grad=True)
    loss = hard_loss(student, targets)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_unlabelled_batch_trains_from_soft_labels_alone():
    student, teacher = _logits(11, 4, 6)
    unlabelled = torch.full((4,), -1)
    soft_only = kd_loss_dense(student, teacher, None, temperature=2.0, alpha=0.0)
    mixed = kd_loss_dense(student, teacher, unlabelled, temperature=2.0, alpha=0.4)
    torch.testing.assert_close(mixed, 0.6 * soft_only)


def test_topk_teacher_probs():
    teacher = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    values, indices, lse = _topk(teacher, 2, 2.0)
    probs, tail = topk_teacher_probs(values.half(), lse, 2.0)
    full = torch.softmax(teacher / 2.0, dim=1)
    torch.testing.assert_close(probs, full.gather(1, indices))
    torch.testing.assert_close(probs.sum(1) + tail, torch.ones(2))
    assert probs.dtype == tail.dtype == torch.float32

    probs, tail = topk_teacher_probs(values, None, 2.0)
    torch.testing.assert_close(probs, torch.softmax(values / 2.0, dim=1))
    assert torch.equal(tail, torch.zeros(2))


def _valid_topk_args() -> dict:
    student, teacher = _logits(0, 3, 6)
    values, indices, lse = _topk(teacher, 2, 1.0)
    return {
        "student_logits": student,
        "topk_values": values,
        "topk_indices": indices,
        "lse": lse,
        "targets": torch.tensor([0, -1, 2]),
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"student_logits": torch.zeros(3)}, "student_logits"),
        ({"student_logits": torch.zeros(3, 6, dtype=torch.int64)}, "floating"),
        ({"student_logits": torch.zeros(4, 6)}, "batch"),
        ({"student_logits": torch.zeros(3, 1)}, "k=2"),
        ({"topk_indices": torch.zeros(3, 3, dtype=torch.int64)}, "topk_indices"),
        ({"topk_indices": torch.zeros(3, 2)}, "integer"),
        ({"lse": torch.zeros(2)}, "lse"),
        ({"targets": torch.zeros(3, 1, dtype=torch.int64)}, "targets"),
        ({"targets": torch.zeros(3)}, "integer"),
    ],
)
def test_topk_argument_validation(change, message):
    args = _valid_topk_args()
    kwargs = {key: change.pop(key) for key in ("temperature", "alpha") if key in change}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        kd_loss_topk(**args, **kwargs)


@pytest.mark.parametrize(
    ("teacher", "kwargs", "message"),
    [
        (torch.zeros(3, 5), {}, "must match"),
        (torch.zeros(3, 6), {"temperature": 0.0}, "temperature"),
        (torch.zeros(3, 6), {"alpha": 2.0}, "alpha"),
        (torch.zeros(3, 6, dtype=torch.int32), {}, "floating"),
    ],
)
def test_dense_argument_validation(teacher, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kd_loss_dense(torch.zeros(3, 6), teacher, None, **kwargs)
