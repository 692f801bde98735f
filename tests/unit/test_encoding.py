"""Tests for softcache.store.row_codec: dense casts, exact top-k and log-sum-exp, and the row flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softcache.store import LOGITS, LSE, TOPK_INDICES, TOPK_VALUES, decode_values, encode_values
from softcache.store.row_codec import NONFINITE, OVERFLOW, encode_batch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _logits(batch: int = 6, classes: int = 50, seed: int = 0, scale: float = 4.0) -> torch.Tensor:
    return torch.randn(batch, classes, generator=torch.Generator().manual_seed(seed)) * scale


def _host_values(tensor: torch.Tensor, value_dtype: str) -> np.ndarray:
    """Encoder output -> the numpy array the store keeps (bfloat16 int16 bits -> uint16)."""
    array = tensor.numpy()
    return array.view(np.uint16) if value_dtype == "bfloat16" else array


@pytest.mark.parametrize("value_dtype", list(DTYPES))
def test_dense_values_are_the_cast_logits(value_dtype: str) -> None:
    logits = _logits()
    out = encode_batch(logits, encoding="dense", value_dtype=value_dtype)
    assert set(out) == {LOGITS, NONFINITE, OVERFLOW}
    stored = _host_values(out[LOGITS], value_dtype)
    expected = logits.to(DTYPES[value_dtype]).float().numpy()
    np.testing.assert_array_equal(decode_values(stored, value_dtype), expected)
    assert not out[NONFINITE].any() and not out[OVERFLOW].any()


def test_float16_widening_is_numpys_cast_for_every_bit_pattern() -> None:
    # decode_values widens float16 with torch (vectorised), not numpy: every one of the 65,536
    # values, infinities and subnormals included, must come out bit for bit the same. NaNs stay
    # NaN (the hardware cast quiets a signalling NaN's payload; a store holds no NaN anyway: the
    # encoder flags non-finite rows).
    every = np.arange(2**16, dtype=np.uint16).view(np.float16).reshape(256, 256)
    got = decode_values(every, "float16")
    nan = np.isnan(every)
    assert np.isnan(got[nan]).all()
    want = every.astype(np.float32)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    read_only = every[:, ::3]  # a strided, read-only view, as a store read may hand over
    read_only.flags.writeable = False
    got = decode_values(read_only, "float16")
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, read_only.astype(np.float32))


def test_bfloat16_bits_agree_with_the_numpy_encoder() -> None:
    """The device encoder (torch) and store.encode_values (numpy) give the same bit patterns."""
    logits = _logits(classes=300, scale=100.0)
    out = encode_batch(logits, encoding="dense", value_dtype="bfloat16")
    assert out[LOGITS].dtype == torch.int16
    np.testing.assert_array_equal(
        out[LOGITS].numpy().view(np.uint16), encode_values(logits.numpy(), "bfloat16")
    )


@pytest.mark.parametrize("value_dtype", list(DTYPES))
def test_topk_indices_values_and_exact_lse(value_dtype: str) -> None:
    logits = _logits(batch=9, classes=40)
    temps = (1.0, 2.0, 0.5, 4.0)
    out = encode_batch(
        logits,
        encoding="topk",
        value_dtype=value_dtype,
        k=7,
        temperatures=temps,
        index_dtype=torch.int32,
    )
    assert set(out) == {TOPK_VALUES, TOPK_INDICES, LSE, NONFINITE, OVERFLOW}
    values, indices = torch.topk(logits, 7, dim=1)
    assert out[TOPK_INDICES].dtype == torch.int32
    torch.testing.assert_close(out[TOPK_INDICES].long(), indices, rtol=0, atol=0)
    decoded = decode_values(_host_values(out[TOPK_VALUES], value_dtype), value_dtype)
    np.testing.assert_array_equal(decoded, values.to(DTYPES[value_dtype]).float().numpy())
    assert np.all(np.diff(decoded, axis=1) <= 0)  # sorted descending
    assert out[LSE].dtype == torch.float32 and out[LSE].shape == (9, 4)
    for j, t in enumerate(temps):
        # Bitwise: the same float32 reduction as torch.logsumexp over the full row.
        expected = torch.logsumexp(logits / t, dim=1)
        np.testing.assert_array_equal(out[LSE][:, j].numpy(), expected.numpy())
    # The normaliser is of the full row: kept probabilities at T sum to at most 1.
    for j, t in enumerate(temps):
        kept = torch.exp(values / t - out[LSE][:, j : j + 1]).sum(dim=1)
        assert torch.all(kept <= 1 + 1e-6)
        torch.testing.assert_close(
            kept, torch.softmax(logits / t, dim=1).gather(1, indices).sum(dim=1)
        )


def test_topk_of_half_precision_logits_reduces_in_float32() -> None:
    logits = _logits(classes=30).half()  # what a teacher under autocast returns
    out = encode_batch(logits, encoding="topk", value_dtype="float16", k=3, temperatures=(1.0,))
    expected = torch.logsumexp(logits.float(), dim=1)
    np.testing.assert_array_equal(out[LSE][:, 0].numpy(), expected.numpy())
    assert out[LSE].dtype == torch.float32


def test_k_equal_to_classes_keeps_the_whole_row_sorted() -> None:
    logits = _logits(batch=2, classes=5)
    out = encode_batch(logits, encoding="topk", value_dtype="float32", k=5, temperatures=(1.0,))
    assert sorted(out[TOPK_INDICES][0].tolist()) == [0, 1, 2, 3, 4]
    kept = torch.exp(out[TOPK_VALUES] - out[LSE]).sum(dim=1)
    torch.testing.assert_close(kept, torch.ones(2))


def test_uint16_indices_travel_as_int16_bits() -> None:
    """C = 65536: class ids above int16's range survive the int16 view the encoder returns."""
    classes = 65_536
    logits = torch.zeros(3, classes)
    logits[0, 65_535] = 9.0
    logits[0, 32_768] = 8.0
    logits[1, 0] = 9.0
    logits[1, 12_345] = 8.0
    logits[2, 40_000] = 9.0
    logits[2, 32_767] = 8.0
    out = encode_batch(
        logits,
        encoding="topk",
        value_dtype="float32",
        k=2,
        temperatures=(1.0,),
        index_dtype=torch.int16,
    )
    assert out[TOPK_INDICES].dtype == torch.int16
    ids = out[TOPK_INDICES].numpy().view(np.uint16)
    assert ids.tolist() == [[65_535, 32_768], [0, 12_345], [40_000, 32_767]]


