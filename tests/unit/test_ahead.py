"""`Ahead`: an iterator run on a background thread keeps its order, raises where its source
raised, and stops its thread (and runs the source's `finally`) when the consumer stops early."""

from __future__ import annotations

import threading

import pytest

from softcache.trainer.ahead import Ahead


def test_items_arrive_in_order_and_the_thread_ends() -> None:
    ahead = Ahead(iter(range(100)), depth=3)
    assert list(ahead.results()) == list(range(100))
    ahead._thread.join(timeout=5)
    assert not ahead._thread.is_alive()


def test_an_error_reaches_the_consumer_at_its_item() -> None:
    def source():
        yield 1
        yield 2
        raise ValueError("item 3 is bad")

    got = []
    with pytest.raises(ValueError, match="item 3 is bad"):
        for item in Ahead(source(), depth=1).results():
            got.append(item)
    assert got == [1, 2]


def test_stopping_early_stops_the_thread_and_closes_the_source() -> None:
    closed = threading.Event()

    def source():
        try:
            yield from range(10_000)
        finally:
            closed.set()

    ahead = Ahead(source(), depth=2)
    results = ahead.results()
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    results.close()
    assert closed.wait(5) and not ahead._thread.is_alive()


def test_a_plain_iterator_without_close_works() -> None:
    assert list(Ahead(iter([3, 1, 2]), depth=1).results()) == [3, 1, 2]
