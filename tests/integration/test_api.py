"""The Python API as a notebook user meets it: `softcache.build` / `softcache.train` called as often
as one likes, either layout through one entry point, objects instead of spec strings, configs that
refuse settings of the other layout by name, and the README's own-loop example on a store with
views."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import softcache
from softcache.cli import main
from softcache.config import BuildConfig, TrainConfig, load_config
from softcache.errors import ConfigError, SpecError
from softcache.trainer.checkpoint import STUDENT_WEIGHTS
from tests.conftest import SMALL, spec
from tests.helpers import ROOT, assert_same_arrays
from tests.helpers import specs as hs
from tests.helpers import token_specs as ts

TOKENS = "tests.helpers.token_specs"


def _build(out: Path, **overrides) -> softcache.BuildResult:
    values = {"teacher": spec("teacher"), "dataset": spec("dataset"), **SMALL, **overrides}
    return softcache.build(BuildConfig(output=str(out), **values), progress=False)


def _train(out: Path, store: Path, **overrides) -> softcache.TrainResult:
    values = {
        "student": spec("teacher"),
        "dataset": spec("dataset"),
        "store": str(store),
        "epochs": 1,
        "device": "cpu",
        "output": str(out),
        **overrides,
    }
    return softcache.train(TrainConfig(**values), progress=False)


def test_build_and_train_run_twice_in_one_process(in_root: Path, tmp_path: Path) -> None:
    """`softcache.build` used to be rebound to the module `softcache.build` by its first call."""
    first = _build(tmp_path / "a.zarr")
    second = _build(tmp_path / "b.zarr")
    assert callable(softcache.build) and callable(softcache.train)
    assert first.num_samples == second.num_samples == hs.num_samples()
    assert_same_arrays(tmp_path / "a.zarr", tmp_path / "b.zarr")
    one = _train(tmp_path / "r1", tmp_path / "a.zarr")
    two = _train(tmp_path / "r2", tmp_path / "a.zarr")
    assert one.metrics["train_loss"] == two.metrics["train_loss"]


def test_an_lm_build_config_through_the_python_api_builds_a_token_store(
    in_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "lm.zarr"
    config = BuildConfig(
        teacher=f"{TOKENS}:causal_teacher",
        dataset=f"{TOKENS}:ragged_dataset",
        output=str(out),
        lm=True,
        encoding="topk",
        top_k=4,
        shard_rows=16,
        batch_size=3,
        device="cpu",
    )
    result = softcache.build(config, progress=False)
    store = softcache.open_store(str(out))
    assert store.meta.tokens and store.meta.num_tokens == int(ts.lengths().sum())
    assert result.num_samples == ts.NUM_SEQUENCES
    # The CLI writes the same store.
    cli = CliRunner().invoke(
        main,
        [
            "build", "--lm", "--teacher", f"{TOKENS}:causal_teacher", "--dataset",
            f"{TOKENS}:ragged_dataset", "-o", str(tmp_path / "cli.zarr"), "--encoding", "topk",
            "--top-k", "4", "--shard-rows", "16", "--batch-size", "3", "--device", "cpu", "-q",
        ],
    )  # fmt: skip
    assert cli.exit_code == 0, cli.output
    assert_same_arrays(out, tmp_path / "cli.zarr")


@pytest.mark.parametrize(
    ("cls", "values", "field"),
    [
        (BuildConfig, {"lm": True, "encoding": "topk", "views": 4, "augment": "flip"}, "views"),
        (BuildConfig, {"lm": True, "encoding": "topk", "dtype": "float32"}, "dtype"),
        (BuildConfig, {"draws": 7}, "draws"),
        (BuildConfig, {"value_bits": 3}, "value_bits"),
        (TrainConfig, {"lm": True, "augment": "flip"}, "augment"),
        (TrainConfig, {"lm": True, "view_policy": "random"}, "view_policy"),
    ],
)
def test_a_field_of_the_other_layout_is_refused_by_name(
    cls: type, values: dict, field: str, tmp_path: Path
) -> None:
    base = (
        {"teacher": "a:b", "dataset": "a:b", "output": "o"}
        if cls is BuildConfig
        else {"student": "a:b", "dataset": "a:b", "mode": "hard"}
    )
    with pytest.raises(ConfigError, match=rf"^{field} (applies to|does not apply)"):
        cls(**base, **values)
    # From TOML, even at the field's default value: the key itself is out of place.
    default = cls.__dataclass_fields__[field].default
    given = values[field] if default is None else default  # TOML has no null
    toml = tmp_path / "c.toml"
    lines = [f"{k} = {json.dumps(v)}" for k, v in {**base, **values, field: given}.items()]
    toml.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=rf"{toml}: {field} "):
        load_config(cls, toml, {}, section="build")


def test_the_cli_names_a_foreign_option(in_root: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["build", "--lm", "--teacher", "a:b", "--dataset", "a:b", "-o", str(tmp_path / "x"),
         "--encoding", "topk", "--views", "2"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "views does not apply to language-model (--lm) runs" in result.output
    result = CliRunner().invoke(
        main, ["train", "--student", "a:b", "--dataset", "a:b", "--mode", "hard", "--draws", "3"]
    )
    assert (
        result.exit_code == 2 and "No such option" in result.output and "--draws" in result.output
    )


def test_cli_defaults_and_help_come_from_the_config(in_root: Path) -> None:
    """One source: every config default appears in the option's help."""
    build_help = CliRunner().invoke(main, ["build", "--help"]).output
    train_help = CliRunner().invoke(main, ["train", "--help"]).output
    assert "[default: 4096]" in build_help and "--compression-level" in build_help
    assert f"[default: {TrainConfig.__dataclass_fields__['epochs'].default}]" in train_help
    assert "--overwrite" in train_help


