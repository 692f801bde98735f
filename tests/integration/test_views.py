"""Stores of augmented views: the stored parameters replay the teacher's input bit for bit, the
view policies deliver the views they document, and verify / train catch a view that does not replay.

Stores are built from the helper specs (300 samples of (1, 8, 8)), 4 views per sample made with a
random resized crop back to 8x8 and a flip.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from softcache.config import BuildConfig, TrainConfig
from softcache.data.augment import from_description
from softcache.data.hashing import hash_rows
from softcache.data.views import replay
from softcache.errors import ConfigError, DatasetMismatchError
from softcache.store import (
    LOGITS,
    SAMPLE_HASH,
    VIEW_PARAMS,
    VIEWS_FORMAT_VERSION,
    LogitStore,
    decode_values,
)
from softcache.tools.verify import verify
from softcache.trainer import train
from softcache.trainer.plan import EpochPlan
from softcache.trainer.stream import SoftLabelStream
from tests.conftest import spec
from tests.helpers import cli
from tests.helpers.specs import conv_teacher, dataset

VIEWS = 4
AUGMENT = "crop(size=8,scale=0.4:1);flip"


@pytest.fixture
def view_store(make_store) -> Path:
    path, _ = make_store(
        "views.zarr", teacher=spec("conv_teacher"), views=VIEWS, augment=AUGMENT, augment_seed=7
    )
    return path


def _raw_inputs(indices: np.ndarray) -> torch.Tensor:
    data = dataset()
    return torch.stack([data[int(i)][0] for i in indices])


def test_stored_parameters_replay_the_teachers_input_bit_for_bit(view_store: Path) -> None:
    store = LogitStore.open(view_store)
    meta = store.meta
    assert meta.format_version == VIEWS_FORMAT_VERSION and meta.views == VIEWS
    assert meta.augmentation is not None and meta.augmentation["seed"] == 7
    params = store.read(VIEW_PARAMS)
    assert params.shape == (300 * VIEWS, 5) and params.dtype == np.float64
    augmentation = from_description(meta.augmentation)
    samples = np.arange(meta.num_rows) // VIEWS
    views = replay(augmentation, _raw_inputs(samples), params)
    # Every row: the replayed view hashes to what the teacher saw ...
    np.testing.assert_array_equal(hash_rows(views), store.sample_hashes())
    # ... the views of a sample differ from each other (on 8x8 images two views can coincide:
    # the same whole-image crop, unflipped) ...
    distinct = [len(set(row)) for row in store.sample_hashes().reshape(300, VIEWS).tolist()]
    assert np.mean(distinct) > VIEWS - 1
    # ... and the stored soft labels are the teacher's on that view (float16 rounding).
    with torch.inference_mode():
        expected = conv_teacher()(views).numpy()
    stored = decode_values(store.read(LOGITS), meta.value_dtype)
    np.testing.assert_allclose(stored, expected, rtol=1e-3, atol=1e-3)


def test_info_and_verify_know_the_views(view_store: Path, in_root: Path) -> None:
    proc = cli("info", str(view_store))
    assert proc.returncode == 0, proc.stderr
    assert "300 x 4 view(s)" in proc.stdout and "crop(size=8" in proc.stdout
    report = verify(str(view_store), dataset=spec("dataset"), progress=False)
    assert report.ok, report.problems
    assert VIEW_PARAMS in report.checked["arrays"]


def test_a_view_that_does_not_replay_is_caught(view_store: Path, tmp_path: Path) -> None:
    # Change one stored crop box: the stored labels no longer belong to the view a student gets.
    group = zarr.open_group(str(view_store), mode="r+")
    params = group[VIEW_PARAMS]
    row = 2 * VIEWS + 1  # sample 2, view 1
    box = params[row]
    box[2] -= 1  # one pixel shorter
    params[row] = box
    report = verify(str(view_store), dataset=spec("dataset"), progress=False)
    assert not report.ok
    assert any("indices 2;" in p for p in report.problems), report.problems
    config = TrainConfig(
        student="tests.helpers.specs:conv_teacher",
        dataset=spec("dataset"),
        store=str(view_store),
        epochs=VIEWS,  # cycle: sample 2 gets view 1 within the first VIEWS epochs
        batch_size=16,
        device="cpu",
        hash_check="all",
        output=str(tmp_path / "run"),
    )
    with pytest.raises(DatasetMismatchError, match="dataset sample 2 does not match"):
        train(config, progress=False)


@pytest.mark.parametrize("policy", ["cycle", "random"])
def test_view_policies_deliver_the_views_they_document(view_store: Path, policy: str) -> None:
    store = LogitStore.open(view_store)
    stream = SoftLabelStream(store, view_policy=policy)
    plan = EpochPlan(num_samples=300, block_rows=store.meta.shard_samples, batch_size=32, seed=3)
    hashes = store.sample_hashes()
    seen: list[tuple[int, int]] = []
    runs = []
    for _ in range(2):  # the same run twice: the same views
        delivered = []
        for epoch in range(VIEWS):
            plan.set_epoch(epoch)
            for soft in stream.batches(plan):
                assert soft.views is not None and soft.view_params is not None
                rows = soft.indices * VIEWS + soft.views
                # Each batch row is the chosen view's row: its hash and parameters.
                np.testing.assert_array_equal(soft.sample_hash, hashes[rows])
                np.testing.assert_array_equal(soft.view_params, store.read(VIEW_PARAMS)[rows])
                delivered.extend(zip(soft.indices.tolist(), soft.views.tolist(), strict=True))
        runs.append(delivered)
    assert runs[0] == runs[1]
    seen = runs[0]
    assert len(seen) == 300 * VIEWS
    if policy == "cycle":  # every view of every sample exactly once in VIEWS epochs
        assert sorted(seen) == [(i, v) for i in range(300) for v in range(VIEWS)]
    else:  # drawn per (seed, epoch, sample): every view occurs, roughly uniformly
        counts = np.bincount([v for _, v in seen], minlength=VIEWS)
        assert counts.min() > 0.15 * len(seen)


def test_offline_training_replays_views_and_resumes(
    view_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TrainConfig(
        student="tests.helpers.specs:conv_teacher",
        dataset=spec("dataset"),
        store=str(view_store),
        epochs=3,
        batch_size=16,
        device="cpu",
        hash_check="all",
        view_policy="random",
        checkpoint_steps=5,
        output=str(tmp_path / "full"),
    )
    full = train(config, progress=False)
    assert len(full.metrics["train_loss"]) == 3
    # The same run, stopped right after its fifth checkpoint (mid-epoch 2), then resumed.
    import softcache.trainer.checkpoint as train_module

    save = train_module.save_checkpoint
    calls = []

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt

    part = dataclasses.replace(config, output=str(tmp_path / "part"))
    with monkeypatch.context() as m:
        m.setattr(train_module, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            train(part, progress=False)
    resumed = train(dataclasses.replace(part, resume=True), progress=False)
    for a, b in zip(
        full.student.state_dict().values(), resumed.student.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_augment_is_refused_for_a_store_with_its_own_views(
    view_store: Path, tmp_path: Path
) -> None:
    config = TrainConfig(
        student="tests.helpers.specs:conv_teacher",
        dataset=spec("dataset"),
        store=str(view_store),
        augment=AUGMENT,
        device="cpu",
        output=str(tmp_path / "run"),
    )
    with pytest.raises(ConfigError, match="drop --augment"):
        train(config, progress=False)


def test_hard_training_draws_new_views_every_epoch(in_root: Path, tmp_path: Path) -> None:
    def run(augment: str | None, name: str) -> dict:
        config = TrainConfig(
            student="tests.helpers.specs:conv_teacher",
            dataset=spec("dataset"),
            mode="hard",
            augment=augment,
            epochs=2,
            batch_size=32,
            device="cpu",
            block_rows=64,
            output=str(tmp_path / name),
        )
        return train(config, progress=False).student.state_dict()

    plain, augmented, again = run(None, "a"), run(AUGMENT, "b"), run(AUGMENT, "c")
    first = next(iter(plain))
    assert not torch.equal(plain[first], augmented[first])  # the views changed the run
    assert all(torch.equal(augmented[k], again[k]) for k in augmented)  # and are reproducible


def test_view_configs_are_checked(tmp_path: Path) -> None:
    base = {"teacher": "t:t", "dataset": "d:d", "output": str(tmp_path / "s")}
    with pytest.raises(ConfigError, match="needs an augmentation"):
        BuildConfig(**base, views=4)
    with pytest.raises(ConfigError, match="multiple of views"):
        BuildConfig(**base, views=3, augment=AUGMENT, shard_rows=64)


def test_stored_views_are_counted_in_bytes_and_rows(view_store: Path, make_store) -> None:
    store = LogitStore.open(view_store)
    plain, _ = make_store("plain.zarr", teacher=spec("conv_teacher"))
    assert store.array(SAMPLE_HASH).shape == (300 * VIEWS,)
    assert store.meta.num_shards == -(-300 * VIEWS // 64)
    assert store.nbytes_stored() > 3 * LogitStore.open(plain).nbytes_stored()
