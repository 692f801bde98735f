"""The byte-level LM story end to end: teacher, per-token stores, one student trained four ways.

Run from the repository root: `python -m pipelines.textlm.run [--steps N] [--quick]`. Every build
and training stage is the real `softcache` command line, printed before it runs. It ends with
two tables (also in data/textlm/results.json):

1. the student after equal steps of hard-label training, top-k KD, sampled KD and online KD:
   perplexity and bits per byte on the held-out split, next-byte accuracy, agreement with the
   teacher's top-1 and KL to the teacher (the teacher is loaded for this evaluation only; the
   offline runs never run it in training);
2. every stored encoding over the held-out split: bytes per token on disk, the KL of what the
   cache can reconstruct to the teacher's full rows, and the cache loss over the exact KL for a
   reference student (the hard-label student of table 1; `pipelines.textlm.fidelity`).

Defaults: 1,000 steps of 32 windows of 128 bytes (4.1 M tokens, about 8.5 epochs of the 4,096
training windows) per student; about 9 minutes on two CPU cores. `--quick` runs 60 steps.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from pipelines.textlm.models import TEACHER_CHECKPOINT, student, teacher

ROOT = Path(__file__).resolve().parents[2]
DATA = TEACHER_CHECKPOINT.parent
TRAIN, TEST = "pipelines.textlm.data:train_set", "pipelines.textlm.data:test_set"
TEACHER, STUDENT = "pipelines.textlm.models:teacher", "pipelines.textlm.models:student"
# The KD stores (small: 3 % of the 256 ids kept, or 12 draws) and the held-out encodings.
KD_TOPK = ("--encoding", "topk", "--top-k", "8", "--value-bits", "7")
KD_SAMPLED = ("--encoding", "sampled", "--draws", "12")
HELD_OUT = {
    "top-8 fp16": ("--encoding", "topk", "--top-k", "8"),
    "top-8 u7": KD_TOPK,
    "top-32 fp16": ("--encoding", "topk", "--top-k", "32"),
    "top-32 u7": ("--encoding", "topk", "--top-k", "32", "--value-bits", "7"),
    "top-128 u8": ("--encoding", "topk", "--top-k", "128", "--value-bits", "8"),
    "sampled 12": KD_SAMPLED,
    "sampled 50": ("--encoding", "sampled", "--draws", "50"),
}


def sh(*args: str) -> None:
    """Run a command from the repository root, echoing it first; stop the pipeline if it fails."""
    print(f"\n$ {shlex.join(args)}", flush=True)
    subprocess.run(args, cwd=ROOT, check=True)


def softcache(*args: str) -> None:
    sh(sys.executable, "-m", "softcache.cli", *args)


def build(store: Path, dataset: str, encoding: tuple[str, ...]) -> None:
    softcache(
        "build", "--lm", "--teacher", TEACHER, "--dataset", dataset, "--output", str(store),
        *encoding, "--batch-size", "64", "--device", "cpu", "--overwrite", "--quiet",
    )  # fmt: skip


def train(name: str, steps: int, *extra: str) -> dict:
    out = DATA / "runs" / name
    softcache(
        "train", "--lm", "--student", STUDENT, "--dataset", TRAIN, "--eval-dataset", TEST,
        "--teacher", TEACHER, "--epochs", "100", "--max-steps", str(steps), "--batch-size", "32",
        "--lr", "3e-3", "--temperature", "1", "--seed", "0", "--device", "cpu",
        "--output", str(out), "--overwrite", "--quiet", *extra,
    )  # fmt: skip
    return json.loads((out / "metrics.json").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="optimiser steps per student")
    parser.add_argument("--quick", action="store_true", help="60 steps: a smoke run")
    args = parser.parse_args(argv)
    steps = 60 if args.quick else args.steps
    if not TEACHER_CHECKPOINT.is_file():
        sh(sys.executable, "-m", "pipelines.textlm.prepare")
    stores = DATA / "stores"
    build(stores / "train-top8.zarr", TRAIN, KD_TOPK)
    build(stores / "train-sampled12.zarr", TRAIN, KD_SAMPLED)
    for label, encoding in HELD_OUT.items():
        build(stores / f"test-{label.replace(' ', '-')}.zarr", TEST, encoding)
    eval_store = ("--eval-store", str(stores / "test-top-8-fp16.zarr"))
    # --store in every mode: the same blocks, so all four students see the same batches.
    layout = ("--store", str(stores / "train-top8.zarr"))
    runs = {
        "hard labels": train("hard", steps, "--mode", "hard", *layout, *eval_store),
        "top-8 KD (offline)": train(
            "top8", steps, "--store", str(stores / "train-top8.zarr"), *eval_store
        ),
        "sampled-12 KD (offline)": train(
            "sampled12", steps, "--store", str(stores / "train-sampled12.zarr"), *eval_store
        ),
        "online KD": train("online", steps, "--mode", "online", *layout, *eval_store),
    }
    fidelity = held_out_fidelity(stores, DATA / "runs" / "hard" / "checkpoint.pt")
    results = {"steps": steps, "students": runs, "encodings": fidelity}
    (DATA / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + student_table(runs, steps) + "\n\n" + encoding_table(fidelity))


def held_out_fidelity(stores: Path, reference: Path) -> dict[str, dict]:
    from pipelines.textlm.data import test_set
    from pipelines.textlm.fidelity import measure
    from softcache.store import LogitStore

    ref = student()
    ref.load_state_dict(torch.load(reference, map_location="cpu", weights_only=False)["student"])
    ref.eval()
    t, data = teacher(), test_set()
    return {
        label: measure(
            LogitStore.open(stores / f"test-{label.replace(' ', '-')}.zarr"), t, data, ref
        )
        for label in HELD_OUT
    }


def student_table(runs: dict[str, dict], steps: int) -> str:
    lines = [
        f"Student (2 layers, d = 48) after {steps} steps of 32 x 128 bytes, held-out split:",
        "| training | perplexity | bits/byte | next-byte acc. | teacher agreement | KL to teacher |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in runs.items():
        lines.append(
            f"| {name} | {m['eval_perplexity'][-1]:.3f} | {m['eval_bits_per_token'][-1]:.3f} | "
            f"{m['eval_accuracy'][-1]:.3f} | {m['teacher_agreement'][-1]:.3f} | "
            f"{m['eval_kl_to_teacher'][-1]:.4f} |"
        )
    return "\n".join(lines)


def encoding_table(fidelity: dict[str, dict]) -> str:
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        "Stored encodings of the held-out split (V = 256), against the teacher's full rows:",
        "| encoding | B/token | KL(p‖p~) | KL quant | loss/KL (ref. student) |",
        "|---|---|---|---|---|",
    ]
    for label, f in fidelity.items():
        lines.append(
            f"| {label} | {f['bytes_per_token']:.2f} | {fmt(f['kl_reconstructed'], '.4f')} | "
            f"{fmt(f['kl_bins_quant'], '.5f')} | {f['loss_over_kl']:.3f} ± {2 * f['loss_se']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