@pytest.mark.parametrize("encoding", ["dense", "topk"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_rows_are_flagged(encoding: str, bad: float) -> None:
    logits = _logits(batch=5, classes=10)
    logits[3, 6] = bad
    out = encode_batch(logits, encoding=encoding, value_dtype="float32", k=3, temperatures=(1.0,))
    assert out[NONFINITE].tolist() == [False, False, False, True, False]
    assert not out[OVERFLOW].any()  # a non-finite teacher row is not an overflow


@pytest.mark.parametrize(
    ("value_dtype", "value", "flagged"),
    [
        ("float16", 1e5, True),
        ("float16", -1e5, True),
        ("float16", 65504.0, False),
        ("float16", 65519.0, False),  # rounds down to 65504
        ("float16", 65520.0, True),  # rounds up to inf
        ("bfloat16", 1e5, False),
        ("bfloat16", 3.4e38, True),
        ("float32", 1e38, False),
    ],
)
def test_overflow_of_the_stored_dtype_is_flagged(
    value_dtype: str, value: float, flagged: bool
) -> None:
    logits = _logits(batch=4, classes=10)
    logits[2, 1] = value
    out = encode_batch(logits, encoding="dense", value_dtype=value_dtype)
    assert out[OVERFLOW].tolist() == [False, False, flagged, False]
    assert not out[NONFINITE].any()


def test_topk_flags_overflow_only_of_stored_values() -> None:
    logits = _logits(batch=2, classes=10, scale=1.0)
    logits[0, 4] = 1e5  # the row's maximum: kept, and beyond float16
    logits[1, 4] = -1e5  # the row's minimum: not kept, so nothing overflows
    out = encode_batch(logits, encoding="topk", value_dtype="float16", k=3, temperatures=(1.0,))
    assert out[OVERFLOW].tolist() == [True, False]
    assert torch.isfinite(out[LSE]).all()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown encoding 'sampled'"):
        encode_batch(_logits(), encoding="sampled", value_dtype="float16")
    with pytest.raises(ValueError, match="k is required"):
        encode_batch(_logits(), encoding="topk", value_dtype="float16", temperatures=(1.0,))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_encoding_matches_cpu() -> None:
    logits = _logits(batch=64, classes=1000)
    kwargs = {"encoding": "topk", "value_dtype": "float16", "k": 5, "temperatures": (1.0, 2.0)}
    cpu = encode_batch(logits, **kwargs)
    gpu = {k: v.cpu() for k, v in encode_batch(logits.cuda(), **kwargs).items()}
    torch.testing.assert_close(gpu[TOPK_INDICES], cpu[TOPK_INDICES], rtol=0, atol=0)
    torch.testing.assert_close(gpu[TOPK_VALUES], cpu[TOPK_VALUES], rtol=0, atol=0)
    # Reductions on another device may differ in the last ulps.
    np.testing.assert_array_max_ulp(gpu[LSE].numpy(), cpu[LSE].numpy(), maxulp=4)
