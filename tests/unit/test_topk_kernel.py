"""Tests for softcache.losses.topk_kernel: numba's one-pass top-k KL is the torch ops' KL.

The compiled pass must give the value and gradient the torch ops give (`softcache.losses.
targets`), to float32 rounding, on any batch: any head width and k, temperatures, teacher rows
with and without tail mass, and students whose tail mass is anywhere from most of the row to none
that float32 can hold (taken in log space, on both sides of the threshold). Without numba, or
switched off, it steps aside and the torch ops run.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from softcache.losses import targets as tg
from softcache.losses import topk_kernel
from softcache.losses.targets import kd_loss_targets, topk_targets

pytestmark = pytest.mark.skipif(
    not topk_kernel.available(), reason="numba is not installed (softcache[fast])"
)


def _both(student: torch.Tensor, targets: tg.TeacherTargets, alpha: float, labels=None):
    """(loss, grad) from the compiled pass and from the torch ops."""
    out = []
    for compiled in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            if not compiled:
                mp.setattr(topk_kernel, "_compiled", None)
            s = student.clone().requires_grad_()
            loss = kd_loss_targets(s, targets, labels, alpha=alpha)
            assert type(loss.grad_fn).__name__ in ("_GivenGradientBackward", "AddBackward0")
            (grad,) = torch.autograd.grad(loss, s)
        out.append((loss.detach(), grad))
    return out


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 70),
    classes=st.integers(2, 300),
    k_fraction=st.floats(0.0, 0.99),
    scale=st.sampled_from([0.1, 3.0, 12.0]),
    faint=st.sampled_from([0.0, 40.0, 400.0]),
    temperature=st.floats(0.25, 8.0),
    alpha=st.sampled_from([0.0, 0.5]),
    threshold=st.sampled_from([0.0, tg.TAIL_EXACT_BELOW, math.inf]),
)
def test_the_compiled_pass_gives_the_torch_ops_loss_and_gradient(
    seed, batch, classes, k_fraction, scale, faint, temperature, alpha, threshold
):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(batch, classes, generator=gen) * scale
    student = torch.randn(batch, classes, generator=gen) * scale
    k = min(classes - 1, max(1, round(k_fraction * classes)))  # a tail in every row
    values, indices = teacher.half().topk(k, dim=1)
    # Some rows' students put (nearly) all their mass on the teacher's kept classes.
    student[::3].scatter_add_(1, indices[::3], torch.full((len(indices[::3]), k), faint))
    lse = torch.logsumexp(teacher.half().float() / temperature, dim=1)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    if threshold == 0.0:  # summed on every row: only where float32 holds each row's tail
        q = torch.softmax(student / temperature, dim=1)
        assume(float(q.scatter(1, indices, 0.0).sum(dim=1).min()) >= tg.TAIL_EXACT_BELOW)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tg, "DENSE_TOPK_ELEMENTS", 1 << 40)  # the dense form, whatever the size
        mp.setattr(tg, "TAIL_EXACT_BELOW", threshold)
        targets = topk_targets(values, indices.int(), lse, classes, temperature)
        (got, got_grad), (want, want_grad) = _both(student, targets, alpha, labels)
    assert torch.isfinite(got) and torch.isfinite(got_grad).all()
    atol = 2e-6 * max(1.0, temperature**2) * max(1.0, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


def test_rows_without_tail_mass_and_rows_with_zero_weights():
    """A row whose teacher left no mass in its tail (tail 0) has no tail term; kept classes of
    zero weight add nothing: as the torch ops compute them."""
    gen = torch.Generator().manual_seed(4)
    teacher = torch.randn(6, 30, generator=gen) * 3
    values, indices = teacher.topk(5, dim=1)
    targets = topk_targets(values, indices, torch.logsumexp(teacher / 2.0, 1), 30, 2.0)
    tail = targets.tail.clone()
    tail[1] = 0.0
    weights = targets.weights.clone()
    weights[2, indices[2, -1]] = 0.0
    targets = dataclasses.replace(targets, tail=tail, weights=weights)
    student = torch.randn(6, 30, generator=gen) * 2
    (got, got_grad), (want, want_grad) = _both(student, targets, 0.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-7)


def _kernel_case(seed: int, rows: int, classes: int, k: int, *, scale: float):
    """Top-k targets at T = 1, `topk_kl`'s arguments after the logits (up to `exact_below`),
    and float32 logits."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(rows, classes, generator=gen)
    values, indices = teacher.topk(k, dim=1)
    targets = topk_targets(values, indices, torch.logsumexp(teacher, 1), classes, 1.0)
    args = (targets.weights, targets.tail_classes, targets.tail, targets.neg_entropy, 1.0, scale)
    return targets, args, torch.randn(rows, classes, generator=gen)


