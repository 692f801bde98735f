"""Tests for softcache.data.hashing: per-sample hashes, the dataset fingerprint, and collation."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x[::2],  # strided rows
        lambda x: x[:1:2],  # one row, contiguous yet with a stride other than 1
        lambda x: x.reshape(8, 1, 6)[:, :, :1],  # size-1 dimensions, strided
        lambda x: x[:, None, :].expand(8, 3, 6),  # zero strides
        lambda x: x[:0],  # no rows
        lambda x: x[:, :0],  # empty rows
    ],
)
def test_any_layout_hashes_as_the_recipe_says(make: object) -> None:
    x = make(torch.rand(8, 6, generator=torch.Generator().manual_seed(4)))  # type: ignore[operator]
    assert hash_rows(x).tolist() == [_recipe(row, "float32") for row in x.numpy()]


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


# The uniform path (`_stack_uniform`) against the item-by-item one (`_stack_items`): the batch a
# DataLoader collates, label kind by label kind.
_LABEL_KINDS = {
    "int": lambda v: v,
    "none": lambda v: None,
    "np.int64": np.int64,
    "np.int32": np.int32,
    "np.uint8": lambda v: np.uint8(abs(v) % 256),
    "tensor.int64": lambda v: torch.tensor(v),
    "tensor.int32": lambda v: torch.tensor(v, dtype=torch.int32),
    "tensor.uint8": lambda v: torch.tensor(abs(v) % 256, dtype=torch.uint8),
    "tensor.bool": lambda v: torch.tensor(v > 0),  # accepted item by item, so left to that path
}
_INPUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]


@st.composite
def _uniform_batches(draw: st.DrawFn) -> tuple[list[tuple[object, object]], list[str]]:
    """A batch of (input, label) tuples, and the kinds of label it holds (one or two)."""
    rows = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(_INPUT_DTYPES))
    shape = draw(st.lists(st.integers(0, 3), max_size=2))
    as_numpy = dtype != torch.bfloat16 and draw(st.booleans())
    kinds = draw(st.lists(st.sampled_from(sorted(_LABEL_KINDS)), min_size=1, max_size=2))
    # Labels reach 2**40 where every kind holds 64 bits; else they stay within int32.
    wide = set(kinds) <= {"int", "none", "np.int64", "tensor.int64"}
    values = draw(
        st.lists(st.integers(-300, 2**40 if wide else 2**31 - 1), min_size=rows, max_size=rows)
    )
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = (torch.randn(rows, *shape, generator=g) * 100).to(dtype)
    if x.ndim > 1 and draw(st.booleans()):
        x = x.transpose(0, -1).contiguous().transpose(0, -1)  # rows that are strided views
    items = [
        (x[i].numpy() if as_numpy else x[i], _LABEL_KINDS[kinds[i % len(kinds)]](v))
        for i, v in enumerate(values)
    ]
    return items, sorted({kinds[i % len(kinds)] for i in range(rows)})


@settings(max_examples=200, deadline=None)
@given(_uniform_batches())
def test_uniform_stacking_is_item_by_item_stacking(case: tuple[list, list[str]]) -> None:
    from softcache.data.hashing import _stack, _stack_items, _stack_uniform

    items, kinds = case
    expected_inputs, expected_labels = _stack_items(items)
    uniform = _stack_uniform(items)
    if len(kinds) == 1 and kinds != ["tensor.bool"]:
        assert uniform is not None  # the path the usual batch takes
    if uniform is not None:
        inputs, labels = uniform
        assert inputs.dtype == expected_inputs.dtype and labels.dtype == torch.int64
        assert torch.equal(inputs, expected_inputs)
        assert torch.equal(labels, expected_labels)
    inputs, labels = _stack(items)
    assert torch.equal(inputs, expected_inputs) and torch.equal(labels, expected_labels)


def test_uniform_stacking_takes_tensor_labels_and_leaves_bool_ones() -> None:
    from softcache.data.hashing import _stack_uniform

    x = torch.zeros(3, 2)
    taken = _stack_uniform([(x[i], torch.tensor(v)) for i, v in enumerate([3, -5, 0])])
    assert taken is not None and taken[1].tolist() == [3, MISSING_LABEL, 0]
    assert _stack_uniform([(x[i], torch.tensor(True)) for i in range(3)]) is None
    assert _stack_uniform([(x[i], torch.tensor(1, device="meta")) for i in range(3)]) is None


@pytest.mark.parametrize(
    ("label", "fragment"),
    [
        (1.0, "has label 1.0"),
        (True, "has label True"),
        (torch.tensor([1]), "has label tensor"),
        (torch.tensor(1.0), "has label tensor"),
        (np.array([1]), "has label array"),
        (np.uint64(1), None),  # accepted item by item: not the uniform path's to take
    ],
)
def test_a_batch_of_only_bad_labels_is_refused_as_item_by_item(
    label: object, fragment: str | None
) -> None:
    items = [(torch.zeros(3), label), (torch.ones(3), label)]
    if fragment is None:
        assert collate_with_hashes(items)[1].tolist() == [1, 1]
        return
    with pytest.raises(DatasetFormatError, match=re.escape(fragment)):
        collate_with_hashes(items)


def test_a_ragged_batch_of_arrays_is_refused_by_name() -> None:
    with pytest.raises(DatasetFormatError, match=r"different shapes \[\(2,\), \(3,\)\]"):
        collate_with_hashes([(np.zeros(3), 0), (np.zeros(2), 0)])
    with pytest.raises(DatasetFormatError, match="has an input of type list"):
        collate_with_hashes([([0.0], 0), ([1.0], 0)])
