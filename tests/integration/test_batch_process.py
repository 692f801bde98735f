"""The batch process (`softcache.trainer.batch_process`) makes, in a child process, exactly the
batches the batch thread makes: every row store kind (fp16, bf16, top-k, views), token stores, for
a CPU student (teacher targets) and for a CUDA one (stored dtypes), across epochs, with an epoch
stopped early; errors and a dead child reach the parent by name; a config that cannot reach a
child trains on the thread, with a warning; the two loaders train the same student."""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import pickle
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import softcache
from softcache import losses
from softcache.config import TrainConfig
from softcache.errors import ConfigError, DatasetMismatchError
from softcache.store import LogitStore
from softcache.trainer import batch_process, distill, rows, train
from softcache.trainer.batch_process import BatchProcess, BatchProcessError, NextEpoch
from softcache.trainer.ddp import Ranks
from softcache.trainer.distill import AlignedBatches, AlignedTokenBatches
from softcache.trainer.layout_process import child_source, layout_process
from softcache.trainer.layouts import open_layout
from softcache.trainer.loop import epoch_hash_stride
from softcache.trainer.plan import EpochPlan
from softcache.trainer.stream import SoftLabels, equal_steps, plan_from_state
from tests.conftest import spec
from tests.helpers import build_row_stores, build_token_store, specs, token_specs
from tests.helpers.batch_sources import MarkedEpochs, NumberedBatches, marked, numbered


def mp_default() -> str:
    """This platform's default start method (the first `get_all_start_methods` names)."""
    return multiprocessing.get_all_start_methods()[0]


ROWS = {
    "dense-fp16": {},
    "dense-bf16": {"dtype": "bfloat16"},
    "topk-bf16": {"encoding": "topk", "top_k": 5, "dtype": "bfloat16", "temperatures": (1, 2)},
    "views": {"teacher": spec("conv_teacher"), "views": 4, "augment": "crop(size=8);flip"},
}
TOKEN_DATA = "tests.helpers.token_specs:ragged_dataset"


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("batch-process")
    out = build_row_stores(base, ROWS)
    out["tokens"] = build_token_store(base / "tokens.zarr", "--encoding", "topk", "--top-k", "4")
    return out


def _config(stores: dict[str, Path], kind: str, tmp_path: Path, **extra: Any) -> TrainConfig:
    if kind == "tokens":
        values = {"lm": True, "dataset": TOKEN_DATA, "batch_size": 4}
        values["student"] = "tests.helpers.lm_train_specs:causal_student"
    else:
        values = {"dataset": spec("dataset"), "student": spec("teacher"), "batch_size": 24}
    values.update(extra)
    return TrainConfig(
        store=str(stores[kind]), mode="offline", temperature=2.0, output=str(tmp_path / "run"),
        epochs=2, **values,
    )  # fmt: skip


def _plans(layout: Any, config: TrainConfig) -> list[EpochPlan]:
    plan = EpochPlan(
        num_samples=layout.num_samples, block_rows=layout.block_rows,
        batch_size=config.batch_size, seed=config.seed, window_blocks=config.window_blocks,
    )  # fmt: skip
    second = plan_from_state(plan.state_dict())
    second.set_epoch(1)
    return [plan, second]


def _epochs(make: Any, layout: Any, config: TrainConfig, *, ahead: bool = False) -> list[list[Any]]:
    """Two epochs of batches (the first reading the second's ahead), copied out of their
    memory as they arrive, so each is compared as it came. `ahead`:
    the second epoch is queued in the batch process with the first (`after`), as the
    training loop does."""
    plans = _plans(layout, config)
    out = []
    for epoch, plan in enumerate(plans):
        then = plans[1] if epoch == 0 else None
        stride = epoch_hash_stride(config, first_epoch=epoch == 0)
        extra = {}
        if ahead and then is not None:
            later = epoch_hash_stride(config, first_epoch=False)
            extra["after"] = NextEpoch(then, equal_steps(then), later, None)
        batches = make(plan, equal_steps(plan), hash_stride=stride, then=then, **extra)
        out.append([_copied(batch) for batch in batches])
    return out


def _copied(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, (tuple, list)):
        return type(value)(_copied(v) for v in value)
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        copy = object.__new__(type(value))
        for key, item in vars(value).items():
            object.__setattr__(copy, key, _copied(item))
        return copy
    if hasattr(value, "__dict__"):
        copy = object.__new__(type(value))
        copy.__dict__.update({k: _copied(v) for k, v in vars(value).items()})
        return copy
    return value


