"""The top-k KL's value and gradient on the CPU in one compiled pass over each row (numba).

`softcache.losses.targets` computes the top-k dense form (``(B, C)`` kept weights and tail
mask) in a dozen torch ops. On a small head each op is mostly dispatch, and on the training
thread, whose caches the student's own pass has just filled, a dozen dispatches cost more than
the loss's arithmetic: in the benchmark's fast student (batches of 64 x 100 classes, 2.8 ms
steps, timed an epoch of each mode in turn) the top-k loss made a step 6.9 % dearer than the
hard-label loss did, against 2.4 % with this kernel (benchmarks/README.md, fourteenth pass).
This makes the same value and gradient as those ops (to float32 rounding; its sums are float64)
from torch's fused softmax and one compiled call over each row: the row's log-sum-exp, the
tail's share of the student's mass, the cross-entropy to the teacher's bins and
``(S q - P) / T``, written over the softmax. The softmax is torch's because numba takes
exponentials one libm call at a time: taking them itself, the kernel cost 43 µs on 64 x 100
against 18 µs, and the loss's forward and backward 106 µs against 84 µs (the hard loss's: 82 µs;
sixteenth pass).

Rows whose tail the student has no float32 mass in (under ``exact_below``) take the tail's mass
in log space, as the torch ops do, so nothing here falls back.

numba is optional (`pip install 'softcache[fast]'`). Without it, or with ``SOFTCACHE_NUMBA=0``
in the environment, `topk_kl` returns None and the torch ops run. The kernel is compiled at its
first call (about a second) and cached on disk beside this module (or in numba's user cache
where that is read-only), so later processes load it. Loading it still costs a process about
half a second (numba's import and its LLVM set-up): `warm_up` does that on a thread of its own,
which the trainer starts while its batch process starts, so that the first step does not wait
for it (the digits pipeline's top-3 runs spent 0.53-0.62 s of their first epoch there).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# Set to "0" to run the torch ops instead (for comparison, or where numba misbehaves).
ENV_SWITCH = "SOFTCACHE_NUMBA"


def topk_kl(
    z: Tensor,
    weights: Tensor,
    tail_classes: Tensor,
    tail: Tensor,
    neg_entropy: Tensor,
    temperature: float,
    scale: float,
    exact_below: float,
) -> tuple[Tensor, Tensor] | None:
    """``scale * sum_b KL_b`` of the top-k dense form and its gradient in `z`; None without numba.

    ``KL_b = sum p log p - sum_j W_bj log q_bj - tail_b log q_tail_b`` with ``q = softmax(z / T)``
    and ``q_tail`` its mass on the tail classes; the gradient is ``scale (S q - P) / T`` with P the
    kept weights plus the tail's mass spread as the student's tail is (`softcache.losses.targets`).

    Args:
        z: ``(B, C)`` float32 student logits on the CPU (read, not differentiated).
        weights: ``(B, C)`` teacher probabilities on the kept classes, 0 elsewhere.
        tail_classes: ``(B, C)`` 1 on each row's tail classes, 0 on its kept ones.
        tail: ``(B,)`` the teacher's tail mass.
        neg_entropy: ``(B,)`` ``sum p log p`` over the teacher's bins.
        temperature: ``T > 0``.
        scale: multiplies the summed KL and its gradient.
        exact_below: rows whose tail mass is under this take it in log space.

    Returns:
        ``(value, grad)``: a float32 0-d tensor and a ``(B, C)`` float32 tensor; or None where
        the kernel does not run (numba missing or switched off, logits of another dtype, a
        tensor off the CPU), for the caller's torch ops. float64 logits (gradcheck's) keep the
        torch ops, whose given gradient the recomputed one matches bit for bit there.
    """
    kernel = _kernel()
    if kernel is None or z.dtype != torch.float32 or z.device.type != "cpu":
        return None
    # One compiled kernel: every input float32 on the CPU (as `topk_rows` makes them; anything
    # else is converted, or refused by `numpy()`), read as numpy views of the same memory.
    try:
        arrays = [_float32_array(t) for t in (weights, tail_classes, tail, neg_entropy)]
    except TypeError:  # a tensor on a device
        return None
    inverse_t = 1.0 / temperature
    scaled = z.detach() if temperature == 1.0 else z.detach() * inverse_t
    # torch's fused softmax takes the row's exponentials vectorised; numba would take them one
    # libm call at a time (6 ns an element on this CPU: most of the kernel's time, 41 of 43 µs
    # on 64 x 100). The kernel turns the softmax into the gradient in place.
    grad = torch.softmax(scaled, dim=1)
    value = torch.empty((), dtype=torch.float32)
    kernel(scaled.numpy(), *arrays, inverse_t, scale, exact_below, grad.numpy(), value.numpy())
    return value, grad


def _float32_array(tensor: Tensor) -> Any:
    """`tensor` as a float32 numpy array (a view where it is float32 already)."""
    if tensor.dtype != torch.float32:
        tensor = tensor.float()
    return tensor.detach().numpy()


def _kl_rows(
    s: Any,
    weights: Any,
    tail_classes: Any,
    tail: Any,
    neg_entropy: Any,
    inverse_t: float,
    scale: float,
    exact_below: float,
    grad: Any,
    value: Any,
) -> None:
    """`topk_kl` on numpy arrays, written for numba (plain loops; also runs as Python).

    ``s`` is ``z / T``; ``grad`` holds ``q = softmax(s)`` on entry and the gradient on return.
    Every sum is float64. The row's log-sum-exp comes from its softmax at its largest logit
    (``q = 1 / sum exp(s - max)`` there), so no exponential is taken but for rows whose tail
    float32 cannot hold, whose tail's mass is summed in log space.
    """
    rows, classes = s.shape
    gradient_scale = -scale * inverse_t
    total = 0.0
    for b in range(rows):
        top = -math.inf
        at = 0
        for j in range(classes):
            if s[b, j] > top:
                top = s[b, j]
                at = j
        lse = top - math.log(grad[b, at])
        t = tail[b]
        kept = t  # S = sum P: the kept weights plus the tail's
        cross = 0.0
        q_tail = 0.0  # the student's mass on the tail classes
        for j in range(classes):
            w = weights[b, j]
            q_tail += grad[b, j] * tail_classes[b, j]
            if w != 0.0:
                cross += w * (s[b, j] - lse)
                kept += w
        if t > 0.0 and q_tail >= exact_below:
            cross += t * math.log(q_tail)
            spread = t / q_tail  # tail_b q_j / q_tail
            for j in range(classes):
                q = grad[b, j]
                p = weights[b, j] + spread * q * tail_classes[b, j]
                grad[b, j] = gradient_scale * (p - kept * q)
        elif t > 0.0:  # the tail's mass in log space: log sum_tail exp(z / T)
            tail_top = -math.inf
            for j in range(classes):
                if tail_classes[b, j] != 0.0:
                    tail_top = max(tail_top, s[b, j])
            tail_sum = 0.0
            for j in range(classes):
                if tail_classes[b, j] != 0.0:
                    tail_sum += math.exp(s[b, j] - tail_top)
            tail_lse = tail_top + math.log(tail_sum)
            cross += t * (tail_lse - lse)
            for j in range(classes):
                p = weights[b, j]
                if tail_classes[b, j] != 0.0:
                    p += t * math.exp(s[b, j] - tail_lse)
                grad[b, j] = gradient_scale * (p - kept * grad[b, j])
        else:  # no tail mass: no tail term
            for j in range(classes):
                grad[b, j] = gradient_scale * (weights[b, j] - kept * grad[b, j])
        total += neg_entropy[b] - cross
    value[()] = scale * total


# False: not looked up yet; None: not available (numba missing or switched off).
_compiled: Callable[..., None] | bool | None = False
# `warm_up`'s thread and the training thread may both look the kernel up first.
_lookup = threading.Lock()


def _kernel() -> Callable[..., None] | None:
    global _compiled
    if _compiled is False:
        with _lookup:
            if _compiled is False:
                _compiled = _compile()
    return _compiled  # type: ignore[return-value]


def warm_up() -> threading.Thread | None:
    """Load (or compile) the kernel on a daemon thread, for a process about to call `topk_kl`.

    The thread makes one call on a 1 x 2 row with the argument types `topk_kl` passes the
    kernel, so the signature the steps need is the one loaded. A `topk_kl` call made meanwhile
    waits for it (numba compiles and loads under one lock) instead of loading it a second time.
    Join the thread before the interpreter exits (numba must not be left mid-load).

    Returns:
        The started thread; None where the kernel does not run (numba missing or switched off,
        as far as is known without importing numba here).
    """
    if _compiled is None:
        return None
    thread = threading.Thread(target=_warm, name="softcache-topk-kernel", daemon=True)
    thread.start()
    return thread


def _warm() -> None:
    # The values do not matter, their types do: float32 tensors, Python floats.
    try:
        topk_kl(
            torch.zeros(1, 2),
            torch.tensor([[1.0, 0.0]]),
            torch.tensor([[0.0, 1.0]]),
            torch.zeros(1),
            torch.zeros(1),
            temperature=2.0,
            scale=1.0,
            exact_below=2.0**-60,
        )
    except Exception:  # the step's own call reports what is wrong, where it matters
        log.debug("warming the top-k kernel up failed", exc_info=True)


def _compile() -> Callable[..., None] | None:
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        log.info("%s=0: the top-k loss runs as torch ops", ENV_SWITCH)
        return None
    try:
        import numba
    except ImportError:
        log.info("numba is not installed: the top-k loss runs as torch ops (softcache[fast])")
        return None
    # nogil: a batch thread (`--loader thread`) runs beside it; cache: later processes load it;
    # numpy's error model: a division by zero gives inf (as torch's would), it does not raise.
    try:
        return numba.njit(_kl_rows, cache=True, nogil=True, error_model="numpy")
    except RuntimeError as exc:  # no writable cache directory: compile in every process
        log.info("numba cannot cache the top-k kernel (%s); compiling it in this process", exc)
        return numba.njit(_kl_rows, nogil=True, error_model="numpy")


def available() -> bool:
    """Whether `topk_kl` runs here (numba installed and not switched off)."""
    return _kernel() is not None


@contextlib.contextmanager
def switched_off() -> Iterator[None]:
    """Within it the torch ops compute the top-k loss, as without numba (for comparisons; not
    thread-safe: it switches the kernel off for the whole process)."""
    global _compiled
    kept = _kernel()
    _compiled = None
    try:
        yield
    finally:
        _compiled = kept
