"""Peak memory and time of the per-token KD losses against cross-entropy, at LM vocabularies.

    .venv/bin/python -m benchmarks.loss                        # CPU: V = 32k and 128k
    .venv/bin/python -m benchmarks.loss --device cuda          # the issue's 8,192 tokens at 128k
    .venv/bin/python -m benchmarks.loss --shapes 131072x8192   # VOCABxTOKENS, comma-separated

For each (V, T) it runs forward + backward of four losses over one ``(T, V)`` float32 student:

- ``cross-entropy``: ``F.cross_entropy`` to one hard target per token, the floor every LM trainer
  pays already;
- ``naive KL``: `topk_residual_kl_reference`, the top-32 + tail loss in plain autograd;
- ``lean top-k``: `topk_residual_kl` (`softcache.losses.sparse`: chunked, its own backward);
- ``lean sampled``: `sampled_kl` over 32 draws (padded ids, counts).

**Peak extra memory** is what the loss adds over the student's logits at its highest point,
the logits' gradient included (every case needs one). On CUDA it is
``torch.cuda.max_memory_allocated`` minus the memory held before the case. On a CPU torch's
allocator is invisible to ``tracemalloc`` (it allocates outside Python's allocator), so each case
runs in a fresh subprocess and the figure is the growth of the process's peak resident set
(``ru_maxrss``) over its value with the inputs in place: large tensors are ``mmap``ed and returned
when freed, so this is the peak of simultaneously live buffers, to a few MiB.

**Time** is the median of interleaved rounds (every case once per round, after a warm-up round),
in one process, with ``--threads`` intra-op threads (default 1, like `benchmarks.run`).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from softcache.losses import tokens as token_losses

CASES = ("cross-entropy", "naive KL", "lean top-k", "lean sampled")
K = 32
DRAWS = 32


def inputs(vocab: int, tokens: int, device: str) -> dict[str, torch.Tensor]:
    """A student's logits and a teacher's sparse rows (top-32 + tail; 32 draws), deterministic."""
    gen = torch.Generator(device=device).manual_seed(0)
    # In place: a temporary (T, V) tensor would raise the CPU baseline's peak RSS.
    logits = torch.empty(tokens, vocab, device=device).normal_(0.0, 2.0, generator=gen)
    # Distinct ids per row without a (T, V) top-k: a strided set, shifted per row.
    stride = vocab // K
    base = torch.arange(K, device=device) * stride
    shift = torch.randint(0, stride, (tokens, 1), generator=gen, device=device)
    indices = base + shift
    bins = torch.randn(tokens, K + 1, generator=gen, device=device) * 2.0
    log_p = torch.log_softmax(bins, dim=1)
    ids = indices.clone()
    counts = torch.randint(0, 3, (tokens, K), generator=gen, device=device).to(torch.uint8)
    counts[:, 0] += 1
    return {
        "logits": logits,
        "values": log_p[:, :K].contiguous(),
        "indices": indices,
        "residual": log_p[:, K].contiguous(),
        "ids": ids,
        "counts": counts,
        "entropy": torch.rand(tokens, generator=gen, device=device),
        "targets": indices[:, 0].contiguous(),
    }


def step(case: str, data: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One forward + backward of `case` on a fresh leaf over the same logits."""
    student = data["logits"].requires_grad_()

    def run() -> None:
        student.grad = None
        if case == "cross-entropy":
            loss = F.cross_entropy(student, data["targets"])
        elif case == "naive KL":
            loss = token_losses.topk_residual_kl_reference(
                student, data["values"], data["indices"], data["residual"], temperature=2.0
            )
        elif case == "lean top-k":
            loss = token_losses.topk_residual_kl(
                student, data["values"], data["indices"], data["residual"], temperature=2.0
            )
        else:
            loss = token_losses.sampled_kl(
                student, data["ids"], data["counts"], data["entropy"], temperature=2.0
            )
        loss.backward()

    return run