def _assert_same(a: Any, b: Any, where: str = "batch") -> None:
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif hasattr(a, "__dict__"):
        _assert_same(vars(a), vars(b), f"{where}.")
    else:
        assert a == b, where


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("kind", [*ROWS, "tokens"])
def test_the_batch_process_makes_the_batches_the_thread_makes(
    stores: dict[str, Path], kind: str, device: str, tmp_path: Path, in_root: Path
) -> None:
    # "cuda": the batches a CUDA student gets, made without touching a GPU.
    stride = {} if kind == "tokens" else {"hash_stride": 3}  # rows: a sampled later check
    config = _config(stores, kind, tmp_path, hash_check="first-epoch", **stride)
    where = torch.device(device)
    layout = open_layout(config, Ranks(), where, None, pin_memory=False)
    process = layout_process(config, Ranks(), where)
    try:
        made = _epochs(process.batches, layout, config, ahead=True)  # as the loop asks
    finally:
        process.close()
    want = _epochs(layout.batches, layout, config)
    assert [len(e) for e in made] == [len(e) for e in want] and len(want[0]) > 1
    for epoch, (got, expected) in enumerate(zip(made, want, strict=True)):
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            _assert_same(a, b, f"{kind} epoch {epoch} batch {i}")


def _first_batch(layout: Any, config: TrainConfig) -> Any:
    plan = _plans(layout, config)[0]
    batches = layout.batches(plan, equal_steps(plan), hash_stride=0, then=None)
    try:
        return next(batches)
    finally:
        batches.close()


