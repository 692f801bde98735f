"""Tests for softcache.data.hashing: per-sample hashes, the dataset fingerprint, and collation."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from softcache.data.hashing import (
    MISSING_LABEL,
    check_item,
    collate_with_hashes,
    fingerprint,
    hash_rows,
)
from softcache.errors import DatasetFormatError


def _recipe(row: np.ndarray, torch_dtype: str) -> int:
    """The recipe docs/FORMAT.md gives, with hashlib and numpy only."""
    header = f"torch.{torch_dtype}|{row.shape}|".encode()
    digest = hashlib.blake2b(header + np.ascontiguousarray(row).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def test_golden_values() -> None:
    """Pinned: a change here changes every store's sample_hash (a new format version)."""
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert hash_rows(x).tolist() == [816884228773831314, 10280142064296456225]
    assert fingerprint(hash_rows(x)) == (
        "ba098ff2014f027864a177cb327ff987f5bf5e5f15ec818c49d7b405fe0fca79"
    )


def test_matches_the_documented_recipe() -> None:
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    hashes = hash_rows(x)
    assert hashes.dtype == np.uint64 and hashes.shape == (5,)
    assert hashes.tolist() == [_recipe(row, "float32") for row in x.numpy()]


def test_stable_and_row_independent() -> None:
    x = torch.rand(8, 3, 4, generator=torch.Generator().manual_seed(1))
    first = hash_rows(x)
    np.testing.assert_array_equal(hash_rows(x), first)
    np.testing.assert_array_equal(hash_rows(x.clone()), first)
    # A row hashes the same whatever batch it sits in, and wherever in it.
    np.testing.assert_array_equal(hash_rows(x[3:5]), first[3:5])
    np.testing.assert_array_equal(hash_rows(x.flip(0)), first[::-1])
    assert len(set(first.tolist())) == 8


def test_non_contiguous_input_hashes_like_contiguous() -> None:
    x = torch.rand(4, 6, generator=torch.Generator().manual_seed(2))
    strided = x.t().contiguous().t()  # same values, column-major memory
    assert not strided.is_contiguous()
    np.testing.assert_array_equal(hash_rows(strided), hash_rows(x))


def test_content_dtype_and_shape_all_count() -> None:
    x = torch.zeros(1, 2, 8, dtype=torch.float32)
    base = int(hash_rows(x)[0])
    changed = x.clone()
    changed[0, 1, 7] = 1e-30
    assert int(hash_rows(changed)[0]) != base
    # Same bytes, other dtype or shape.
    assert int(hash_rows(x.view(torch.int32))[0]) != base
    assert int(hash_rows(x.reshape(1, 16))[0]) != base
    assert int(hash_rows(x.reshape(1, 4, 4))[0]) != base
    # Same values, other dtype.
    assert int(hash_rows(x.double())[0]) != base


def test_dtypes_numpy_lacks_hash_too() -> None:
    x = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    h = hash_rows(x)
    bits = x.view(torch.int16).numpy().view(np.uint16)
    assert h[0] == _recipe(bits[0], "bfloat16")
    assert h[0] != hash_rows(x.view(torch.float16))[0]


def test_fingerprint_is_sha256_of_little_endian_hashes() -> None:
    hashes = np.array([1, 2**64 - 1, 12345], dtype=np.uint64)
    expected = hashlib.sha256(b"".join(int(h).to_bytes(8, "little") for h in hashes)).hexdigest()
    assert fingerprint(hashes) == expected
    assert fingerprint(hashes.astype(">u8")) == expected  # byte order of the input does not matter
    assert fingerprint(hashes[::-1]) != expected  # order does


def test_collate() -> None:
    x = torch.rand(3, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    items = [(x[0], 4), (x[1], None), (x[2].numpy(), torch.tensor(7))]
    inputs, labels, hashes = collate_with_hashes(items)
    torch.testing.assert_close(inputs, x, rtol=0, atol=0)
    assert labels.dtype == torch.int64
    assert labels.tolist() == [4, MISSING_LABEL, 7]
    np.testing.assert_array_equal(hashes, hash_rows(x))


def test_collate_numpy_labels_and_lists() -> None:
    x = torch.zeros(2, 3)
    inputs, labels, _ = collate_with_hashes([[x[0], np.int64(2)], (x[1], np.array(-1))])
    assert labels.tolist() == [2, MISSING_LABEL]  # a -1 label is "no label", spelled one way
    assert inputs.shape == (2, 3)


@pytest.mark.parametrize(
    ("item", "fragment"),
    [
        (torch.zeros(3), "is a Tensor, expected an (input, label) pair"),
        ((torch.zeros(3),), "is a tuple, expected an (input, label) pair"),
        ((torch.zeros(3), 1, 2), "is a tuple, expected an (input, label) pair"),
        ("text", "is a str, expected an (input, label) pair"),
        ({"x": 1, "y": 2}, "is a dict, expected"),
        (([1.0, 2.0], 1), "has an input of type list, expected a tensor"),
        ((torch.zeros(3), "cat"), "has label 'cat'"),
        ((torch.zeros(3), 1.0), "has label 1.0"),
        ((torch.zeros(3), True), "has label True"),
        ((torch.zeros(3), torch.tensor([1, 2])), "has label tensor"),
        ((torch.zeros(3), torch.tensor(1.0)), "has label tensor"),
        ((torch.zeros(3), np.array([1])), "has label array"),
    ],
)
def test_bad_items(item: object, fragment: str) -> None:
    with pytest.raises(DatasetFormatError) as info:
        collate_with_hashes([(torch.zeros(3), 0), item])
    assert fragment in str(info.value)
    with pytest.raises(DatasetFormatError, match="dataset item 9 "):
        check_item(item, 9)


def test_ragged_batch() -> None:
    with pytest.raises(DatasetFormatError, match=r"different shapes \[\(2,\), \(3,\)\]"):
        collate_with_hashes([(torch.zeros(3), 0), (torch.zeros(2), 0)])


def test_check_item_accepts_good_items() -> None:
    for label in (0, -1, None, np.int32(3), torch.tensor(5), np.array(2)):
        check_item((torch.zeros(2), label), 0)
    check_item((np.zeros(2), 1), 0)


def test_sampled_collate_hashes_every_stride_th_row() -> None:
    from softcache.data.hashing import collate_pairs, sampled_collate

    items = [(torch.full((2, 3), float(i)), i) for i in range(10)]
    full = collate_with_hashes(items)[2]
    for stride in (1, 3, 4, 16):
        _, labels, hashes = sampled_collate(stride)(items)
        assert np.array_equal(hashes, full[::stride])
        assert torch.equal(labels, torch.arange(10))
    assert sampled_collate(0) is collate_pairs
    with pytest.raises(ValueError, match="stride"):
        sampled_collate(-1)


def test_check_alignment_with_a_stride_names_the_first_bad_checked_row() -> None:
    from softcache.errors import DatasetMismatchError
    from softcache.trainer.stream import SoftLabels

    hashes = np.arange(100, 110, dtype=np.uint64)
    soft = SoftLabels(indices=np.arange(40, 50), sample_hash=hashes)
    soft.check_alignment(hashes[::3].copy(), stride=3)
    altered = hashes.copy()
    altered[6] += 1  # row 6 is checked with stride 3 (rows 0, 3, 6, 9)
    with pytest.raises(DatasetMismatchError, match="dataset sample 46 "):
        soft.check_alignment(altered[::3], stride=3)
    altered = hashes.copy()
    altered[5] += 1  # row 5 is not among the checked rows
    soft.check_alignment(altered[::3], stride=3)
