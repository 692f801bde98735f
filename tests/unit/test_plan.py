"""Tests for softcache.trainer.plan.EpochPlan: coverage, determinism, locality, resume, DataLoader use."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softcache.trainer.plan import EpochPlan

FEW = settings(max_examples=60, deadline=None)


@st.composite
def layouts(draw, max_world: int = 4) -> dict:
    block_rows = draw(st.integers(1, 12))
    window_blocks = draw(st.integers(1, 4))
    return {
        "num_samples": draw(st.integers(0, 200)),
        "block_rows": block_rows,
        "window_blocks": window_blocks,
        "batch_size": draw(st.integers(1, block_rows * window_blocks)),
        "world_size": draw(st.integers(1, max_world)),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "epoch": draw(st.integers(0, 1000)),
        "drop_last": draw(st.booleans()),
    }


def _plans(layout: dict) -> list[EpochPlan]:
    return [EpochPlan(**layout, rank=r) for r in range(layout["world_size"])]


def _reference_rows(layout: dict, rank: int) -> np.ndarray:
    """The rank's row sequence, written out plainly from the specification."""
    n, br, wb = layout["num_samples"], layout["block_rows"], layout["window_blocks"]
    seed, epoch, ws = layout["seed"], layout["epoch"], layout["world_size"]
    num_blocks = (n + br - 1) // br
    blocks = list(np.random.default_rng([seed, epoch]).permutation(num_blocks)[rank::ws])
    sequence = []
    for w in range(0, len(blocks), wb):
        rows = [r for b in blocks[w : w + wb] for r in range(b * br, min((b + 1) * br, n))]
        rng = np.random.default_rng([seed, epoch, rank, w // wb])
        sequence.extend(rng.permutation(np.array(rows, dtype=np.int64)))
    return np.array(sequence, dtype=np.int64)


@FEW
@given(layouts())
def test_rows_follow_the_specified_order(layout):
    for rank, plan in enumerate(_plans(layout)):
        expected = _reference_rows(layout, rank)
        batches = list(plan)
        got = np.concatenate(batches) if batches else np.array([], dtype=np.int64)
        bs = layout["batch_size"]
        usable = len(expected) // bs * bs if layout["drop_last"] else len(expected)
        np.testing.assert_array_equal(got, expected[:usable])
        assert all(b.dtype == np.int64 for b in batches)
        assert all(len(b) == bs for b in batches[:-1])
        assert len(batches) == len(plan)
        assert plan.num_rows() == len(expected)


@FEW
@given(layouts())
def test_every_row_once_per_epoch_across_disjoint_ranks(layout):
    layout = {**layout, "drop_last": False}
    per_rank = [np.concatenate([*plan, np.array([], dtype=np.int64)]) for plan in _plans(layout)]
    everything = np.concatenate(per_rank)
    np.testing.assert_array_equal(np.sort(everything), np.arange(layout["num_samples"]))
    for a, b in itertools.combinations(per_rank, 2):
        assert not np.intersect1d(a, b).size
    block_sets = [set(plan.block_order().tolist()) for plan in _plans(layout)]
    assert sum(map(len, block_sets)) == len(set().union(*block_sets))


@FEW
@given(layouts())
def test_batches_come_from_the_current_or_next_window(layout):
    br, wb, bs = layout["block_rows"], layout["window_blocks"], layout["batch_size"]
    for plan in _plans({**layout, "drop_last": False}):
        order = plan.block_order()
        window_of_block = {int(b): i // wb for i, b in enumerate(order)}
        window_rows = np.bincount(
            [window_of_block[int(b)] for b in order],
            weights=np.minimum(br, layout["num_samples"] - order * br),
        )
        # Only the short final storage block can make a window shorter than a batch.
        short_window = window_rows[:-1].size and window_rows[:-1].min() < bs
        previous = 0
        for batch in plan:
            windows = np.array([window_of_block[int(r) // br] for r in batch])
            first = windows[0]
            assert first >= previous  # windows are visited in block_order
            assert np.all(windows >= first)
            if not short_window:
                assert np.all(windows <= first + 1), (windows, window_rows)
            previous = windows.max()


@FEW
@given(layouts(max_world=2), st.data())
def test_resume_from_state_dict_yields_exactly_the_remaining_batches(layout, data):
    full = list(EpochPlan(**layout))
    k = data.draw(st.integers(0, len(full)))
    plan = EpochPlan(**layout)
    taken = list(itertools.islice(plan, k))
    assert plan.cursor == k
    state = json.loads(json.dumps(plan.state_dict()))

    resumed = EpochPlan(**{**layout, "epoch": 0})
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.cursor) == (layout["epoch"], k)
    rest = list(resumed)
    assert len(taken) + len(rest) == len(full)
    for got, want in zip(taken + rest, full, strict=True):
        np.testing.assert_array_equal(got, want)
    # The original plan, broken out of, continues where it stopped.
    for got, want in zip(plan, full[k:], strict=True):
        np.testing.assert_array_equal(got, want)


def _between_cursor_and_stop(
    layout: dict, data: st.DataObject
) -> tuple[EpochPlan, int, int | None, np.ndarray]:
    """A plan of a drawn rank advanced to a drawn cursor, a drawn stop (None: the epoch's end),
    and the rows of the batches between them, in order (from an independent copy of the plan)."""
    rank = data.draw(st.integers(0, layout["world_size"] - 1))
    plan = EpochPlan(**layout, rank=rank)
    cursor = data.draw(st.integers(0, len(plan)))
    stop = data.draw(st.none() | st.integers(0, len(plan) + 2))
    list(itertools.islice(plan, cursor))
    batches = list(itertools.islice(EpochPlan(**layout, rank=rank), len(plan)))
    used = batches[cursor : len(plan) if stop is None else stop]
    return plan, cursor, stop, np.concatenate(used) if used else np.zeros(0, dtype=np.int64)


@FEW
@given(layouts(), st.data())
def test_rows_per_block_counts_the_rows_of_the_batches_between_cursor_and_stop(layout, data):
    # What the stream reads is decided by these counts: a block with none is never read, and a
    # block leaves memory when its count is used up, so they must be the batches' own counts.
    plan, cursor, stop, rows = _between_cursor_and_stop(layout, data)
    per_block = np.bincount(rows // layout["block_rows"], minlength=plan.num_blocks)
    counts = plan.rows_per_block(stop)
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, per_block[plan.block_order()])
    assert plan.cursor == cursor  # counting does not draw batches


@FEW
@given(layouts(), st.data())
def test_row_runs_are_the_batches_rows_in_order_between_cursor_and_stop(layout, data):
    # The stream reads each window's rows straight into the order its batches take them, from
    # these runs: they must be the batches' rows, in the batches' order, window by window.
    plan, cursor, stop, want = _between_cursor_and_stop(layout, data)
    runs = list(plan.row_runs(stop))
    got = np.concatenate(runs) if runs else np.zeros(0, dtype=np.int64)
    np.testing.assert_array_equal(got, want)
    assert all(run.dtype == np.int64 and run.size for run in runs)
    windows = [set((run // layout["block_rows"]).tolist()) for run in runs]
    assert all(len(w) <= layout["window_blocks"] for w in windows)  # one window each
    assert plan.cursor == cursor  # drawing the runs does not move the cursor


def test_break_leaves_cursor_at_batches_yielded_and_exhausted_epoch_is_empty():
    plan = EpochPlan(num_samples=100, block_rows=10, batch_size=7)
    assert len(plan) == 15
    for i, _ in enumerate(plan):
        if i == 3:
            break
    assert plan.cursor == 4
    assert len(list(plan)) == 11
    assert plan.cursor == 15
    assert list(plan) == []
    assert len(plan) == 15  # the total, not the remaining
    plan.set_epoch(1)
    assert plan.cursor == 0
    assert sum(len(b) for b in plan) == 100


def test_set_epoch_stops_a_live_iterator():
    plan = EpochPlan(num_samples=50, block_rows=5, batch_size=5)
    iterator = iter(plan)
    next(iterator)
    plan.set_epoch(3)
    assert list(iterator) == []
    assert plan.cursor == 0


@pytest.mark.parametrize("drop_last", [False, True])
def test_len_and_drop_last(drop_last):
    plan = EpochPlan(num_samples=103, block_rows=10, batch_size=8, drop_last=drop_last)
    sizes = [len(b) for b in plan]
    assert len(sizes) == len(plan) == (12 if drop_last else 13)
    assert sizes[-1] == (8 if drop_last else 103 - 12 * 8)


def test_seed_and_epoch_change_the_order():
    def order(**kw):
        return np.concatenate(list(EpochPlan(num_samples=1000, block_rows=10, batch_size=32, **kw)))

    base = order(seed=1, epoch=0)
    np.testing.assert_array_equal(base, order(seed=1, epoch=0))
    assert not np.array_equal(base, order(seed=1, epoch=1))
    assert not np.array_equal(base, order(seed=2, epoch=0))
    assert not np.array_equal(base[:40], np.sort(base[:40]))  # rows inside a window are shuffled


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_per_rank_matches_each_ranks_len(drop_last):
    layout = {"num_samples": 1003, "block_rows": 50, "batch_size": 16, "world_size": 3, "seed": 4}
    layout["drop_last"] = drop_last
    plans = [EpochPlan(**layout, rank=r) for r in range(3)]
    expected = [len(p) for p in plans]
    assert plans[0].batches_per_rank().tolist() == expected
    assert len(set(expected)) > 1  # ranks do differ: why batches_per_rank exists


def test_large_dataset_is_lazy():
    plan = EpochPlan(num_samples=10**7, block_rows=4096, batch_size=1024, window_blocks=4)
    assert plan.num_rows() == 10**7
    assert len(plan) == -(-(10**7) // 1024)
    first = next(iter(plan))
    window = set(plan.block_order()[:4].tolist())
    assert set((first // 4096).tolist()) <= window


def test_works_as_dataloader_batch_sampler():
    num_samples = 37
    dataset = torch.utils.data.TensorDataset(torch.arange(num_samples) * 10)
    layout = {"num_samples": num_samples, "block_rows": 4, "batch_size": 5, "window_blocks": 2}
    plan = EpochPlan(**layout, seed=9)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=plan)
    assert len(loader) == len(plan) == 8
    for epoch in range(2):
        plan.set_epoch(epoch)
        expected = list(EpochPlan(**layout, seed=9, epoch=epoch))
        for (values,), rows in zip(loader, expected, strict=True):
            assert torch.equal(values, torch.from_numpy(rows) * 10)


LAYOUT = {"num_samples": 100, "block_rows": 10, "batch_size": 8, "window_blocks": 2}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_samples", 101),
        ("block_rows", 20),
        ("batch_size", 4),
        ("seed", 1),
        ("window_blocks", 3),
        ("rank", 1),
        ("world_size", 3),
        ("drop_last", True),
    ],
)
def test_load_state_dict_refuses_a_different_layout(key, value):
    plan = EpochPlan(**LAYOUT, world_size=2)
    state = plan.state_dict()
    state[key] = value
    with pytest.raises(ValueError, match=f"{key}: saved"):
        plan.load_state_dict(state)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"cursor": 14}, "past the end"), ({"cursor": -1}, "cursor"), ({"epoch": None}, "epoch")],
)
def test_load_state_dict_refuses_bad_positions(change, message):
    plan = EpochPlan(**LAYOUT)
    with pytest.raises(ValueError, match=message):
        plan.load_state_dict({**plan.state_dict(), **change})


def test_load_state_dict_refuses_missing_keys():
    plan = EpochPlan(**LAYOUT)
    state = plan.state_dict()
    del state["seed"]
    with pytest.raises(ValueError, match="missing"):
        plan.load_state_dict(state)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_samples": -1}, "num_samples"),
        ({"block_rows": 0}, "block_rows"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.0}, "batch_size"),
        ({"batch_size": 21}, "window_blocks to at least 3"),
        ({"seed": -3}, "seed"),
        ({"epoch": -1}, "epoch"),
        ({"window_blocks": 0}, "window_blocks"),
        ({"world_size": 0}, "world_size"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"rank": True}, "rank"),
        ({"drop_last": 1}, "drop_last"),
    ],
)
def test_constructor_validation(change, message):
    with pytest.raises(ValueError, match=message):
        EpochPlan(**{**LAYOUT, **change})


def test_empty_dataset_and_idle_rank():
    assert list(EpochPlan(num_samples=0, block_rows=4, batch_size=2)) == []
    idle = EpochPlan(num_samples=8, block_rows=4, batch_size=2, rank=2, world_size=3)
    assert len(idle) == 0
    assert idle.block_order().size == 0
    assert list(idle) == []
