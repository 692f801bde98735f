"""A batch crosses to the training process as a pickle whose tensors and arrays live in a shared
slot (`softcache.trainer.batch_process`): what comes out is what went in, every dtype (bfloat16 and
bool included), shape (empty, 0-d, non-contiguous) and container (tuples, dicts, dataclasses), with
the slot grown when a batch does not fit. The process round trip is in
`tests/integration/test_batch_process.py`."""

from __future__ import annotations

import io
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softcache.trainer.batch_process import _ChildSlots, _SlotUnpickler


@dataclass(frozen=True)
class _Targets:
    weights: torch.Tensor
    ids: torch.Tensor | None
    temperature: float


class _Results:
    """The child's result pipe, as far as the slots use it: the slots it announces."""

    def __init__(self) -> None:
        self.slots: dict[int, torch.Tensor] = {}

    def send(self, message: tuple[Any, ...]) -> None:
        assert message[0] == "slot"
        self.slots[message[1]] = message[2]


def _slots(count: int, results: _Results) -> _ChildSlots:
    return _ChildSlots(count, results, SimpleNamespace(value=0))  # type: ignore[arg-type]


def _round_trip(slots: _ChildSlots, results: _Results, slot: int, batch: Any) -> Any:
    payload = slots.pack(slot, batch)
    tensor = results.slots[slot]
    typed = tensor.view  # the slot as a 1-D tensor of a dtype
    return _SlotUnpickler(io.BytesIO(payload), typed, tensor.numpy()).load()


def _same(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, _Targets):
        _same(vars(a), vars(b))
    else:
        assert a == b


def test_every_kind_of_batch_member_comes_back_as_it_went() -> None:
    results = _Results()
    slots = _slots(3, results)
    logits = torch.randn(6, 10)
    batch = (
        torch.randn(4, 3, 8, 8),
        torch.arange(4),
        _Targets(logits.bfloat16(), torch.randint(0, 10, (6, 2)), 2.0),
        np.arange(4, dtype=np.int64) * 7,
        {
            "mask": torch.rand(5, 3) > 0.5,
            "transposed": logits.t(),  # non-contiguous
            "empty": torch.empty(0, 7),
            "scalar": torch.tensor(3.5, dtype=torch.float64),
            "strings": np.array(["a", "bc"]),  # not numeric: pickled as it is
            "half": np.ones((2, 3), dtype=np.float16),
        },
        None,
        "text",
    )
    got = _round_trip(slots, results, 1, batch)
    _same(got, batch)
    # Tensors and numeric arrays are views of the slot, not copies.
    slot = results.slots[1]
    base = slot.untyped_storage().data_ptr()
    assert got[0].untyped_storage().data_ptr() == base
    assert got[2].weights.untyped_storage().data_ptr() == base
    assert np.shares_memory(got[3], slot.numpy())


def test_a_slot_grows_for_a_larger_batch_and_is_kept_for_smaller_ones() -> None:
    results = _Results()
    slots = _slots(2, results)
    small = (torch.ones(10),)
    _same(_round_trip(slots, results, 0, small), small)
    first = results.slots[0]
    large = (torch.arange(10_000, dtype=torch.float32), np.zeros(3000, dtype=np.int16))
    _same(_round_trip(slots, results, 0, large), large)
    grown = results.slots[0]
    assert grown is not first and grown.numel() >= 10_000 * 4 + 3000 * 2
    _same(_round_trip(slots, results, 0, small), small)
    assert results.slots[0] is grown  # no new slot for a batch that fits


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=1, max_size=5),
    dtypes=st.lists(st.sampled_from(_DTYPES), min_size=5, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_any_tuple_of_tensors_round_trips(
    shapes: list[list[int]], dtypes: list[torch.dtype], seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    batch = tuple(
        (torch.rand(shape, generator=gen) * 100).to(dtype)
        for shape, dtype in zip(shapes, dtypes, strict=False)
    )
    results = _Results()
    _same(_round_trip(_slots(1, results), results, 0, batch), batch)