def test_build_and_train_from_objects(in_root: Path, tmp_path: Path, caplog) -> None:
    """A notebook user passes the objects themselves: a trained module and a dataset object for
    the build, a factory for the student. The store records what identifies them."""
    teacher = hs.teacher()
    dataset = hs.dataset()
    out = tmp_path / "objects.zarr"
    softcache.build(
        BuildConfig(teacher=teacher, dataset=dataset, output=str(out), **SMALL), progress=False
    )
    by_spec = tmp_path / "specs.zarr"
    _build(by_spec)
    assert_same_arrays(out, by_spec)  # the same bits as from the specs
    meta = softcache.open_store(str(out)).meta
    assert meta.teacher["spec"] == "<tests.helpers.specs.Linear object>"
    assert (
        meta.teacher["state_dict_sha256"]
        == softcache.open_store(str(by_spec)).meta.teacher["state_dict_sha256"]
    )
    assert meta.dataset["spec"] == "<tests.helpers.specs.Synthetic object>"
    run = softcache.train(
        TrainConfig(
            student=hs.conv_teacher,  # a factory: a fresh student, seeded
            dataset=dataset,
            store=str(out),
            epochs=1,
            device="cpu",
            output=str(tmp_path / "run"),
        ),
        progress=False,
    )
    assert run.metrics["config"]["student"] == "tests.helpers.specs:conv_teacher"
    weights = torch.load(tmp_path / "run" / STUDENT_WEIGHTS, weights_only=True)
    assert weights.keys() == run.student.state_dict().keys()
    for name, tensor in run.student.state_dict().items():
        assert torch.equal(weights[name], tensor)
    # A cluster rebuilds what the config names: objects are refused with the reason.
    with pytest.raises(ConfigError, match="needs importable specs for teacher and dataset"):
        softcache.build(
            BuildConfig(teacher=teacher, dataset=dataset, output=str(tmp_path / "c"), workers=1),
            progress=False,
        )


def test_a_teacher_spec_naming_a_class_is_warned_about(
    in_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="softcache"):
        _build(tmp_path / "cls.zarr", teacher="tests.helpers.specs:Linear")
    assert "randomly initialised teacher" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="softcache"):
        _build(tmp_path / "fn.zarr")
    assert "randomly initialised" not in caplog.text


def test_a_factory_that_gives_no_module_is_refused(in_root: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"not an nn\.Module"):
        _build(tmp_path / "x.zarr", teacher=hs.not_a_module)


