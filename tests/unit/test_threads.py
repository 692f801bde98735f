"""The student's CPU thread count beside its batch makers (`softcache.runtime.threads`)."""

from __future__ import annotations

import os

import pytest
import torch

from softcache.runtime import threads
from softcache.runtime.threads import THREAD_ENV, intra_op_threads, student_threads


@pytest.fixture
def machine(monkeypatch):
    """A machine of `cores` usable CPUs with torch at `torch_threads`, no thread env set."""

    def set_machine(cores: int, torch_threads: int) -> None:
        monkeypatch.setattr(threads, "usable_cores", lambda: cores)
        monkeypatch.setattr(torch, "get_num_threads", lambda: torch_threads)

    for name in THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    return set_machine


@pytest.mark.parametrize(
    ("cores", "torch_threads", "makers", "local_ranks", "expected"),
    [
        (2, 2, 1, 1, 1),  # this project's machine: the batch process takes the other core
        (16, 16, 1, 1, 15),
        (16, 8, 1, 1, 8),  # torch at the physical cores: never raised
        (16, 16, 3, 1, 13),  # the batch process and two DataLoader workers
        (16, 16, 1, 4, 3),  # four ranks share the machine
        (1, 1, 1, 1, 1),  # at least one thread
        (4, 4, 9, 1, 1),
    ],
)
def test_a_cpu_student_leaves_a_core_to_each_batch_maker(
    machine, cores, torch_threads, makers, local_ranks, expected
):
    machine(cores, torch_threads)
    got = student_threads(0, cpu_student=True, batch_makers=makers, local_ranks=local_ranks)
    assert got == expected


def test_an_explicit_count_is_taken_as_it_is(machine):
    machine(2, 2)
    assert student_threads(6, cpu_student=True, batch_makers=1) == 6
    assert student_threads(3, cpu_student=False, batch_makers=0) == 3


def test_torchs_count_is_left_alone_where_nothing_competes_or_the_user_chose(machine, monkeypatch):
    machine(16, 16)
    assert student_threads(0, cpu_student=False, batch_makers=1) is None  # a GPU student
    assert student_threads(0, cpu_student=True, batch_makers=0) is None
    for name in THREAD_ENV:
        with monkeypatch.context() as env:
            env.setenv(name, "4")
            assert student_threads(0, cpu_student=True, batch_makers=1) is None


def test_usable_cores_is_this_process_s_share_of_the_machine():
    assert 1 <= threads.usable_cores() <= (os.cpu_count() or 1)


def test_intra_op_threads_sets_the_count_and_restores_it_even_on_error():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with intra_op_threads(target) as count:
        assert count == target == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"), intra_op_threads(target):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with intra_op_threads(None) as count:
        assert count == before == torch.get_num_threads()


def test_a_negative_thread_count_is_refused_by_name():
    from softcache.config import TrainConfig
    from softcache.errors import ConfigError

    with pytest.raises(ConfigError, match=r"threads.*must be >= 0, got 0, -1"):
        TrainConfig(student="m:s", dataset="m:d", mode="hard", threads=-1)


@pytest.mark.parametrize(("value", "expected"), [(None, 1), ("4", 4), ("0", 1), ("x", 1)])
def test_local_ranks_reads_torchruns_count_or_takes_one(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", value)
    assert threads.local_ranks() == expected


@pytest.mark.parametrize(
    ("cores", "student", "cpu", "workers", "local_ranks", "expected"),
    [
        (2, 1, True, 0, 1, 1),  # this project's machine: the core the student leaves
        (16, 15, True, 0, 1, 1),  # a CPU student on every core but the batch maker's
        (16, 4, True, 0, 1, 12),  # an explicit --threads 4
        (16, 13, True, 2, 1, 1),  # two DataLoader workers take a core each
        (16, 16, False, 0, 1, 15),  # a GPU student's training thread takes one core
        (16, 16, False, 3, 4, 1),  # four ranks: 4 cores each, less the thread and the workers
        (2, 2, True, 0, 1, 1),  # oversubscribed: still one
        (1, 1, True, 4, 1, 1),
    ],
)
def test_a_runs_reads_decode_on_the_cores_its_student_leaves(
    monkeypatch, cores, student, cpu, workers, local_ranks, expected
):
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    got = threads.batch_maker_read_threads(
        student, cpu_student=cpu, workers=workers, local_ranks=local_ranks
    )
    assert got == expected


@pytest.fixture
def reads_default(monkeypatch):
    """No decoding count chosen by the user, by torchrun or by a run; restored afterwards."""
    monkeypatch.delenv(threads.READ_THREADS_ENV, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads, "_read_threads", None)
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)


def test_the_decoding_threads_are_the_users_then_the_runs_then_the_machines(
    reads_default, monkeypatch
):
    assert threads.read_threads() == 8
    with threads.reading_threads(3) as count:
        assert count == threads.read_threads() == 3
        with threads.reading_threads(None) as inner:  # None: as they are
            assert inner == 3
        monkeypatch.setenv(threads.READ_THREADS_ENV, "5")
        assert threads.read_threads() == 5  # the user's number over the run's
        monkeypatch.delenv(threads.READ_THREADS_ENV)
        assert threads.read_threads() == 3
    assert threads.read_threads() == 8
    with pytest.raises(RuntimeError, match="boom"), threads.reading_threads(2):
        raise RuntimeError("boom")
    assert threads.read_threads() == 8
    assert threads.set_read_threads(6) is None and threads.read_threads() == 6
    assert threads.set_read_threads(None) == 6 and threads.read_threads() == 8


def test_a_decoding_count_below_one_is_refused(reads_default):
    with pytest.raises(ValueError, match="at least 1, got 0"):
        threads.set_read_threads(0)
    assert threads.read_threads() == 8
