"""The soft-label stream: plan order, exact rows, resume, read-ahead across epochs, Dask clusters."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import softcache.losses.targets as targets_module
from softcache.errors import DatasetMismatchError
from softcache.losses import TeacherTargets
from softcache.store import LOGITS, LSE, SAMPLE_HASH, TOPK_INDICES, TOPK_VALUES, LogitStore
from softcache.trainer.distill import AlignedBatches, store_teacher_targets
from softcache.trainer.plan import EpochPlan
from softcache.trainer.stream import SoftLabelStream, _flat, _runs


def _plan(store: LogitStore, **kw) -> EpochPlan:
    defaults = {"batch_size": 20, "seed": 3, "window_blocks": 2}
    return EpochPlan(
        num_samples=store.meta.num_samples, block_rows=store.meta.shard_rows, **{**defaults, **kw}
    )


def _drawn_plan(data: st.DataObject, store: LogitStore, **kw) -> EpochPlan:
    """A plan of any batch size, window, epoch and rank of one or two (hypothesis draws)."""
    world = data.draw(st.integers(1, 2))
    return _plan(
        store,
        batch_size=data.draw(st.integers(1, 70)),
        window_blocks=data.draw(st.integers(2, 3)),
        epoch=data.draw(st.integers(0, 3)),
        world_size=world,
        rank=data.draw(st.integers(0, world - 1)),
        **kw,
    )


def _check_rows(store: LogitStore, soft, full: dict[str, np.ndarray]) -> None:
    idx = soft.indices
    assert np.array_equal(soft.sample_hash, full[SAMPLE_HASH][idx])
    if store.meta.encoding == "dense":
        assert np.array_equal(soft.logits.numpy(), store.decode_values(full[LOGITS][idx]))
    else:
        assert np.array_equal(soft.topk_values.numpy(), store.decode_values(full[TOPK_VALUES][idx]))
        assert np.array_equal(soft.topk_indices.numpy(), full[TOPK_INDICES][idx].astype(np.int64))
        assert np.array_equal(soft.lse.numpy(), full[LSE][idx])


@pytest.mark.parametrize("assemble_ahead", [0, 2])
@pytest.mark.parametrize("encoding", ["dense", "topk"])
def test_stream_follows_the_plan_with_exact_rows(make_store, encoding, assemble_ahead):
    path, _ = make_store(encoding=encoding, top_k=3)
    store = LogitStore.open(path)
    full = store.read_rows(0, store.meta.num_samples)
    plan = _plan(store)
    expected = list(_plan(store).batches())
    stream = SoftLabelStream(store, prefetch_blocks=2, assemble_ahead=assemble_ahead)
    got = list(stream.batches(plan))
    assert len(got) == len(expected)
    for soft, rows in zip(got, expected, strict=True):
        assert np.array_equal(soft.indices, rows)
        _check_rows(store, soft, full)
    assert plan.cursor == 0  # the stream follows a copy


def test_gathering_on_the_callers_thread_stops_the_reader_when_the_caller_stops(make_store):
    path, _ = make_store()
    store = LogitStore.open(path)
    before = set(threading.enumerate())
    stream = SoftLabelStream(store, prefetch_blocks=1, assemble_ahead=0)
    batches = stream.batches(_plan(store))
    next(batches)
    started = [t for t in threading.enumerate() if t not in before]
    readers = [t for t in started if t.name == "softcache-stream"]
    assert readers and not [t for t in started if t.name == "softcache-ahead"]
    batches.close()  # an epoch abandoned after one batch
    for reader in readers:
        reader.join(timeout=5)
        assert not reader.is_alive()
    with pytest.raises(ValueError, match="assemble_ahead must be >= 0"):
        SoftLabelStream(store, assemble_ahead=-1)


def test_stream_resumes_mid_epoch(make_store):
    path, _ = make_store()
    store = LogitStore.open(path)
    plan = _plan(store, epoch=2)
    everything = [s.indices for s in SoftLabelStream(store).batches(plan)]
    iterator = iter(plan)
    for _ in range(4):
        next(iterator)
    rest = [s.indices for s in SoftLabelStream(store).batches(plan)]
    assert len(rest) == len(everything) - 4
    for a, b in zip(rest, everything[4:], strict=True):
        assert np.array_equal(a, b)


def test_next_epoch_is_read_ahead_and_handed_over(make_store):
    path, _ = make_store()
    store = LogitStore.open(path)
    full = store.read_rows(0, store.meta.num_samples)
    stream = SoftLabelStream(store, prefetch_blocks=2)
    first, second = _plan(store, epoch=0), _plan(store, epoch=1)
    list(stream.batches(first, then=second))
    assert stream._ahead is not None  # the next epoch's reader was started during this one
    ahead_reader = stream._ahead[1]
    got = list(stream.batches(second))
    assert stream._ahead is None and ahead_reader._delivered > 0  # and it was the one used
    expected = list(_plan(store, epoch=1).batches())
    for soft, rows in zip(got, expected, strict=True):
        assert np.array_equal(soft.indices, rows)
        _check_rows(store, soft, full)


def test_a_read_ahead_for_another_plan_is_discarded(make_store):
    path, _ = make_store()
    store = LogitStore.open(path)
    stream = SoftLabelStream(store)
    list(stream.batches(_plan(store, epoch=0), then=_plan(store, epoch=1)))
    stale = stream._ahead[1]
    other = _plan(store, epoch=5)
    got = [s.indices for s in stream.batches(other)]
    assert stale._stop.is_set()
    for a, b in zip(got, _plan(store, epoch=5).batches(), strict=True):
        assert np.array_equal(a, b)


def test_plan_must_match_the_store(make_store):
    path, _ = make_store()
    store = LogitStore.open(path)
    stream = SoftLabelStream(store)
    wrong_blocks = EpochPlan(num_samples=store.meta.num_samples, block_rows=7, batch_size=5)
    with pytest.raises(ValueError, match="shard_rows"):
        stream.batches(wrong_blocks)
    wrong_n = EpochPlan(
        num_samples=store.meta.num_samples - 1, block_rows=store.meta.shard_rows, batch_size=5
    )
    with pytest.raises(DatasetMismatchError, match="samples"):
        stream.batches(wrong_n)


@pytest.mark.parametrize("processes", [False, True])
def test_stream_through_a_dask_local_cluster(make_store, processes):
    distributed = pytest.importorskip("distributed")
    path, _ = make_store()
    store = LogitStore.open(path)
    full = store.read_rows(0, store.meta.num_samples)
    cluster = distributed.LocalCluster(
        n_workers=1, threads_per_worker=2, processes=processes, dashboard_address=None
    )
    with cluster, distributed.Client(cluster) as client:
        got = list(SoftLabelStream(store, client=client).batches(_plan(store)))
    for soft, rows in zip(got, _plan(store).batches(), strict=True):
        assert np.array_equal(soft.indices, rows)
        _check_rows(store, soft, full)


@pytest.mark.parametrize(
    ("encoding", "dtype"),
    [("dense", "float16"), ("dense", "bfloat16"), ("topk", "float16"), ("topk", "bfloat16")],
)
def test_stored_dtypes_widen_to_the_float32_rows_on_to(make_store, encoding, dtype):
    # The GPU path: the stream hands over the store's dtypes, `to(device)` widens them; the result
    # must be bit for bit what the float32 path delivers.
    path, _ = make_store(encoding=encoding, top_k=3, dtype=dtype)
    store = LogitStore.open(path)
    full = store.read_rows(0, store.meta.num_samples)
    small = list(SoftLabelStream(store, values="stored").batches(_plan(store)))
    wide = list(SoftLabelStream(store).batches(_plan(store)))
    assert len(small) == len(wide)
    values = small[0].logits if encoding == "dense" else small[0].topk_values
    assert values.dtype == getattr(torch, dtype)
    for soft, reference in zip(small, wide, strict=True):
        moved = soft.to("cpu")
        _check_rows(store, moved, full)
        for name in ("logits", "topk_values", "topk_indices", "lse"):
            a, b = getattr(moved, name), getattr(reference, name)
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b)


def test_stream_rejects_an_unknown_value_mode(make_store):
    path, _ = make_store()
    with pytest.raises(ValueError, match="values must be one of float32, stored"):
        SoftLabelStream(LogitStore.open(path), values="float64")


@given(
    items=st.integers(0, 12),
    size=st.integers(1, 5),
    fail_at=st.one_of(st.none(), st.integers(0, 12)),
)
def test_runs_of_batches_keep_every_batch_and_an_error_at_its_batch(items, size, fail_at):
    # The assembler hands batches over in runs; flattened they are the batches, and an error in
    # the source reaches the consumer after exactly the batches made before it.
    def source():
        for i in range(items):
            if i == fail_at:
                raise DatasetMismatchError(f"batch {i}")
            yield i

    runs = list(_runs(source(), size)) if fail_at is None or fail_at >= items else None
    if runs is not None:
        assert all(1 <= len(r) <= size for r in runs) and all(len(r) == size for r in runs[:-1])
    got = []
    flat = _flat(_runs(source(), size))
    if fail_at is None or fail_at >= items:
        got = list(flat)
    else:
        with pytest.raises(DatasetMismatchError, match=f"batch {fail_at}"):
            for item in flat:
                got.append(item)
    assert got == list(range(items if fail_at is None else min(fail_at, items)))


def test_an_error_in_a_stream_with_an_assembler_reaches_its_batch(make_store, monkeypatch):
    path, _ = make_store(encoding="dense")
    store = LogitStore.open(path)
    plan = _plan(store)
    stream = SoftLabelStream(store, assemble_ahead=2)
    gather = stream.source.take
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 6:
            raise DatasetMismatchError("the sixth batch")
        return gather(*args)

    monkeypatch.setattr(stream.source, "take", failing)
    got = []
    with pytest.raises(DatasetMismatchError, match="sixth"):
        for soft in stream.batches(plan):
            got.append(soft)
    assert len(got) == 5 and len(plan) > 6


def test_closing_runs_of_batches_early_closes_the_source():
    # The assembler closes its source when the consumer goes: no "generator ignored
    # GeneratorExit", and the source's own `finally` runs.
    closed = []

    def source():
        try:
            yield from range(10)
        finally:
            closed.append(True)

    runs = _runs(source(), 3)
    assert next(runs) == [0, 1, 2]
    runs.close()
    assert closed == [True]


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_any_plan_prefetch_and_cursor_stream_the_plans_rows_exactly(built_stores, data):
    # Each read group is placed in the order its rows will be consumed, and a batch is taken as
    # runs of the groups it draws from: with a window wider than the read-ahead, a resumed epoch
    # (groups no longer aligned with windows) or ranks, batches span several groups.
    kind = data.draw(st.sampled_from(["dense", "topk"]))
    store = LogitStore.open(str(built_stores[kind]))
    plan = _drawn_plan(data, store, drop_last=data.draw(st.booleans()))
    cursor = data.draw(st.integers(0, len(plan)))
    expected = list(itertools.islice(plan.batches(), cursor, None))
    plan.load_state_dict({**plan.state_dict(), "cursor": cursor})
    values = data.draw(st.sampled_from(["float32", "stored"]))
    stream = SoftLabelStream(
        store,
        prefetch_blocks=data.draw(st.integers(1, 4)),
        equal_steps=False,
        values=values,
        assemble_ahead=data.draw(st.sampled_from([0, 2])),
    )
    full = store.read_rows(0, store.meta.num_samples)
    got = list(stream.batches(plan))
    assert len(got) == len(expected)
    for soft, rows in zip(got, expected, strict=True):
        assert np.array_equal(soft.indices, rows)
        if values == "stored":
            soft = soft.to("cpu")
        _check_rows(store, soft, full)


def _assert_same_targets(got: TeacherTargets | None, want: TeacherTargets | None) -> None:
    assert (got is None) == (want is None)
    if got is None or want is None:
        return
    for field in dataclasses.fields(want):
        a, b = getattr(got, field.name), getattr(want, field.name)
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and a.dtype == b.dtype, field.name
            assert torch.equal(a, b), field.name
        else:
            assert a == b, field.name


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_targets_made_per_read_group_are_each_batchs_own_bit_for_bit(built_stores, data):
    # The teacher's side of the loss is made once per read group and sliced (or, for a batch
    # drawn from several groups, gathered) into each batch: it must be what the batch's own soft
    # labels give, in both forms of top-k targets, at every stored temperature and at one the
    # store has no normaliser for (no targets: the loss renormalises).
    store = LogitStore.open(str(built_stores["topk"]))
    temperature = data.draw(st.sampled_from([*store.meta.temperatures, 3.0]))
    plan = _drawn_plan(data, store)
    cursor = data.draw(st.integers(0, len(plan) - 1))
    plan.load_state_dict({**plan.state_dict(), "cursor": cursor})
    stream = SoftLabelStream(
        store,
        prefetch_blocks=data.draw(st.integers(1, 4)),
        equal_steps=False,  # this rank's every batch from the cursor: at least one
        values=data.draw(st.sampled_from(["float32", "stored"])),
        assemble_ahead=data.draw(st.sampled_from([0, 2])),
        targets=functools.partial(
            store_teacher_targets, meta=store.meta, temperature=temperature, rows=True
        ),
    )
    with pytest.MonkeyPatch.context() as mp:
        dense_up_to = data.draw(st.sampled_from([0, targets_module.DENSE_TOPK_ELEMENTS]))
        mp.setattr(targets_module, "DENSE_TOPK_ELEMENTS", dense_up_to)
        got = list(stream.batches(plan))
        assert got
        for soft in got:
            want = store_teacher_targets(soft.to("cpu"), store.meta, temperature)
            _assert_same_targets(soft.targets, want)
            if want is not None:
                assert (soft.targets.ids is None) == (len(soft.indices) * 10 <= dense_up_to)


@pytest.mark.parametrize("kind", ["dense", "topk"])
def test_aligned_batches_bring_each_batch_its_targets_made_per_group_or_per_batch(
    built_stores, in_root, kind
):
    # A top-k store's targets come with its read groups; a dense store's stream makes none (they
    # would be a second float32 copy of a group's rows) and each batch makes its own. Either
    # way each batch has the targets of its own soft labels.
    store = LogitStore.open(str(built_stores[kind]))
    plan = _plan(store, window_blocks=2)
    make = functools.partial(store_teacher_targets, meta=store.meta, temperature=2.0, rows=True)
    from_stream = list(SoftLabelStream(store, targets=make).batches(plan))
    assert all((s.targets is None) == (kind == "dense") for s in from_stream)
    from tests.helpers import specs as hs

    got = [soft for _, _, soft in AlignedBatches(hs.dataset(), store, temperature=2.0).epoch(plan)]
    assert len(got) == len(from_stream)
    for soft in got:
        assert soft.targets is not None
        _assert_same_targets(soft.targets, store_teacher_targets(soft, store.meta, 2.0))
