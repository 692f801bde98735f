"""The per-token KD loss inside the byte LM's steps: hard, top-k from the rows, top-k from bins.

    .venv/bin/python -m benchmarks.lm_steps               # 25 epochs of 8 steps per mode
    .venv/bin/python -m benchmarks.lm_steps --epochs 60

The `lm` section of `benchmarks.run` times whole training runs, whose epochs of the byte LM are 8
steps: too few to see a loss that costs a few per cent of a step through the machine's drift.
This times the loss where it runs, in the step of the bundled byte-LM student
(`pipelines.textlm.models:student`, batches of 32 windows of 128 bytes, the `lm` section's
workload), over the top-32 store the section builds, one student per mode:

- ``hard``: next-token cross-entropy;
- ``top-k, from rows``: `topk_residual_kl` from the decoded rows (values, ids, residual): the
  teacher's side of the loss (its renormalised bins and their entropy) runs in the step;
- ``top-k, from bins``: `token_kd_loss` on the fields the trainer's loader delivers
  (`softcache.trainer.token_labels.decode_with_bins`): the bins were made as the rows were
  decoded, in the batch process, which is what `train --lm` runs.

The store's rows are decoded once, up front, and every batch is held in memory, so only the step
is timed: the student's forward, the loss, the backward (model and loss), the optimiser. The modes
take turns epoch by epoch, the order reversed every other turn, after one discarded epoch each.
The table gives each mode's median per phase and per step, and its median step over hard's.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.lm import BYTES_FULL, bytes_workload
from softcache.builder import build
from softcache.data.sequences import SequenceBatch, causal_logits, collate_sequences
from softcache.losses import tokens as token_losses
from softcache.runtime.specs import dataset_from, module_from
from softcache.store import LogitStore
from softcache.store.token_codec import TokenCodec
from softcache.trainer.token_labels import decode_with_bins
from softcache.trainer.tokens import token_kd_loss

MODES = ("hard", "top-k, from rows", "top-k, from bins")
PHASES = ("forward", "loss", "backward", "optimiser")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=25, help="timed epochs per mode")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="softcache-lm-steps-"))
    try:
        times = _step_times(workdir, args.epochs)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"byte LM, batches of 32 x 128 tokens, {args.threads} thread(s), {args.epochs} epochs")
    print(f"{'mode':18s}" + "".join(f"{p:>11s}" for p in PHASES) + f"{'step':>11s}  step/hard")
    hard = statistics.median(times["hard"]["step"])
    for mode in MODES:
        cells = [statistics.median(times[mode][p]) * 1e3 for p in (*PHASES, "step")]
        ratio = statistics.median(times[mode]["step"]) / hard
        print(f"{mode:18s}" + "".join(f"{c:8.2f} ms" for c in cells) + f"  {ratio:.3f}")


def _step_times(workdir: Path, epochs: int) -> dict[str, dict[str, list[float]]]:
    workload = bytes_workload("benchmarks.lm:bytes_full", 2)
    store_path = workdir / "lm-steps.zarr"
    build(workload.build_config("topk", store_path), progress=False)
    store = LogitStore.open(store_path)
    fields = decode_with_bins(store.read_rows(0, store.meta.num_tokens), store.meta)
    dataset = dataset_from(workload.dataset, "dataset")
    size = workload.train_batch
    offsets = store.offsets()
    batches = []
    for start in range(0, BYTES_FULL, size):
        inputs = collate_sequences([dataset[i] for i in range(start, start + size)])
        r0, r1 = int(offsets[start]), int(offsets[start + size])
        batches.append((inputs, {name: t[r0:r1].clone() for name, t in fields.items()}))
    students = {}
    for mode in MODES:
        torch.manual_seed(0)
        student = module_from(workload.student, "student")
        students[mode] = (student, torch.optim.Adam(student.parameters(), lr=1e-3))
    codec = store.meta.codec
    times: dict[str, dict[str, list[float]]] = {
        m: {p: [] for p in (*PHASES, "step")} for m in MODES
    }
    for turn in range(epochs + 1):
        for mode in MODES if turn % 2 else reversed(MODES):
            student, optimiser = students[mode]
            for inputs, labels in batches:
                phases = _step(mode, student, optimiser, inputs, labels, codec)
                if turn:  # the first epoch of each mode is discarded
                    for name, seconds in zip((*PHASES, "step"), phases, strict=True):
                        times[mode][name].append(seconds)
    return times


def _step(
    mode: str,
    student: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    inputs: SequenceBatch,
    labels: dict[str, torch.Tensor],
    codec: TokenCodec,
) -> tuple[float, ...]:
    """One step's phases, in seconds: forward, loss, backward, optimiser, and the whole."""
    t0 = time.perf_counter()
    logits = causal_logits(student, inputs.input_ids, inputs.attention_mask)
    rows = logits[inputs.attention_mask].float()
    t1 = time.perf_counter()
    if mode == "hard":
        loss = F.cross_entropy(rows, inputs.labels[inputs.attention_mask])
    elif mode == "top-k, from rows":
        loss = token_losses.topk_residual_kl(
            rows,
            labels["values"],
            labels["indices"],
            labels["residual"],
            temperature=codec.temperature,
        )
    else:
        loss = token_kd_loss(rows, labels, codec)
    t2 = time.perf_counter()
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    t3 = time.perf_counter()
    optimiser.step()
    t4 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0


if __name__ == "__main__":
    main()