@pytest.mark.parametrize("kind", list(ROWS))
def test_a_gpu_students_teacher_targets_are_made_with_the_batch_but_for_large_dense_rows(
    stores: dict[str, Path],
    kind: str,
    tmp_path: Path,
    in_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A GPU student's step copies the targets made with the batch, the same a CPU student's
    step takes (made from the stored dtype, widened exactly); dense rows of more elements a
    batch than `HOST_TARGETS_ELEMENTS` cross in the stored dtype, made into targets on the
    device. Top-k targets are made with the batch at any width."""
    config = _config(stores, kind, tmp_path)
    gpu = open_layout(config, Ranks(), torch.device("cuda"), None, pin_memory=False)
    cpu = open_layout(config, Ranks(), torch.device("cpu"), None)
    made = _first_batch(gpu, config)[2]
    assert isinstance(made, losses.TeacherTargets)
    _assert_same(made, _first_batch(cpu, config)[2], kind)
    # Decided as the layout is made, from the batch size: its stream then makes no targets.
    monkeypatch.setattr(rows, "HOST_TARGETS_ELEMENTS", 8)
    gpu = open_layout(config, Ranks(), torch.device("cuda"), None, pin_memory=False)
    made = _first_batch(gpu, config)[2]
    if kind.startswith("topk"):
        assert isinstance(made, losses.TeacherTargets)
    else:
        assert isinstance(made, SoftLabels)
        assert made.logits is not None
        assert made.logits.dtype == getattr(torch, gpu.store.meta.value_dtype)


def test_an_epoch_stopped_early_leaves_the_next_one_whole(
    stores: dict[str, Path], tmp_path: Path, in_root: Path
) -> None:
    config = _config(stores, "topk-bf16", tmp_path)
    layout = open_layout(config, Ranks(), torch.device("cpu"), None)
    first, second = _plans(layout, config)
    process = layout_process(config, Ranks(), torch.device("cpu"))
    try:
        batches = process.batches(first, equal_steps(first), hash_stride=1, then=second)
        taken = [_copied(next(batches)) for _ in range(2)]
        batches.close()  # as the loop does at max_steps
        made = [_copied(b) for b in process.batches(second, len(second), hash_stride=0, then=None)]
    finally:
        process.close()
    want_first = list(layout.batches(first, equal_steps(first), hash_stride=1, then=None))
    _assert_same(taken, [_copied(b) for b in want_first[:2]])
    want = list(layout.batches(second, len(second), hash_stride=0, then=None))
    _assert_same(made, want)


def _marked_plan(epoch: int) -> EpochPlan:
    plan = EpochPlan(num_samples=64, block_rows=16, batch_size=8, seed=0)
    plan.set_epoch(epoch)
    return plan


def _appears(path: Path, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _made(batches: Any) -> list[list[int]]:
    return [batch.tolist() for batch in batches]


def test_the_epoch_queued_after_this_one_is_made_before_it_is_asked_for(
    tmp_path: Path, in_root: Path
) -> None:
    """The next epoch's batches are under way in the child while the loop is between epochs
    (evaluating, checkpointing), so its first batch does not wait for the child to set it up.
    Six batches an epoch against three slots: the queued epoch waits for slots like any."""
    first, second = _marked_plan(0), _marked_plan(1)
    process = BatchProcess(MarkedEpochs(str(tmp_path)), torch.device("cpu"), depth=2)
    try:
        after = NextEpoch(second, 6, 0, None)
        got = _made(process.batches(first, 6, hash_stride=1, then=second, after=after))
        assert got == marked(first, 6, 1)
        assert _appears(tmp_path / "epoch-1")  # begun before anyone asked for it
        assert _made(process.batches(second, 6, hash_stride=0, then=None)) == marked(second, 6, 0)
        time.sleep(0.3)  # nothing was queued after the second: the child starts nothing
        assert not (tmp_path / "epoch-2").exists()
    finally:
        process.close()


@pytest.mark.parametrize(
    "asked",
    [(1, 4, 0), (1, 6, 1), (5, 6, 0)],
    ids=["other-steps", "other-stride", "other-epoch"],
)
def test_an_epoch_queued_ahead_but_asked_for_otherwise_is_dropped(
    tmp_path: Path, in_root: Path, asked: tuple[int, int, int]
) -> None:
    first, second = _marked_plan(0), _marked_plan(1)
    process = BatchProcess(MarkedEpochs(str(tmp_path)), torch.device("cpu"), depth=2)
    try:
        after = NextEpoch(second, 6, 0, None)
        _made(process.batches(first, 6, hash_stride=1, then=second, after=after))
        assert _appears(tmp_path / "epoch-1")
        epoch, steps, stride = asked
        plan = _marked_plan(epoch)
        got = _made(process.batches(plan, steps, hash_stride=stride, then=None))
        assert got == marked(plan, steps, stride)  # not a batch of the queued epoch among them
        # ... and the process is in step for the epoch after.
        assert _made(process.batches(first, 6, hash_stride=0, then=None)) == marked(first, 6, 0)
    finally:
        process.close()


def test_an_epoch_left_early_drops_the_epoch_queued_after_it(tmp_path: Path, in_root: Path) -> None:
    first, second = _marked_plan(0), _marked_plan(1)
    process = BatchProcess(MarkedEpochs(str(tmp_path)), torch.device("cpu"), depth=2)
    try:
        after = NextEpoch(second, 6, 0, None)
        batches = process.batches(first, 6, hash_stride=1, then=second, after=after)
        assert next(batches).tolist() == marked(first, 6, 1)[0]
        batches.close()  # as the loop does at max_steps
        time.sleep(0.3)
        assert not (tmp_path / "epoch-1").exists()  # dropped, never begun
        assert _made(process.batches(second, 3, hash_stride=1, then=None)) == marked(second, 3, 1)
    finally:
        process.close()


# ---- batches held past the next one ------------------------------------------------------------


@pytest.fixture
def given_up(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batches whose slots the parent left to their holders (and had the child renew)."""
    batches: list[int] = []
    original = BatchProcess._give_up

    def counted(self: BatchProcess, batch: int) -> None:
        batches.append(batch)
        original(self, batch)

    monkeypatch.setattr(BatchProcess, "_give_up", counted)
    return batches


def _numbered(process: BatchProcess, epoch: int, steps: int = 12) -> Any:
    return process.batches(_marked_plan(epoch), steps, hash_stride=0, then=None)


def _is(batch: dict[str, Any], epoch: int, index: int) -> None:
    want = numbered(epoch, index)
    assert torch.equal(batch["tensor"], want["tensor"]), (epoch, index)
    assert np.array_equal(batch["array"], want["array"]), (epoch, index)


def _one_ahead(batches: Any) -> Any:
    """What accelerate's loader wrappers do: fetch the next batch before yielding this one."""
    iterator = iter(batches)
    current = next(iterator, None)
    for following in iterator:
        yield current
        current = following
    if current is not None:
        yield current


def test_a_loop_that_lets_each_batch_go_keeps_to_its_slots(
    in_root: Path, given_up: list[int]
) -> None:
    process = BatchProcess(NumberedBatches(), torch.device("cpu"), depth=2)
    try:
        for epoch in range(3):
            for index, batch in enumerate(_numbered(process, epoch)):
                _is(batch, epoch, index)
        assert given_up == [] and len(process._slots) == 4  # depth + 2, never renewed
    finally:
        process.close()


def test_a_consumer_one_batch_ahead_reads_each_batch_as_it_was_made(
    in_root: Path, given_up: list[int]
) -> None:
    """Each batch is checked after the next one was fetched, as under accelerate's wrappers
    (with views valid only until the next request, the child overwrote it meanwhile)."""
    process = BatchProcess(NumberedBatches(), torch.device("cpu"), depth=2)
    try:
        for epoch in range(2):
            got = 0
            for index, batch in enumerate(_one_ahead(_numbered(process, epoch))):
                time.sleep(0.01)  # time for the child to fill every slot it may
                _is(batch, epoch, index)
                got += 1
            assert got == 12
        assert given_up == []  # one slot more in use: the child's lead is one less
    finally:
        process.close()


def test_an_epoch_held_whole_reads_as_it_was_made_and_its_memory_goes_with_it(
    in_root: Path, given_up: list[int]
) -> None:
    """12 batches held against 4 slots: each held slot is left to its batch and made anew in
    the child, without a stall; once the batches go, so does their memory."""
    process = BatchProcess(NumberedBatches(), torch.device("cpu"), depth=2)
    try:
        held = list(_numbered(process, 0))
        for index, batch in enumerate(held):
            _is(batch, 0, index)
        assert len(given_up) >= 12 - 4
        assert len(process._given_up) == len(given_up)  # all still held
        del held, batch
        for index, batch in enumerate(_numbered(process, 1)):
            _is(batch, 1, index)
        assert process._given_up == []  # freed once nothing held them
    finally:
        process.close()


def test_holding_batches_by_the_score_is_warned_of(in_root: Path) -> None:
    process = BatchProcess(NumberedBatches(), torch.device("cpu"), depth=2)
    try:
        with pytest.warns(RuntimeWarning, match="64 batches from the batch process are still held"):
            held = list(_numbered(process, 0, steps=72))
        for index, batch in enumerate(held):
            _is(batch, 0, index)
    finally:
        process.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_batch_let_go_while_its_copy_to_the_gpu_waits_is_not_overwritten(in_root: Path) -> None:
    """Each batch is copied to the GPU asynchronously behind a long kernel and let go at once:
    its slot is free only once the copy has read it (the event), not when the batch goes."""
    process = BatchProcess(NumberedBatches(rows=1 << 16), torch.device("cuda"), depth=2)
    try:
        busy = torch.rand(8192, 8192, device="cuda")
        copies = []
        for index, batch in enumerate(_numbered(process, 0, steps=24)):
            if index % 6 == 0:
                for _ in range(4):  # tens of milliseconds queued ahead of the next copies
                    busy = busy @ busy
            copies.append(batch["tensor"].to("cuda", non_blocking=True))
            del batch
        torch.cuda.synchronize()
        for index, copy in enumerate(copies):
            assert bool((copy == index).all()), index
    finally:
        process.close()


@pytest.mark.parametrize("keep", ["tensor", "array"])
def test_views_of_a_batch_keep_its_slot_without_the_batch(
    in_root: Path, given_up: list[int], keep: str
) -> None:
    """Only a slice of each batch is kept (the batch itself goes): a tensor's view holds the
    slot's storage, an array's its byte array."""
    process = BatchProcess(NumberedBatches(), torch.device("cpu"), depth=2)
    try:
        kept = [batch[keep][3:9:2] for batch in _numbered(process, 0)]
        assert len(given_up) >= 12 - 4
        for index, part in enumerate(kept):
            assert (part == 1000 * 0 + index).all() and len(part) == 3, index
    finally:
        process.close()


@pytest.mark.parametrize("seed", range(4))
def test_a_consumer_that_holds_and_drops_batches_at_random_reads_each_as_made(
    in_root: Path, seed: int
) -> None:
    """Epochs of random lengths, some left early; batches (or slices of them) held at random
    and dropped at random, across epochs; every held batch checked after every step."""
    rng = random.Random(seed)
    process = BatchProcess(NumberedBatches(), torch.device("cpu"), depth=rng.choice([0, 1, 2]))
    held: list[tuple[int, int, dict[str, Any]]] = []

    def check_held() -> None:
        for epoch, index, batch in held:
            value = 1000 * epoch + index
            assert (batch["tensor"] == value).all() and (batch["array"] == value).all()

    try:
        for epoch in range(24):
            steps = rng.randint(1, 24)
            leave_at = rng.randrange(steps) if rng.random() < 0.3 else None
            batches = _numbered(process, epoch, steps)
            for index, batch in enumerate(batches):
                _is(batch, epoch, index)
                draw = rng.random()
                if draw < 0.2:
                    held.append((epoch, index, batch))
                elif draw < 0.3:
                    held.append((epoch, index, {k: v[1:] for k, v in batch.items()}))
                if held and rng.random() < 0.3:
                    held.pop(rng.randrange(len(held)))
                check_held()
                if index == leave_at:
                    batches.close()
                    break
            if rng.random() < 0.5:
                held.clear()
    finally:
        process.close()
    check_held()  # memory the child no longer has stays the holders'


def test_without_torchs_storage_count_a_batch_is_done_at_the_next_request(
    in_root: Path, monkeypatch: pytest.MonkeyPatch, given_up: list[int]
) -> None:
    """The fallback where torch no longer has the (private) count: a batch is counted done
    when the one after it is asked for (its loop variable has moved on)."""
    monkeypatch.setattr(batch_process, "_storage_use_count", None)
    process = BatchProcess(NumberedBatches(), torch.device("cpu"), depth=2)
    try:
        for index, batch in enumerate(_numbered(process, 0)):
            _is(batch, 0, index)
            assert process._consumed.value == max(index - 1, 0)  # the ones before the last
        assert given_up == []
    finally:
        process.close()


def test_a_dataset_that_differs_is_refused_by_name_from_the_child(
    stores: dict[str, Path], tmp_path: Path, in_root: Path
) -> None:
    config = _config(stores, "dense-fp16", tmp_path, dataset=spec("altered_dataset"))
    layout = open_layout(config, Ranks(), torch.device("cpu"), None)
    plan = _plans(layout, config)[0]
    process = layout_process(config, Ranks(), torch.device("cpu"))
    try:
        with pytest.raises(DatasetMismatchError, match=f"sample {specs.ALTERED_SAMPLE} ") as info:
            for _ in process.batches(plan, len(plan), hash_stride=1, then=None):
                pass
        assert any("raised in the batch process" in note for note in info.value.__notes__)
        # The child lives on: the next epoch (unchecked) still comes.
        assert len(list(process.batches(plan, len(plan), hash_stride=0, then=None))) == len(plan)
    finally:
        process.close()


def test_a_killed_batch_process_is_named(
    stores: dict[str, Path], tmp_path: Path, in_root: Path
) -> None:
    config = _config(stores, "dense-fp16", tmp_path)
    layout = open_layout(config, Ranks(), torch.device("cpu"), None)
    plan = _plans(layout, config)[0]
    process = layout_process(config, Ranks(), torch.device("cpu"))
    try:
        batches = process.batches(plan, len(plan), hash_stride=0, then=None)
        next(batches)
        assert process._process.pid is not None
        os.kill(process._process.pid, signal.SIGKILL)
        with pytest.raises(BatchProcessError, match=r"exited \(code -9\).*--loader thread"):
            for _ in batches:
                pass
    finally:
        process.close()


def test_the_child_sees_the_environment_of_the_run_not_of_the_fork_server(
    stores: dict[str, Path], tmp_path: Path, in_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fork server is started by now (earlier tests); its environment is older than this one.
    config = _config(stores, "dense-fp16", tmp_path)
    layout_process(config, Ranks(), torch.device("cpu")).close()
    monkeypatch.setenv("SOFTCACHE_TEST_N", str(specs.num_samples() - 1))
    process = layout_process(config, Ranks(), torch.device("cpu"))
    try:
        # The child's dataset is one sample short, as this process's would be: refused there.
        with pytest.raises(
            BatchProcessError, match=r"(?s)could not build the layout.*has 299 samples"
        ):
            process.wait_ready()
    finally:
        process.close()


def test_dataloader_workers_in_the_child_start_as_in_the_parent(
    stores: dict[str, Path], tmp_path: Path, in_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fork-server child defaults to the fork server for its own processes: each epoch's
    # DataLoader workers would unpickle the dataset anew (ten times slower epochs of the digits
    # job at --num-workers 2).
    record = tmp_path / "start-methods"
    monkeypatch.setenv("SOFTCACHE_TEST_RECORD", str(record))
    config = _config(
        stores, "dense-fp16", tmp_path, dataset=spec("start_method_dataset"), num_workers=2
    )
    layout = open_layout(config, Ranks(), torch.device("cpu"), None)
    process = layout_process(config, Ranks(), torch.device("cpu"))
    try:
        made = _epochs(process.batches, layout, config)
    finally:
        process.close()
    parents = multiprocessing.get_start_method(allow_none=True) or mp_default()
    assert record.read_text().split()[-1] == parents  # the child's, made after the parent's
    _assert_same(made, _epochs(layout.batches, layout, config))


def test_a_dataset_object_reaches_the_child_in_shared_memory(
    stores: dict[str, Path], tmp_path: Path, in_root: Path
) -> None:
    data = specs.dataset()
    config = _config(stores, "dense-fp16", tmp_path, dataset=data)
    layout = open_layout(config, Ranks(), torch.device("cpu"), None)
    process = layout_process(config, Ranks(), torch.device("cpu"))
    try:
        process.wait_ready()
        assert data.x.is_shared()  # moved to shared memory for the child, not copied to it
        made = _epochs(process.batches, layout, config)
    finally:
        process.close()
    _assert_same(made, _epochs(layout.batches, layout, config))


def test_a_config_that_cannot_reach_a_child_trains_on_a_thread(
    built_stores: dict[str, Path], tmp_path: Path, in_root: Path
) -> None:
    data = specs.dataset()
    config = TrainConfig(
        student=spec("teacher"), dataset=lambda: data, store=str(built_stores["dense"]),
        mode="offline", epochs=1, batch_size=24, output=str(tmp_path / "run"),
    )  # fmt: skip
    with pytest.warns(RuntimeWarning, match="making batches on a thread.*does not pickle"):
        result = train(config, progress=False)
    assert len(result.metrics["train_loss"]) == 1


@pytest.mark.parametrize("kind", ["dense-fp16", "topk-bf16"])
def test_both_loaders_train_the_same_student(
    stores: dict[str, Path], kind: str, tmp_path: Path, in_root: Path
) -> None:
    students = []
    for loader in ("process", "thread"):
        config = _config(stores, kind, tmp_path / loader, loader=loader, alpha=0.3)
        result = train(config, progress=False)
        students.append(result.student.state_dict())
        losses = result.metrics["train_loss"]
        if loader == "process":
            process_losses = losses
    assert losses == process_losses
    for name, value in students[0].items():
        assert torch.equal(value, students[1][name]), name


# ---- the own-loop API: AlignedBatches(..., batch_process=True) ---------------------------------


def _api_epochs(aligned: AlignedBatches, plans: list[EpochPlan], **kwargs: Any) -> list[Any]:
    """Two epochs of `aligned` (the first reading the second's ahead), copied as they arrive."""
    out = []
    for epoch, plan in enumerate(plans):
        then = plans[1] if epoch == 0 else None
        out.append([_copied(batch) for batch in aligned.epoch(plan, then=then, **kwargs)])
    return out


def _store_plans(store: LogitStore, batch_size: int = 24) -> list[EpochPlan]:
    plan = EpochPlan(
        num_samples=store.meta.num_samples, block_rows=store.meta.shard_samples,
        batch_size=batch_size, seed=3,
    )  # fmt: skip
    second = plan_from_state(plan.state_dict())
    second.set_epoch(1)
    return [plan, second]


@pytest.mark.parametrize("values", ["float32", "stored"])
@pytest.mark.parametrize("kind", list(ROWS))
def test_aligned_batches_in_a_batch_process_are_the_inline_ones(
    stores: dict[str, Path], kind: str, values: str, in_root: Path
) -> None:
    store = LogitStore.open(stores[kind])
    options = {"values": values, "hash_stride": 2, "view_policy": "random", "temperature": 2.0}
    inline = AlignedBatches(specs.dataset(), store, **options)
    plans = _store_plans(store)
    with AlignedBatches(specs.dataset(), store, batch_process=True, **options) as aligned:
        made = _api_epochs(aligned, plans)
        assert aligned.steps(plans[0]) == len(made[0]) > 1
        # A per-epoch hash stride reaches the child; so does a re-iterable loader's epoch.
        made_unchecked = _api_epochs(aligned, plans, hash_stride=0)
        loader = aligned.loader(plan_from_state(plans[0].state_dict()))
        looped = [[_copied(b) for b in loader] for _ in range(2)]
    want = _api_epochs(inline, plans)
    _assert_same(made, want, kind)
    _assert_same(made_unchecked, want, kind)
    _assert_same(looped, [[_copied(b) for b in inline.epoch(p)] for p in plans], kind)


def test_aligned_batches_held_a_whole_epoch_are_the_inline_ones(
    stores: dict[str, Path], in_root: Path
) -> None:
    """No copies: the batches of a top-k store's epoch, kept in a list, read as the inline
    ones (more batches than slots)."""
    store = LogitStore.open(stores["topk-bf16"])
    options = {"values": "stored", "temperature": 2.0}
    plans = _store_plans(store, batch_size=12)  # 2 x 25 batches: under the warning's 64
    with AlignedBatches(specs.dataset(), store, batch_process=True, **options) as aligned:
        held = [list(aligned.epoch(plan)) for plan in plans]
        assert len(held[0]) > 6  # the default depth's slots
        _assert_same(held, _api_epochs(AlignedBatches(specs.dataset(), store, **options), plans))


def test_aligned_batches_refuse_a_misaligned_dataset_from_the_child(
    stores: dict[str, Path], in_root: Path
) -> None:
    store = LogitStore.open(stores["dense-fp16"])
    plan = _store_plans(store)[0]
    with AlignedBatches(specs.altered_dataset(), store, batch_process=True) as aligned:
        with pytest.raises(DatasetMismatchError, match=f"sample {specs.ALTERED_SAMPLE} ") as info:
            for _ in aligned.epoch(plan):
                pass
        assert any("raised in the batch process" in note for note in info.value.__notes__)
        # An epoch stopped early, then one whole: the child stops and goes on.
        batches = aligned.epoch(plan, hash_stride=0)
        next(batches)
        batches.close()
        assert sum(1 for _ in aligned.epoch(plan, hash_stride=0)) == aligned.steps(plan)


def test_aligned_batches_after_close_are_made_here(stores: dict[str, Path], in_root: Path) -> None:
    store = LogitStore.open(stores["topk-bf16"])
    plans = _store_plans(store)
    aligned = AlignedBatches(specs.dataset(), store, batch_process=True)
    process = aligned._process
    assert process is not None
    aligned.close()
    aligned.close()  # idempotent
    assert not process._process.is_alive()
    _assert_same(
        _api_epochs(aligned, plans), _api_epochs(AlignedBatches(specs.dataset(), store), plans)
    )


class _Scripted(torch.utils.data.Dataset):
    """A dataset class as a training script defines it: in `__main__`."""

    def __len__(self) -> int:
        return specs.num_samples()

    def __getitem__(self, i: int) -> Any:
        return specs.dataset()[i]


_Scripted.__module__ = "__main__"


def test_aligned_batches_refuse_what_the_child_cannot_receive(
    stores: dict[str, Path], in_root: Path
) -> None:
    store = LogitStore.open(stores["dense-fp16"])
    with pytest.raises(ConfigError, match=r"_Scripted is defined in the script being run"):
        AlignedBatches(_Scripted(), store, batch_process=True)
    unpicklable = specs.dataset()
    unpicklable.hook = lambda: 0  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"does not pickle.*batch_process=False"):
        AlignedBatches(unpicklable, store, batch_process=True)
    with pytest.raises(ConfigError, match="client"):
        AlignedBatches(specs.dataset(), store, batch_process=True, client=object())


@pytest.mark.parametrize("kind", ["dense-fp16", "topk-bf16"])
def test_distillation_loss_takes_the_batches_targets_at_their_temperature_only(
    stores: dict[str, Path], kind: str, in_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LogitStore.open(stores[kind])
    plan = _store_plans(store)[0]
    with contextlib.closing(AlignedBatches(specs.dataset(), store).epoch(plan)) as batches:
        _, labels, soft = next(batches)
    aligned = AlignedBatches(specs.dataset(), store, temperature=2.0)
    with contextlib.closing(aligned.epoch(plan)) as batches:
        _, _, prepared = next(batches)
    assert soft.targets is None and prepared.targets is not None
    assert prepared.targets.temperature == 2.0
    torch.manual_seed(0)
    logits = torch.randn(len(labels), store.meta.num_classes)
    made: list[float] = []  # the temperatures distillation_loss made targets at itself
    make = distill.teacher_targets
    monkeypatch.setattr(
        distill,
        "teacher_targets",
        lambda soft, **kw: made.append(kw["temperature"]) or make(soft, **kw),
    )
    for temperature in (2.0, 1.0):  # at 1.0 the batch's targets (at 2.0) are not used
        values, grads = [], []
        for batch_soft in (soft, prepared):
            z = logits.clone().requires_grad_()
            loss = softcache.distillation_loss(
                z, batch_soft, labels, temperatures=store.meta.temperatures,
                temperature=temperature, alpha=0.25,
            )  # fmt: skip
            loss.backward()
            values.append(loss.detach())
            grads.append(z.grad)
        assert torch.equal(values[0], values[1]) and torch.equal(grads[0], grads[1]), temperature
    assert made == [2.0, 1.0, 1.0]


def test_aligned_token_batches_in_a_batch_process_are_the_inline_ones(
    stores: dict[str, Path], in_root: Path
) -> None:
    store = LogitStore.open(stores["tokens"])
    inline = AlignedTokenBatches(token_specs.ragged_dataset(), store)
    plan = EpochPlan(
        num_samples=store.meta.num_samples, block_rows=inline.block_rows(4), batch_size=4, seed=5
    )
    second = plan_from_state(plan.state_dict())
    second.set_epoch(1)
    plans = [plan, second]

    def epochs(aligned: AlignedTokenBatches) -> list[Any]:
        return [
            [_copied(b) for b in aligned.epoch(p, then=plans[1] if not e else None)]
            for e, p in enumerate(plans)
        ]

    with AlignedTokenBatches(token_specs.ragged_dataset(), store, batch_process=True) as aligned:
        made = epochs(aligned)
    want = epochs(inline)
    assert len(want[0]) > 1
    _assert_same(made, want, "tokens")


def test_aligned_token_batches_refuse_a_misaligned_dataset_from_the_child(
    stores: dict[str, Path], in_root: Path
) -> None:
    store = LogitStore.open(stores["tokens"])
    data = token_specs.ragged_dataset()
    data.seqs[0], data.seqs[1] = data.seqs[1], data.seqs[0]  # two samples swapped
    with AlignedTokenBatches(data, store, batch_process=True) as aligned:
        plan = EpochPlan(
            num_samples=store.meta.num_samples, block_rows=aligned.block_rows(4), batch_size=4,
            seed=0,
        )  # fmt: skip
        with pytest.raises(DatasetMismatchError) as info:
            for _ in aligned.epoch(plan):
                pass
        assert any("raised in the batch process" in note for note in info.value.__notes__)
        # Closed, the batches are made here, and still checked here.
        aligned.close()
        with pytest.raises(DatasetMismatchError) as info:
            for _ in aligned.epoch(plan):
                pass
        assert not getattr(info.value, "__notes__", None)
    with pytest.raises(ConfigError, match=r"AlignedTokenBatches\(batch_process=True\).*client"):
        AlignedTokenBatches(data, store, batch_process=True, client=object())


@pytest.mark.parametrize("kind", ["dense-fp16", "tokens"])
def test_the_batch_process_decodes_on_the_threads_its_parent_chose(
    stores: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The child's source carries the parent's decoding count (as the loop set it): the layout
    it opens reads its store on that many threads, and so does any store it opens later."""
    from softcache.runtime import threads

    monkeypatch.delenv(threads.READ_THREADS_ENV, raising=False)
    monkeypatch.setattr(threads, "_read_threads", None)  # the child's setting, undone after
    config = _config(stores, kind, tmp_path)
    with threads.reading_threads(3):
        source = child_source(config, Ranks(), torch.device("cpu"))
    source = pickle.loads(pickle.dumps(source))  # as the child receives it
    assert threads.read_threads() != 3 or threads.usable_cores() == 3
    layout = source()
    try:
        assert layout.store.read_threads == 3
        assert threads.read_threads() == 3
        assert LogitStore.open(stores[kind]).read_threads == 3
    finally:
        layout.close()
