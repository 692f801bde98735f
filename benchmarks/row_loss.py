"""The row KD loss's cost on the training thread, against the hard-label cross-entropy it adds to.

    .venv/bin/python -m benchmarks.row_loss                   # 64x100 (the fast student), 256x128
    .venv/bin/python -m benchmarks.row_loss --shapes 64x100 --rounds 31

A CPU student's step computes only the student's side of the KD loss (`losses.kd_loss_targets`;
the teacher's side is prepared in the batch process). For each ``BATCHxCLASSES`` shape it times
forward + backward of one ``(B, C)`` float32 student's loss, in microseconds:

- ``hard CE``: `losses.hard_loss`, the hard-label run's whole loss (the floor);
- ``dense`` / ``top-5``: `kd_loss_targets` from dense and top-5 targets at T = 2, prepared
  beforehand as the batch process does (shapes up to `DENSE_TOPK_ELEMENTS` logits, where top-k
  targets take the dense form; larger heads take the sparse kernel, timed by `benchmarks.loss`);
- ``dense on step`` / ``top-5 on step``: `kd_loss_dense` / `kd_loss_topk`, the teacher's side
  computed on the step too, as a loop of one's own pays without `teacher_targets`.

Each figure is the median over interleaved rounds (every case once per round, 200 steps each)
of the per-step time, with ``--threads`` intra-op threads (default 1, like `benchmarks.run`); a
``.backward()`` costs tens of microseconds on its own, so the differences between cases are what
a step pays for its loss.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from softcache import losses
from softcache.losses.targets import DENSE_TOPK_ELEMENTS

CASES = ("hard CE", "dense", "top-5", "dense on step", "top-5 on step")
TEMPERATURE = 2.0
STEPS = 200


def cases(batch: int, classes: int) -> dict[str, Callable[[], None]]:
    """One forward + backward per case over the same student logits (seeded)."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(batch, classes, generator=gen).requires_grad_()
    teacher = torch.randn(batch, classes, generator=gen) * 3
    labels = torch.randint(0, classes, (batch,), generator=gen)
    dense = losses.dense_targets(teacher, TEMPERATURE)
    values, indices = teacher.topk(5, dim=1)
    lse = torch.logsumexp(teacher / TEMPERATURE, dim=1)
    topk = losses.topk_targets(values, indices, lse, classes, TEMPERATURE)
    half = teacher.half()  # as a dense store holds it
    losses_of: dict[str, Callable[[], torch.Tensor]] = {
        "hard CE": lambda: losses.hard_loss(student, labels),
        "dense": lambda: losses.kd_loss_targets(student, dense, labels),
        "top-5": lambda: losses.kd_loss_targets(student, topk, labels),
        "dense on step": lambda: losses.kd_loss_dense(
            student, half, labels, temperature=TEMPERATURE
        ),
        "top-5 on step": lambda: losses.kd_loss_topk(
            student, values, indices, lse, labels, temperature=TEMPERATURE
        ),
    }

    def stepper(loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            student.grad = None
            loss().backward()

        return run

    return {name: stepper(loss) for name, loss in losses_of.items()}


def times(batch: int, classes: int, rounds: int) -> dict[str, list[float]]:
    """Microseconds per forward + backward, per case, `rounds` interleaved rounds after one."""
    runs = cases(batch, classes)
    out: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds + 1):
        for name, run in runs.items():
            t0 = time.perf_counter()
            for _ in range(STEPS):
                run()
            if r:
                out[name].append((time.perf_counter() - t0) / STEPS * 1e6)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="64x100,256x128", help="BATCHxCLASSES,...")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    for batch, classes in shapes:
        if batch * classes > DENSE_TOPK_ELEMENTS:
            parser.error(
                f"--shapes: {batch}x{classes} is over {DENSE_TOPK_ELEMENTS} logits, where top-k "
                "targets take the sparse kernel (time that with benchmarks.loss)"
            )
    print(f"{args.threads} thread(s), median of {args.rounds} rounds of {STEPS} steps")
    header = f"{'shape':>9}  {'loss':<15} {'fwd+bwd us':>10} {'over hard':>10} {'range':>15}"
    print(header)
    print("-" * len(header))
    for batch, classes in shapes:
        samples = times(batch, classes, args.rounds)
        base = statistics.median(samples["hard CE"])
        for name in CASES:
            median = statistics.median(samples[name])
            spread = f"{min(samples[name]):.1f}-{max(samples[name]):.1f}"
            print(
                f"{batch:>4}x{classes:<4}  {name:<15} {median:>10.1f} "
                f"{median - base:>+10.1f} {spread:>15}"
            )


if __name__ == "__main__":
    main()