def peak_extra_cpu(case: str, vocab: int, tokens: int, threads: int) -> float:
    """Bytes: the growth of this subprocess's peak RSS over one forward + backward of `case`."""
    torch.set_num_threads(threads)
    data = inputs(vocab, tokens, "cpu")
    run = step(case, data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) * 1024.0  # Linux reports KiB


def peak_extra_cuda(case: str, data: dict[str, torch.Tensor]) -> float:
    """Bytes over the memory held before the case, from the CUDA allocator's peak."""
    run = step(case, data)
    data["logits"].grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - held)


def times(
    data: dict[str, torch.Tensor], rounds: int, device: str, cases: tuple[str, ...] = CASES
) -> dict[str, list[float]]:
    """Seconds of forward + backward per case, `rounds` interleaved rounds after a warm-up."""
    runs = {case: step(case, data) for case in cases}
    out: dict[str, list[float]] = {case: [] for case in cases}
    for r in range(rounds + 1):
        for case, run in runs.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            if r:
                out[case].append(time.perf_counter() - t0)
    data["logits"].grad = None
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--shapes", default=None, help="VOCABxTOKENS,... (default per device)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help="comma-separated losses to run (cross-entropy always runs: it is the baseline); "
        "leave out 'naive KL' where its buffers do not fit",
    )
    parser.add_argument(
        "--memory-case", nargs=3, metavar=("CASE", "VOCAB", "TOKENS"), help="internal"
    )
    args = parser.parse_args(argv)
    if args.memory_case:
        case, vocab, tokens = args.memory_case
        print(json.dumps(peak_extra_cpu(case, int(vocab), int(tokens), args.threads)))
        return
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # CPU default: 8,192 tokens at 32k, 2,048 at 128k (the naive loss's buffers at 128k x 8,192
    # would take ~30 GB of this shared 24 GiB machine). The target shape on a GPU.
    default = "32768x8192,131072x2048" if device == "cpu" else "32768x8192,131072x8192"
    shapes = [tuple(int(x) for x in s.split("x")) for s in (args.shapes or default).split(",")]
    chosen = {c.strip() for c in args.cases.split(",")} | {"cross-entropy"}
    if chosen - set(CASES):
        parser.error(f"--cases: unknown {sorted(chosen - set(CASES))}; choose from {CASES}")
    cases = tuple(c for c in CASES if c in chosen)
    torch.set_num_threads(args.threads)
    header = (
        f"{'V':>7} {'tokens':>6}  {'loss':<13} {'peak extra MiB':>14} {'x CE':>6} "
        f"{'fwd+bwd s':>10} {'x CE':>6}"
    )
    print(f"device {device}, {args.threads} thread(s), median of {args.rounds} rounds")
    print(header)
    print("-" * len(header))
    for vocab, tokens in shapes:
        peaks: dict[str, float] = {}
        data = inputs(vocab, tokens, device)
        for case in cases:
            if device == "cuda":
                peaks[case] = peak_extra_cuda(case, data)
            else:
                done = subprocess.run(
                    [sys.executable, "-m", "benchmarks.loss", "--memory-case", case,
                     str(vocab), str(tokens), "--threads", str(args.threads)],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
                peaks[case] = float(done.stdout.strip().splitlines()[-1])
        timings = times(data, args.rounds, device, cases)
        medians = {c: statistics.median(t) for c, t in timings.items()}
        del data
        base = peaks["cross-entropy"]
        for case in cases:
            # RSS reads 0 growth when the machine pages the process out mid-case: n/a, not a ratio.
            ratio = f"{peaks[case] / base:>6.2f}" if base > 0 else f"{'n/a':>6}"
            print(
                f"{vocab:>7} {tokens:>6}  {case:<13} {peaks[case] / 2**20:>14.0f} "
                f"{ratio} {medians[case]:>10.3f} "
                f"{medians[case] / medians['cross-entropy']:>6.2f}"
            )
    logits_mib = {f"{v}x{t}": v * t * 4 / 2**20 for v, t in shapes}
    print(
        f"(one float32 (T, V) tensor: {', '.join(f'{k} {m:.0f} MiB' for k, m in logits_mib.items())})"
    )


if __name__ == "__main__":
    main()
