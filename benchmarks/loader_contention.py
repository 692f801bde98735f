"""Why the trainer makes its batches in a child process: the GIL, and what the hand-off costs.

`python -m benchmarks.loader_contention [--rounds 5]` builds the train section's stores (the CIFAR-
like images, `teacher_cnn`) and prints, interleaved over rounds, medians of:

1. **steps beside a loader**: an epoch of the fast student's steps on one fixed batch (the
   `step-hard` case of `benchmarks/train.py`) alone; beside a thread running a layout's batches
   (hard, offline dense, offline top-5) without pause; and beside the same loader in another
   process. A thread that holds the GIL between the step's torch calls delays the step even with a
   core to spare; a process does not.
2. **the hand-off per batch**: the time the training thread waits in `next()` for a batch that is
   ready, in a loop of real steps of the CNN student, from the batch process and from the batch
   thread (`softcache.trainer.ahead.Ahead`), the epoch's first batch left out.

benchmarks/README.md ("Wave 2, issue 15, third pass") reads these.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.run import FAST_STUDENT, STUDENT, TEACHER
from benchmarks.train import TrainBench, TrainWorkload
from softcache.config import TrainConfig
from softcache.runtime.specs import instantiate
from softcache.trainer.ahead import Ahead
from softcache.trainer.ddp import Ranks
from softcache.trainer.layout_process import layout_process
from softcache.trainer.layouts import open_layout

LOADERS = (("hard", "dense"), ("offline", "dense"), ("offline", "topk"))


def _busy_loader(bench: TrainBench, mode: str, store: str, stop: Any) -> None:
    while not stop.is_set():
        bench._loader(mode, store)


def steps_beside(bench: TrainBench, where: str, mode: str, store: str) -> float:
    """Seconds of an epoch of steps, with a loader running without pause on a thread or in a
    process (`where`), or alone (`where="alone"`)."""
    if where == "alone":
        return bench._steps("hard", "dense")
    stop: Any
    if where == "thread":
        stop = threading.Event()
        worker: Any = threading.Thread(target=_busy_loader, args=(bench, mode, store, stop))
    else:
        context = multiprocessing.get_context("fork")  # the bench's own state, as it is
        stop = context.Event()
        worker = context.Process(target=_busy_loader, args=(bench, mode, store, stop))
    worker.start()
    time.sleep(0.3)  # the loader under way
    try:
        return bench._steps("hard", "dense")
    finally:
        stop.set()
        worker.join()


def handoff_waits(bench: TrainBench, loader: str, epochs: int = 3) -> list[float]:
    """Per-batch seconds the training thread waited in `next()`, epochs of the CNN student, the
    first batch of each epoch left out."""
    workload = bench.workload
    config = TrainConfig(
        student=workload.student, dataset=workload.dataset, store=str(bench.stores["dense"]),
        mode="hard", epochs=epochs, batch_size=workload.batch_size, device="cpu",
        output=str(bench.workdir / "unused"), loader=loader,
    )  # fmt: skip
    layout = open_layout(config, Ranks(), torch.device("cpu"), None)
    process = layout_process(config, Ranks(), torch.device("cpu")) if loader == "process" else None
    student = instantiate(workload.student, "student")
    optimizer = torch.optim.AdamW(student.parameters())
    waits: list[float] = []
    try:
        for epoch in range(epochs):
            plan = bench._plan()
            plan.set_epoch(epoch)
            batches: Iterator[Any]
            if process is not None:
                batches = process.batches(plan, len(plan), hash_stride=0, then=None)
            else:
                source = layout.batches(plan, len(plan), hash_stride=0, then=None)
                batches = Ahead(source, depth=2).results()
            ready = time.perf_counter()
            for i, batch in enumerate(batches):
                if i:
                    waits.append(time.perf_counter() - ready)
                loss, _ = layout.loss(student, batch, None)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                float(loss.detach())
                ready = time.perf_counter()
    finally:
        if process is not None:
            process.close()
    return waits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="softcache-loader-contention-"))
    images = "benchmarks.models:images_full"
    fast = TrainBench(TrainWorkload("", FAST_STUDENT, TEACHER, images), workdir / "fast")
    cnn = TrainBench(TrainWorkload("", STUDENT, TEACHER, images), workdir / "cnn")
    cases: dict[str, Callable[[], float]] = {
        "steps alone": lambda: steps_beside(fast, "alone", "", "")
    }
    for where in ("thread", "process"):
        for mode, store in LOADERS:
            name = f"steps beside a {where} loader, {mode} {store}"
            cases[name] = lambda w=where, m=mode, s=store: steps_beside(fast, w, m, s)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    waits: dict[str, list[float]] = {"process": [], "thread": []}
    for _ in range(args.rounds):
        for name, case in cases.items():
            samples[name].append(case())
        for loader in waits:
            waits[loader].extend(handoff_waits(cnn, loader))
    print(f"fast student, an epoch of steps on one batch ({args.rounds} rounds, median):")
    for name, values in samples.items():
        print(f"  {name:<48} {statistics.median(values) * 1e3:7.1f} ms")
    print("CNN student, the training thread's wait per ready batch (median, 90th percentile):")
    for loader, values in waits.items():
        ordered = sorted(values)
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        print(f"  batch {loader:<8} {statistics.median(values) * 1e6:6.0f} us  {p90 * 1e6:6.0f} us")


if __name__ == "__main__":
    main()