def test_train_refuses_to_overwrite_a_run(in_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    _build(store)
    _train(tmp_path / "run", store)
    before = (tmp_path / "run" / "metrics.json").read_bytes()
    with pytest.raises(ConfigError, match="already holds a training run"):
        _train(tmp_path / "run", store, epochs=2)
    assert (tmp_path / "run" / "metrics.json").read_bytes() == before
    again = _train(tmp_path / "run", store, epochs=2, overwrite=True)
    assert len(again.metrics["epoch"]) == 2


def test_the_readme_own_loop_example_runs_on_a_store_with_views(
    in_root: Path, tmp_path: Path
) -> None:
    """The README's snippet, as written there, on a store of 4 views per sample (whose
    `shard_rows` is 4x its samples per shard), twice through the re-iterable loader too."""
    store_path = tmp_path / "views.zarr"
    _build(
        store_path, teacher=spec("conv_teacher"), views=4, augment="crop(size=8,scale=0.4:1);flip"
    )
    readme = (ROOT / "README.md").read_text()
    start = readme.index('store = softcache.open_store("data/digits/teacher.zarr")')
    snippet = readme[start : readme.index("```", start)].replace("        ...\n", "")
    snippet = snippet.replace("data/digits/teacher.zarr", str(store_path))
    student = hs.conv_teacher().train()
    losses: list[float] = []
    namespace = {
        "softcache": softcache,
        "dataset": hs.dataset(),
        "student": lambda x: student(x),
        "epochs": 2,
    }
    exec(
        snippet + "\n        losses.append(float(loss.detach()))\n", {**namespace, "losses": losses}
    )
    store = softcache.open_store(str(store_path))
    assert store.meta.views == 4 and store.meta.shard_samples * 4 == store.meta.shard_rows
    plan_steps = -(-hs.num_samples() // 64)
    assert len(losses) == 2 * plan_steps and all(np.isfinite(losses))
    # The re-iterable form: each iter() is the next epoch, and the epochs' orders differ.
    plan = softcache.EpochPlan(
        num_samples=hs.num_samples(), block_rows=store.meta.shard_samples, batch_size=64, seed=0
    )
    loader = softcache.AlignedBatches(hs.dataset(), store).loader(plan)
    orders = [np.concatenate([soft.indices for _, _, soft in loader]) for _ in range(2)]
    assert len(loader) == plan_steps
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(hs.num_samples()))
    assert not np.array_equal(orders[0], orders[1])


def test_import_and_help_do_not_load_torch() -> None:
    code = (
        "import sys, softcache, softcache.cli;"
        "print(sorted(m for m in ('torch', 'dask', 'zarr') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
    help_run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "softcache.cli", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Usage" in help_run.stdout
    assert "| torch" not in help_run.stderr and "| dask" not in help_run.stderr


def test_every_command_is_on_the_cli() -> None:
    """A command whose decorators go missing (a merge, a refactor) disappears without an error."""
    names = set(main.commands)
    expected = {"build", "train", "info", "verify", "ls", "merge", "fidelity", "plot"}
    expected |= {"publish", "versions", "export", "export-axolotl"}
    assert expected <= names, expected - names
    for name in sorted(expected):
        assert CliRunner().invoke(main, [name, "--help"]).exit_code == 0, name


@pytest.mark.parametrize("form", ["dense", "sparse"])
@pytest.mark.parametrize("kind", ["dense", "topk"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
def test_the_trainers_prepared_targets_give_the_loss_of_the_raw_soft_labels(
    built_stores, in_root, tmp_path, kind, temperature, form, monkeypatch
):
    """For a CPU student the trainer's batch thread hands the step the teacher's side of the loss
    (`losses.kd_loss_targets`); it must be the loss `distillation_loss` computes from the same
    batch's soft labels, value and gradient, in both forms of top-k targets, the top-k store's
    missing temperature (3.0: the renormalised fallback) included."""
    import softcache.losses.targets as targets_module
    from softcache.losses import TeacherTargets
    from softcache.trainer.ddp import Ranks
    from softcache.trainer.rows import RowLayout

    if form == "sparse":
        if kind == "dense":
            pytest.skip("dense targets have one form")
        monkeypatch.setattr(targets_module, "DENSE_TOPK_ELEMENTS", 0)

    store = softcache.open_store(built_stores[kind])
    config = TrainConfig(
        student=spec("teacher"), dataset=spec("dataset"), store=str(built_stores[kind]),
        mode="offline", temperature=temperature, alpha=0.25, batch_size=24,
        output=str(tmp_path / "run"),
    )  # fmt: skip
    layout = RowLayout(config, Ranks(), torch.device("cpu"), None)
    plan = softcache.EpochPlan(
        num_samples=store.meta.num_samples, block_rows=store.meta.shard_samples, batch_size=24,
        seed=0,
    )  # fmt: skip
    prepared = list(layout.batches(plan, len(plan), hash_stride=1, then=None))[:3]
    aligned = softcache.AlignedBatches(softcache.runtime.specs.dataset_from(spec("dataset")), store)
    raw = list(aligned.epoch(plan))[: len(prepared)]
    torch.manual_seed(0)
    student = softcache.runtime.specs.instantiate(spec("teacher"), "student")
    for (inputs, labels, targets, _), (inputs_raw, labels_raw, soft) in zip(
        prepared, raw, strict=True
    ):
        fallback = kind == "topk" and temperature not in store.meta.temperatures
        assert isinstance(targets, TeacherTargets) != fallback
        if not fallback:
            assert (targets.ids is not None) == (form == "sparse")
        assert torch.equal(inputs, inputs_raw) and torch.equal(labels, labels_raw)
        got = layout.loss(student, (inputs, labels, targets, None), None)[0]
        (g_got,) = torch.autograd.grad(got, list(student.parameters())[-1])
        want = softcache.distillation_loss(
            student(inputs_raw), soft, labels_raw, temperatures=store.meta.temperatures,
            temperature=temperature, alpha=0.25,
        )  # fmt: skip
        (g_want,) = torch.autograd.grad(want, list(student.parameters())[-1])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("assemble_ahead", [2, 0])
def test_an_own_loop_epoch_left_early_stops_its_threads(
    built_stores: dict[str, Path], assemble_ahead: int, in_root: Path
) -> None:
    # The store's 5 shards are read in two groups: leaving after the first batch leaves the
    # second unread. The stream's reader stopped first once left the assembling thread waiting
    # for that group for ever (and the loop waited 5 s for it, twice).
    store = softcache.open_store(str(built_stores["dense"]))
    plan = softcache.EpochPlan(
        num_samples=hs.num_samples(), block_rows=store.meta.shard_samples, batch_size=24, seed=1
    )
    aligned = softcache.AlignedBatches(hs.dataset(), store, assemble_ahead=assemble_ahead)
    # A whole epoch first: it starts the store's decoding pool, which lives on.
    assert sum(1 for _ in aligned.epoch(plan)) == aligned.steps(plan)
    before = set(threading.enumerate())
    for _ in range(2):
        with contextlib.closing(aligned.epoch(plan)) as batches:
            next(batches)
    assert [t.name for t in set(threading.enumerate()) - before] == []
    # ... and the next epoch is whole.
    assert sum(1 for _ in aligned.epoch(plan)) == aligned.steps(plan)


@pytest.mark.parametrize("kind", ["dense", "topk"])
def test_a_tensor_dataset_fetched_whole_is_checked_and_batched_as_item_by_item(
    built_stores: dict[str, Path], kind: str, in_root: Path
) -> None:
    """A torch `TensorDataset` is fetched a batch at a time (`softcache.data.fetch`): the store,
    built from the same rows item by item, checks every one of its rows, the batches are the
    item-by-item ones, and a dataset with two rows swapped is refused by name."""
    from torch.utils.data import TensorDataset

    from softcache.errors import DatasetMismatchError

    store = softcache.open_store(str(built_stores[kind]))
    plan = softcache.EpochPlan(
        num_samples=hs.num_samples(), block_rows=store.meta.shard_samples, batch_size=24, seed=3
    )
    whole = TensorDataset(hs.inputs(), hs.labels())
    fetched = list(softcache.AlignedBatches(whole, store, hash_stride=1).epoch(plan))
    items = list(softcache.AlignedBatches(hs.dataset(), store, hash_stride=1).epoch(plan))
    assert len(fetched) == len(items) == len(plan)
    for (x, y, soft), (x_items, y_items, soft_items) in zip(fetched, items, strict=True):
        assert torch.equal(x, x_items) and torch.equal(y, y_items)
        assert np.array_equal(soft.indices, soft_items.indices)
    swapped = hs.inputs()
    swapped[[4, 9]] = swapped[[9, 4]]
    aligned = softcache.AlignedBatches(TensorDataset(swapped, hs.labels()), store, hash_stride=1)
    with pytest.raises(DatasetMismatchError, match=r"sample [49] "):
        for _ in aligned.epoch(plan):
            pass


@pytest.mark.parametrize(
    ("kind", "mode", "warms"),
    [("topk", "offline", True), ("dense", "offline", False), ("topk", "hard", False)],
)
def test_the_row_layout_warms_the_top_k_kernel_up_only_for_steps_that_call_it(
    built_stores, in_root, tmp_path, kind, mode, warms
):
    """An offline top-k CPU run loads the compiled kernel on a thread while its batch process
    starts (`RowLayout.warm_up`), and `close` waits for it; other runs start nothing."""
    from softcache.losses import topk_kernel
    from softcache.trainer.ddp import Ranks
    from softcache.trainer.rows import RowLayout

    config = TrainConfig(
        student=spec("teacher"), dataset=spec("dataset"), store=str(built_stores[kind]),
        mode=mode, batch_size=24, output=str(tmp_path / "run"),
    )  # fmt: skip
    kernel_runs = topk_kernel.available()  # asked first: the thread's lookup would settle it
    layout = RowLayout(config, Ranks(), torch.device("cpu"), None)
    layout.warm_up()
    thread = layout._warming
    assert (thread is not None) == (warms and kernel_runs)
    layout.close()
    assert layout._warming is None and (thread is None or not thread.is_alive())