def test_it_steps_aside_for_other_logits_and_when_switched_off_or_missing(monkeypatch):
    targets, args, z = _kernel_case(8, 4, 12, 3, scale=0.25)
    value, grad = topk_kernel.topk_kl(z, *args, tg.TAIL_EXACT_BELOW)
    assert value.dtype == grad.dtype == torch.float32 and grad.shape == (4, 12)
    # float64 logits (gradcheck's) keep the torch ops.
    assert topk_kernel.topk_kl(z.double(), *args, tg.TAIL_EXACT_BELOW) is None

    monkeypatch.setattr(topk_kernel, "_compiled", False)  # looked up again
    monkeypatch.setenv(topk_kernel.ENV_SWITCH, "0")
    assert not topk_kernel.available()
    assert topk_kernel.topk_kl(z, *args, tg.TAIL_EXACT_BELOW) is None
    loss = kd_loss_targets(z.clone().requires_grad_(), targets, None)
    assert type(loss.grad_fn).__name__ == "_GivenGradientBackward"  # the torch ops' node

    monkeypatch.setattr(topk_kernel, "_compiled", False)
    monkeypatch.delenv(topk_kernel.ENV_SWITCH)
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` raises ImportError
    assert not topk_kernel.available()
    monkeypatch.setattr(topk_kernel, "_compiled", False)
    monkeypatch.delitem(sys.modules, "numba")
    assert topk_kernel.available()


def test_switched_off_runs_the_torch_ops_within_and_the_kernel_after():
    _, args, z = _kernel_case(9, 3, 10, 2, scale=1.0)
    with topk_kernel.switched_off():
        assert not topk_kernel.available()
        assert topk_kernel.topk_kl(z, *args, tg.TAIL_EXACT_BELOW) is None
    assert topk_kernel.available()
    assert topk_kernel.topk_kl(z, *args, tg.TAIL_EXACT_BELOW) is not None


_WARMED_THEN_STEPPED = """
import torch
from softcache.losses import topk_kernel
from softcache.losses.targets import kd_loss_targets, topk_targets

thread = topk_kernel.warm_up()
thread.join()
kernel = topk_kernel._kernel()
warmed = set(kernel.signatures)
gen = torch.Generator().manual_seed(0)
for temperature in (1.0, 2.0):  # the unscaled logits and the scaled copy
    values, indices = torch.randn(6, 40, generator=gen).float().topk(4, dim=1)
    lse = torch.logsumexp(torch.randn(6, 40, generator=gen) / temperature, dim=1)
    targets = topk_targets(values, indices, lse, 40, temperature)
    student = torch.nn.Linear(8, 40)
    loss = kd_loss_targets(student(torch.randn(6, 8)), targets, torch.arange(6), alpha=0.5)
    loss.backward()
print(len(warmed), len(set(kernel.signatures) - warmed))
"""


def test_warm_up_loads_the_one_signature_the_steps_call():
    """A fresh process's warm-up must load the kernel for the argument types a real step passes
    (else the first step compiles a second signature, the cost the warm-up is there to take)."""
    out = subprocess.run(
        [sys.executable, "-c", _WARMED_THEN_STEPPED],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    assert out.stdout.split() == ["1", "0"], out.stdout + out.stderr


def test_warm_up_starts_nothing_where_the_kernel_does_not_run(monkeypatch):
    monkeypatch.setattr(topk_kernel, "_compiled", None)
    assert topk_kernel.warm_up() is None


def test_a_step_beside_the_warm_up_gets_the_kernel_once(monkeypatch):
    """The warm-up thread and the training thread looking the kernel up at once make one."""
    made = []
    compile_kernel = topk_kernel._compile

    def slow_compile():
        made.append(threading.current_thread().name)
        time.sleep(0.2)  # the other thread arrives meanwhile
        return compile_kernel()

    monkeypatch.setattr(topk_kernel, "_compiled", False)
    monkeypatch.setattr(topk_kernel, "_compile", slow_compile)
    thread = topk_kernel.warm_up()
    assert thread is not None
    _, args, z = _kernel_case(3, 5, 9, 2, scale=1.0)
    got = topk_kernel.topk_kl(z, *args, tg.TAIL_EXACT_BELOW)
    thread.join()
    assert got is not None and len(made) == 1
