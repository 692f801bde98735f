"""zarrs reads every store kind as zarr-python does, and the stream delivers the same batches
whichever pipeline decodes (`softcache.store.read_pipeline`); a zip store still streams (zarrs falls
back to zarr-python there). The S3 path streams in `test_object_storage.py` with zarrs enabled as
it is by default."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from softcache.store import LogitStore
from softcache.store.read_pipeline import ZARRS_PIPELINE, read_pipeline, zarrs_available
from softcache.trainer.plan import EpochPlan
from softcache.trainer.stream import SoftLabelStream
from tests.conftest import spec
from tests.helpers import build_row_stores, build_token_store

pytestmark = pytest.mark.skipif(not zarrs_available(), reason="zarrs is not installed")

KINDS = {
    "dense-fp16": {},
    "dense-bf16": {"dtype": "bfloat16"},
    "topk-fp32": {"encoding": "topk", "top_k": 5, "dtype": "float32"},
    "topk-bf16": {"encoding": "topk", "top_k": 5, "dtype": "bfloat16"},
    "views": {
        "teacher": spec("conv_teacher"),
        "views": 4,
        "augment": "crop(size=8,scale=0.4:1);flip",
    },
}
TOKENS = {
    "tokens-topk": ("--encoding", "topk", "--top-k", "8", "--value-bits", "7"),
    "tokens-sampled": ("--encoding", "sampled", "--draws", "12"),
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pipelines")
    out = build_row_stores(base, KINDS)
    for name, args in TOKENS.items():
        out[name] = build_token_store(base / f"{name}.zarr", *args)
    return out


def _pipeline_name(arr: zarr.Array) -> str:
    pipeline = arr._async_array.codec_pipeline
    return f"{type(pipeline).__module__}.{type(pipeline).__name__}"


@pytest.mark.parametrize("kind", [*KINDS, *TOKENS])
def test_zarrs_reads_every_array_bit_for_bit(stores: dict[str, Path], kind: str) -> None:
    plain = zarr.open_group(str(stores[kind]), mode="r")
    with read_pipeline():
        fast = zarr.open_group(str(stores[kind]), mode="r")
        names = sorted(fast.array_keys())
        fast_arrays = {name: fast[name] for name in names}
    for name in names:
        a, b = plain[name], fast_arrays[name]
        assert isinstance(a, zarr.Array) and isinstance(b, zarr.Array)
        assert "zarrs" in _pipeline_name(b).lower() and "zarrs" not in _pipeline_name(a).lower()
        x, y = np.asarray(a[...]), np.asarray(b[...])
        assert x.dtype == y.dtype and x.shape == y.shape, name
        bits = np.dtype(f"u{x.dtype.itemsize}")
        assert np.array_equal(x.view(bits), y.view(bits)), f"{kind}: {name} differs"


def test_softcache_reads_with_zarrs_and_writes_with_zarr_python(stores: dict[str, Path]) -> None:
    reader = LogitStore.open(str(stores["dense-fp16"]))
    assert ZARRS_PIPELINE.split(".")[-1] in _pipeline_name(reader.array("logits"))
    writer = LogitStore.open(str(stores["dense-fp16"]), mode="r+")
    assert "zarrs" not in _pipeline_name(writer.array("logits")).lower()


def _stream(path: Path, monkeypatch: pytest.MonkeyPatch, zarrs: bool, **kwargs) -> list:
    """The stream's batches read the fast way (shard files, else zarrs), or by zarr-python."""
    monkeypatch.setenv("SOFTCACHE_ZARRS", "1" if zarrs else "0")
    monkeypatch.setenv("SOFTCACHE_DIRECT_READS", "1" if zarrs else "0")
    store = LogitStore.open(str(path))
    meta = store.meta
    block = meta.shard_samples if not meta.tokens else 7
    plan = EpochPlan(num_samples=meta.num_samples, block_rows=block, batch_size=16, seed=3)
    return list(SoftLabelStream(store, **kwargs).batches(plan))


def _same(a, b) -> None:
    assert np.array_equal(a.indices, b.indices)
    tensors_a = a.fields if hasattr(a, "fields") else vars(a)
    tensors_b = b.fields if hasattr(b, "fields") else vars(b)
    for key, value in tensors_a.items():
        other = tensors_b[key]
        if isinstance(value, torch.Tensor):
            assert value.dtype == other.dtype and torch.equal(value, other), key
        elif isinstance(value, np.ndarray):
            assert np.array_equal(value, other), key
        else:
            assert value == other, key


