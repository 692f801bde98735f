"""Token capture with vLLM (`--teacher vllm:DIR`) next to `hf:DIR`: positions per second.

One tiny random Llama (vocabulary 512, hidden 128, 2 heads of 64, 2 layers: the integration
test's model) written with `save_pretrained` into a temporary directory, and `SEQUENCES` random
sequences of `LENGTH` tokens (`dataset`, a spec the builds import). Each teacher builds the same
top-8 store once through `softcache.builder.build`; the figure is the build's own rate
(`BuildResult.samples_per_second`: tokens coded per second of the shard loop, from the first shard
to the last write), and the wall time from the call to its return beside it (the engine start,
the scan, the probe that compiles vLLM's first batch). One run each: read the ratio, not the
numbers, and the load average printed with them.

It needs vLLM, so it runs in the environment of the README's "vLLM teachers":

    venv-vllm/bin/python -m benchmarks.vllm_capture
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from softcache.builder import build
from softcache.config import BuildConfig

SEQUENCES = 512
LENGTH = 128
TOP_K = 8
BATCH = 64  # sequences per teacher call, for both
SHARD_ROWS = 16384  # tokens: 128 sequences, two batches per shard


def dataset() -> list[dict[str, torch.Tensor]]:
    """`SEQUENCES` items of (LENGTH,) int64 random ids below 512, seeded."""
    gen = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(0, 512, (LENGTH,), generator=gen)} for _ in range(SEQUENCES)
    ]


def _teacher(directory: Path) -> Path:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(directory))
    return directory


def _run(teacher: str, out: Path) -> tuple[float, float]:
    config = BuildConfig(
        teacher=teacher,
        dataset="benchmarks.vllm_capture:dataset",
        output=str(out),
        lm=True,
        encoding="topk",
        top_k=TOP_K,
        batch_size=BATCH,
        shard_rows=SHARD_ROWS,
        device="cpu",
    )
    t0 = time.perf_counter()
    result = build(config, progress=False)
    return result.samples_per_second, time.perf_counter() - t0


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = _teacher(Path(tmp) / "llama")
        rates = {}
        for name in ("hf", "vllm"):
            rate, wall = _run(f"{name}:{model}", Path(tmp) / f"{name}.zarr")
            rates[name] = rate
            load = os.getloadavg()[0]
            print(
                f"{name:5s} {rate:10,.0f} positions/s in the shard loop, {wall:6.1f} s from call "
                f"to return ({SEQUENCES * LENGTH:,} positions; load {load:.2f})"
            )
        print(f"vllm / hf: {rates['vllm'] / rates['hf']:.2f}")


if __name__ == "__main__":
    main()