@pytest.mark.parametrize("kind", [*KINDS, *TOKENS])
@pytest.mark.parametrize("values", ["float32", "stored"])
def test_the_stream_delivers_the_same_batches_with_either_pipeline(
    stores: dict[str, Path], kind: str, values: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kind.startswith("tokens") and values == "stored":
        pytest.skip("token stores deliver decoded tensors only")
    fast = _stream(stores[kind], monkeypatch, True, values=values)
    plain = _stream(stores[kind], monkeypatch, False, values=values)
    assert len(fast) == len(plain) > 1
    for a, b in zip(fast, plain, strict=True):
        _same(a, b)


def test_a_zip_store_streams_the_same_batches(
    stores: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = shutil.make_archive(str(tmp_path / "topk"), "zip", stores["topk-bf16"])
    fast = _stream(Path(archive), monkeypatch, True)
    plain = _stream(stores["topk-bf16"], monkeypatch, False)
    for a, b in zip(fast, plain, strict=True):
        _same(a, b)


def _plain_rows(path: Path, name: str, rows: np.ndarray) -> np.ndarray:
    """Rows of one array read by plain zarr-python, no softcache code on the way."""
    return np.asarray(zarr.open_group(str(path), mode="r")[name][...])[rows]


def _widened(stored: np.ndarray, value_dtype: str) -> np.ndarray:
    """The float32 of stored values, by numpy alone (bfloat16: the high half of a float32)."""
    if value_dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


@pytest.mark.parametrize("assemble_ahead", [0, 2])
@pytest.mark.parametrize("values", ["float32", "stored"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_the_stream_delivers_the_rows_plain_zarr_reads(
    stores: dict[str, Path], kind: str, values: str, assemble_ahead: int
) -> None:
    # The stream's fast paths (a window read in one concurrent read_many, zarrs, torch's float16
    # widening, gathering on the caller's thread) against plain zarr and numpy, batch by batch.
    path = stores[kind]
    store = LogitStore.open(str(path))
    meta = store.meta
    plan = EpochPlan(num_samples=meta.num_samples, block_rows=meta.shard_samples, batch_size=16)
    stream = SoftLabelStream(store, values=values, assemble_ahead=assemble_ahead)
    batches = list(stream.batches(plan))
    assert len(batches) == len(plan) > 1
    for soft in batches:
        rows = soft.indices if soft.views is None else soft.indices * meta.views + soft.views
        got = {
            "sample_hash": soft.sample_hash,
            "logits": soft.logits,
            "topk_values": soft.topk_values,
            "topk_indices": soft.topk_indices,
            "lse": soft.lse,
            "view_params": soft.view_params,
        }
        for name in store.row_array_names:
            plain = _plain_rows(path, name, rows)
            value = got[name]
            if isinstance(value, torch.Tensor):
                if value.dtype == torch.bfloat16:  # stored bfloat16: compare the bits
                    value = value.view(torch.int16)
                value = value.numpy()
            if name in ("logits", "topk_values") and values == "float32":
                plain = _widened(plain, meta.value_dtype)
            elif name == "topk_indices" and values == "float32":
                plain = plain.astype(np.int64)
            elif name in ("logits", "topk_values") and meta.value_dtype == "bfloat16":
                plain = plain.view(np.int16)
            assert value.dtype == plain.dtype, (name, value.dtype, plain.dtype)
            bits = np.dtype(f"u{plain.dtype.itemsize}")
            assert np.array_equal(value.view(bits), plain.view(bits)), f"{kind}: {name} differs"


@pytest.mark.parametrize("kind", list(TOKENS))
def test_a_token_stream_gathered_on_the_callers_thread_is_the_plain_stream(
    stores: dict[str, Path], kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The trainer reads token stores with assemble_ahead=0 and zarrs: the same decoded batches
    # as the stream's own assembler thread over zarr-python.
    fast = _stream(stores[kind], monkeypatch, True, assemble_ahead=0)
    plain = _stream(stores[kind], monkeypatch, False, assemble_ahead=2)
    assert len(fast) == len(plain) > 1
    for a, b in zip(fast, plain, strict=True):
        _same(a, b)
