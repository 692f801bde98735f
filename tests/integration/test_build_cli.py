"""`softcache build` through its command line: help, successful builds, the store it writes (read back
with plain zarr and numpy), and a one-line error with a non-zero exit for every bad input."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner, Result

from softcache.builder.teacher import state_dict_sha256
from softcache.cli import main
from softcache.data.hashing import fingerprint, hash_rows
from softcache.store import LogitStore
from tests.helpers import ROOT, assert_same_arrays, cli, snapshot
from tests.helpers import specs as helper_specs

SPECS = "tests.helpers.specs"
SMALL = ["--shard-rows", "64", "--batch-size", "24", "--device", "cpu"]


def _args(
    output: Path, teacher: str = "teacher", dataset: str = "dataset", *extra: str
) -> list[str]:
    return [
        "build",
        "--teacher",
        f"{SPECS}:{teacher}",
        "--dataset",
        f"{SPECS}:{dataset}",
        "--output",
        str(output),
        "-q",
        *SMALL,
        *extra,
    ]


def _invoke(args: list[str]) -> Result:
    return CliRunner().invoke(main, args)


def _assert_one_line_error(result: Result, *fragments: str) -> str:
    """Exit 1, one line `Error: ...` containing every fragment, and no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---- help ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("command", [[], ["build"]], ids=["group", "build"])
def test_help(flag: str, command: list[str]) -> None:
    result = _invoke([*command, flag])
    assert result.exit_code == 0
    assert result.output.startswith("Usage: ")
    if command:
        for option in (
            "--teacher",
            "--dataset",
            "--output",
            "--top-k",
            "--shard-rows",
            "--overwrite",
        ):
            assert option in result.output
    else:
        assert "build" in result.output


# ---- successful builds -----------------------------------------------------------------------


def test_dense_build_json_summary_and_metadata(in_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "dense.zarr"
    result = _invoke([*_args(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["store"] == str(out)
    assert summary["encoding"] == "dense"
    assert summary["samples"] == 300
    assert summary["shards"] == 5 and summary["shards_written"] == 5
    assert summary["shards_resumed"] == 0
    assert summary["bytes_stored"] > 0
    assert summary["bytes_per_sample"] == pytest.approx(summary["bytes_stored"] / 300, abs=0.01)

    meta = LogitStore.open(out).meta
    assert meta.complete and meta.format_version == 1
    assert (meta.encoding, meta.num_classes, meta.k, meta.num_samples) == ("dense", 10, None, 300)
    assert (meta.shard_rows, meta.chunk_rows, meta.value_dtype) == (64, 64, "float16")
    assert meta.teacher == {
        "spec": f"{SPECS}:teacher",
        "num_parameters": 64 * 10 + 10,
        "state_dict_sha256": state_dict_sha256(helper_specs.teacher()),
    }
    assert meta.dataset == {
        "spec": f"{SPECS}:dataset",
        "num_samples": 300,
        "fingerprint": fingerprint(hash_rows(helper_specs.inputs())),
    }
    assert meta.build_config["batch_size"] == 24
    assert "overwrite" not in meta.build_config
    assert "storage_options" not in meta.build_config  # may hold credentials: never recorded
    assert dt.datetime.fromisoformat(meta.created).tzinfo is not None


def test_table_summary(in_root: Path, tmp_path: Path) -> None:
    result = _invoke(_args(tmp_path / "s.zarr", "wide_teacher", "dataset", "--encoding", "topk"))
    assert result.exit_code == 0, result.output
    assert re.search(r"^encoding\s+topk \(k=5\), float16$", result.output, re.M)
    assert re.search(r"^samples\s+300$", result.output, re.M)
    assert re.search(r"^shards\s+5 \(5 written, 0 resumed\)$", result.output, re.M)
    assert "B/sample" in result.output and "samples/s" in result.output


def test_topk_build_with_the_console_script(tmp_path: Path) -> None:
    """A real process through the installed `softcache` entry point (next to this python)."""
    script = Path(sys.executable).parent / "softcache"
    assert script.is_file(), "the softcache console script is not installed next to python"
    out = tmp_path / "topk.zarr"
    proc = cli(
        *_args(out, "wide_teacher", "dataset", "--encoding", "topk", "--top-k", "4", "--json"),
        executable=[str(script)],
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["encoding"] == "topk" and summary["samples"] == 300
    meta = LogitStore.open(out).meta
    assert (meta.num_classes, meta.k, meta.temperatures) == (300, 4, (1.0, 2.0, 4.0))


def test_config_file_and_command_line_precedence(in_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "pipeline.toml"
    config.write_text(
        f'[build]\nteacher = "{SPECS}:teacher"\ndataset = "{SPECS}:dataset"\n'
        f'output = "{tmp_path / "from-file.zarr"}"\nbatch_size = 8\nshard_rows = 32\n'
        'device = "cpu"\n[train]\nepochs = 3\n'
    )
    out = tmp_path / "from-cli.zarr"
    result = _invoke(
        ["build", "--config", str(config), "--output", str(out), "--shard-rows", "100", "-q"]
    )
    assert result.exit_code == 0, result.output
    meta = LogitStore.open(out).meta
    assert meta.shard_rows == 100  # the option wins
    assert meta.build_config["batch_size"] == 8  # the file fills what the options leave out
    assert not (tmp_path / "from-file.zarr").exists()


def test_unlabelled_dataset_builds_the_same_store(in_root: Path, tmp_path: Path) -> None:
    labelled, unlabelled = tmp_path / "a.zarr", tmp_path / "b.zarr"
    assert _invoke(_args(labelled)).exit_code == 0
    result = _invoke(_args(unlabelled, "teacher", "unlabelled_dataset"))
    assert result.exit_code == 0, result.output
    assert_same_arrays(labelled, unlabelled)  # labels are not part of what the teacher sees


def test_workers_and_writer_threads_do_not_change_the_bits(in_root: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    assert _invoke(_args(a, "conv_teacher", "dataset", "--writer-threads", "1")).exit_code == 0
    result = _invoke(
        _args(b, "conv_teacher", "dataset", "--num-workers", "2", "--writer-threads", "3")
    )
    assert result.exit_code == 0, result.output
    assert_same_arrays(a, b)


# ---- the store read with plain zarr and numpy ------------------------------------------------


def _decode(values: np.ndarray, value_dtype: str) -> np.ndarray:
    """What FORMAT.md tells a reader without softcache to do."""
    if value_dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


def _reference(teacher: str, shard_rows: int = 64, batch_size: int = 24) -> torch.Tensor:
    """The teacher's own float32 outputs, in the build's batch composition."""
    model = getattr(helper_specs, teacher)()
    return helper_specs.reference_logits(model, helper_specs.inputs(), shard_rows, batch_size)


@pytest.mark.parametrize("value_dtype", ["float16", "bfloat16", "float32"])
def test_dense_store_read_with_plain_zarr(in_root: Path, tmp_path: Path, value_dtype: str) -> None:
    out = tmp_path / "dense.zarr"
    result = _invoke(_args(out, "conv_teacher", "dataset", "--dtype", value_dtype))
    assert result.exit_code == 0, result.output

    group = zarr.open_group(str(out), mode="r")
    meta = group.attrs["softcache"]
    assert meta["format_version"] == 1 and meta["complete"] is True
    assert meta["value_dtype"] == value_dtype
    assert group["shard_done"][:].tolist() == [1] * 5
    logits = _decode(group["logits"][:], value_dtype)
    assert logits.shape == (300, 10)

    ref = _reference("conv_teacher")
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    # Exactly the teacher's float32 outputs rounded to the stored dtype...
    expected = ref.to(torch_dtype[value_dtype]).float().numpy()
    np.testing.assert_array_equal(logits, expected)
    # ...which is within half an ulp of that dtype of the teacher's own outputs.
    significand = {"float16": 11, "bfloat16": 8, "float32": 24}[value_dtype]
    exact = ref.numpy()
    half_ulp = np.ldexp(np.abs(exact), -significand)
    assert np.all(np.abs(logits - exact) <= half_ulp + 1e-7)

    hashes = group["sample_hash"][:]
    assert hashes.dtype == np.uint64
    np.testing.assert_array_equal(hashes, hash_rows(helper_specs.inputs()))
    assert (
        meta["dataset"]["fingerprint"] == hashlib.sha256(hashes.astype("<u8").tobytes()).hexdigest()
    )


@pytest.mark.parametrize("value_dtype", ["float16", "bfloat16", "float32"])
def test_topk_store_read_with_plain_zarr(in_root: Path, tmp_path: Path, value_dtype: str) -> None:
    out = tmp_path / "topk.zarr"
    args = _args(out, "wide_teacher", "dataset", "--encoding", "topk", "--top-k", "6")
    result = _invoke([*args, "--dtype", value_dtype, "--temperatures", "1,2.5,0.5"])
    assert result.exit_code == 0, result.output

    group = zarr.open_group(str(out), mode="r")
    meta = group.attrs["softcache"]
    assert meta["encoding"] == "topk" and meta["k"] == 6 and meta["num_classes"] == 300
    assert meta["temperatures"] == [1.0, 2.5, 0.5]
    values = _decode(group["topk_values"][:], value_dtype)
    indices = group["topk_indices"][:]
    lse = group["lse"][:]
    assert indices.dtype == np.uint16 and lse.dtype == np.float32
    assert values.shape == indices.shape == (300, 6) and lse.shape == (300, 3)

    ref = _reference("wide_teacher")
    top_values, top_indices = torch.topk(ref, 6, dim=1)
    np.testing.assert_array_equal(indices.astype(np.int64), top_indices.numpy())
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    np.testing.assert_array_equal(values, top_values.to(torch_dtype[value_dtype]).float().numpy())
    for j, t in enumerate(meta["temperatures"]):
        # Exact: the same float32 reduction of the same float32 teacher outputs (bitwise equal here;
        # a build on another device could differ in the last ulps).
        np.testing.assert_array_equal(lse[:, j], torch.logsumexp(ref / t, dim=1).numpy())

    # Probabilities at temperature T with numpy alone: exp(v / T - lse_T); the tail is the rest.
    t = 2.5
    kept = np.exp(values.astype(np.float64) / t - lse[:, 1:2])
    full = torch.softmax(ref.double() / t, dim=1).numpy()
    np.testing.assert_allclose(
        kept,
        np.take_along_axis(full, indices.astype(np.int64), axis=1),
        rtol=2e-2 if value_dtype != "float32" else 1e-5,
    )
    tail = 1.0 - kept.sum(axis=1)
    assert np.all(tail > 0)
    np.testing.assert_array_equal(group["sample_hash"][:], hash_rows(helper_specs.inputs()))


def test_store_reads_without_softcache_importable(built_stores: dict[str, Path]) -> None:
    """A fresh interpreter where `import softcache` fails reads every array with zarr + numpy."""
    script = (
        "import sys; sys.modules['softcache'] = None\n"
        "import json, numpy as np, zarr\n"
        "out = {}\n"
        "for path in sys.argv[1:]:\n"
        "    g = zarr.open_group(path, mode='r')\n"
        "    out[path] = {n: float(np.asarray(g[n][...], dtype=np.float64).sum()) for n in g.array_keys()}\n"
        "print(json.dumps(out))\n"
    )
    paths = [str(built_stores["dense"]), str(built_stores["topk"])]
    proc = subprocess.run(
        [sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    sums = json.loads(proc.stdout)
    for path in paths:
        group = zarr.open_group(path, mode="r")
        assert set(sums[path]) == set(group.array_keys())
        for name, total in sums[path].items():
            assert total == float(np.asarray(group[name][...], dtype=np.float64).sum())
    assert set(sums[paths[1]]) == {
        "topk_values",
        "topk_indices",
        "lse",
        "sample_hash",
        "shard_done",
    }


def _format_md_example() -> str:
    text = (ROOT / "docs" / "FORMAT.md").read_text()
    section = text.split("## Reading with plain zarr", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("encoding", ["dense", "topk"])
def test_the_format_md_example_reads_the_store(
    built_stores: dict[str, Path], encoding: str
) -> None:
    """docs/FORMAT.md's reader, run as written, gives the teacher's probabilities."""
    code = _format_md_example().replace('"teacher.zarr"', repr(str(built_stores[encoding])))
    namespace: dict = {}
    exec(compile(code, "FORMAT.md", "exec"), namespace)
    ref = _reference("teacher")[:64].double()
    np.testing.assert_array_equal(namespace["hashes"], hash_rows(helper_specs.inputs()[:64]))
    p = namespace["p"]
    if encoding == "dense":
        assert p.shape == (64, 10)
        # float16 storage: probabilities agree to the rounding of logits of a few units.
        np.testing.assert_allclose(p, torch.softmax(ref / 2.0, dim=1).numpy(), atol=2e-3)
    else:
        assert p.shape == (64, 5)
        full = torch.softmax(ref / 1.0, dim=1).numpy()
        expected = np.take_along_axis(full, namespace["classes"], axis=1)
        np.testing.assert_allclose(p, expected, rtol=1e-5)  # float32 values: exact but for ulps
        np.testing.assert_allclose(namespace["tail"], 1.0 - expected.sum(axis=1), atol=1e-6)
        assert np.all(namespace["tail"] > 0)


# ---- bad input: one line, non-zero exit, nothing lost ----------------------------------------


BAD_INPUTS = [
    pytest.param(
        ["nosuch_module_xyz:teacher", "dataset"],
        [],
        "cannot import module 'nosuch_module_xyz'",
        id="teacher-spec-does-not-import",
    ),
    pytest.param(
        ["teacher", "nosuch_module_xyz:data"],
        [],
        "cannot import module 'nosuch_module_xyz'",
        id="dataset-spec-does-not-import",
    ),
    pytest.param(
        ["no_such_factory", "dataset"], [], "has no attribute 'no_such_factory'", id="missing-attr"
    ),
    pytest.param(["NOT_CALLABLE", "dataset"], [], "not a callable", id="not-callable"),
    pytest.param(
        ["raising_factory", "dataset"],
        [],
        "raised RuntimeError: checkpoint teacher.pt is missing",
        id="factory-raises",
    ),
    pytest.param(["not_a_module", "dataset"], [], "not an nn.Module", id="teacher-not-a-module"),
    pytest.param(["three_d_teacher", "dataset"], [], "returned (1, 1, 10)", id="teacher-3d"),
    pytest.param(["tuple_teacher", "dataset"], [], "returned tuple", id="teacher-tuple"),
    pytest.param(
        ["teacher", "wrong_shape_dataset"],
        [],
        "the teacher failed on sample 0 (input shape (1, 1, 9, 9))",
        id="dataset-wrong-shape",
    ),
    pytest.param(["teacher", "ragged_dataset"], [], "different shapes", id="dataset-ragged"),
    pytest.param(
        ["teacher", "bare_tensor_dataset"],
        [],
        "expected an (input, label) pair",
        id="items-not-pairs",
    ),
    pytest.param(["teacher", "string_label_dataset"], [], "has label 'cat'", id="string-labels"),
    pytest.param(["teacher", "empty_dataset"], [], "is empty", id="empty-dataset"),
    pytest.param(
        ["teacher", "not_a_dataset"], [], "expected a map-style dataset", id="not-a-dataset"
    ),
    pytest.param(
        ["teacher", "late_bad_item_dataset"],
        [],
        "expected an (input, label) pair",
        id="late-item-not-a-pair",
    ),
    pytest.param(
        ["teacher", "dataset"],
        ["--encoding", "topk", "--top-k", "11"],
        "--top-k 11 exceeds the teacher's 10 classes",
        id="top-k-above-classes",
    ),
    pytest.param(
        ["nan_teacher", "dataset"],
        [],
        f"non-finite logits (NaN or inf) for sample {helper_specs.NAN_SAMPLE} (the first bad sample)",
        id="nan-logits",
    ),
    pytest.param(
        ["nan_teacher", "dataset"],
        ["--encoding", "topk"],
        f"for sample {helper_specs.NAN_SAMPLE} (the first bad sample)",
        id="nan-logits-topk",
    ),
    pytest.param(
        ["overflow_teacher", "dataset"],
        [],
        f"sample {helper_specs.OVERFLOW_SAMPLE}: a logit overflows float16",
        id="float16-overflow",
    ),
    pytest.param(
        ["teacher", "dataset"], ["--batch-size", "0"], "batch_size must be a positive", id="batch-0"
    ),
    pytest.param(
        ["teacher", "dataset"],
        ["--temperatures", "1,-2"],
        "temperatures must be positive",
        id="temps",
    ),
]


@pytest.mark.parametrize(("specs", "extra", "fragment"), BAD_INPUTS)
def test_bad_input_is_one_line(
    in_root: Path, tmp_path: Path, specs: list[str], extra: list[str], fragment: str
) -> None:
    teacher, dataset = (s if ":" in s else f"{SPECS}:{s}" for s in specs)
    args = [
        "build",
        "--teacher",
        teacher,
        "--dataset",
        dataset,
        "--output",
        str(tmp_path / "s.zarr"),
        "-q",
        *SMALL,
        *extra,
    ]
    _assert_one_line_error(_invoke(args), fragment)
    if (tmp_path / "s.zarr").exists():
        assert not zarr.open_group(str(tmp_path / "s.zarr"), mode="r").attrs["softcache"][
            "complete"
        ]


def test_the_overflowing_teacher_builds_in_float32(in_root: Path, tmp_path: Path) -> None:
    result = _invoke(
        _args(tmp_path / "s.zarr", "overflow_teacher", "dataset", "--dtype", "float32")
    )
    assert result.exit_code == 0, result.output
    logits = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["logits"][:]
    assert np.all(logits[helper_specs.OVERFLOW_SAMPLE] == 1e5)


def test_unknown_toml_key(in_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'teacher = "{SPECS}:teacher"\ndataset = "{SPECS}:dataset"\nshard_rowz = 5\n')
    result = _invoke(["build", "--config", str(config), "--output", str(tmp_path / "s.zarr")])
    _assert_one_line_error(result, "unknown key(s) shard_rowz")
    assert not (tmp_path / "s.zarr").exists()


def test_missing_config_file(in_root: Path, tmp_path: Path) -> None:
    result = _invoke(["build", "--config", str(tmp_path / "nope.toml")])
    _assert_one_line_error(result, "does not exist")


def test_bad_option_value_is_a_usage_error(in_root: Path, tmp_path: Path) -> None:
    result = _invoke([*_args(tmp_path / "s.zarr"), "--dtype", "int8"])
    assert result.exit_code == 2
    assert "Invalid value for '--dtype'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_asked_for_without_cuda(in_root: Path, tmp_path: Path) -> None:
    result = _invoke([*_args(tmp_path / "s.zarr"), "--device", "cuda"])
    _assert_one_line_error(result, "sees no CUDA device")


def test_output_under_a_regular_file(in_root: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("precious")
    result = _invoke(_args(blocker / "s.zarr"))
    _assert_one_line_error(result, f"cannot write the store at {blocker / 's.zarr'}")
    assert blocker.read_text() == "precious"


def test_output_is_a_regular_file(in_root: Path, tmp_path: Path) -> None:
    target = tmp_path / "s.zarr"
    target.write_text("precious")
    _assert_one_line_error(_invoke(_args(target)), str(target), "file")
    assert target.read_text() == "precious"


def test_dataset_shape_changing_after_the_first_sample(in_root: Path, tmp_path: Path) -> None:
    result = _invoke(_args(tmp_path / "s.zarr", "teacher", "late_wrong_shape_dataset"))
    # The teacher itself fails on the first batch of (1, 9, 9) inputs: the message names it.
    _assert_one_line_error(result, "the teacher failed", str(helper_specs.MISMATCH_FROM))


def test_bad_item_with_workers_is_one_line_in_a_subprocess(tmp_path: Path) -> None:
    """A real process: the error printed is one line, on stderr, with no traceback; and with
    DataLoader workers (in this process the failed loader's workers take ~5 s to shut down)."""
    args = _args(tmp_path / "s.zarr", "teacher", "late_bad_item_dataset", "--num-workers", "1")
    proc = cli(*args)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: ")
    assert "expected an (input, label) pair" in lines[0]


# ---- existing outputs ------------------------------------------------------------------------


def test_complete_store_is_kept_without_overwrite(in_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    assert _invoke(_args(out)).exit_code == 0
    before = snapshot(out)
    result = _invoke(_args(out))
    _assert_one_line_error(result, "is already a complete store; pass --overwrite")
    assert snapshot(out) == before  # byte for byte

    result = _invoke([*_args(out, "conv_teacher", "dataset"), "--overwrite", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["shards_written"] == 5
    assert LogitStore.open(out).meta.teacher["spec"] == f"{SPECS}:conv_teacher"


def test_partial_store_keeps_its_shards_and_refuses_another_config(
    in_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "s.zarr"
    # The NaN at sample 137 (shard 2) stops the build; shards 0 and 1 are written and kept.
    _assert_one_line_error(_invoke(_args(out, "nan_teacher", "dataset")), "sample 137")
    partial = LogitStore.open(out, require_complete=False)
    assert partial.done_mask().tolist() == [True, True, False, False, False]
    before = snapshot(out)

    # The same command resumes (shards 0-1 skipped) and stops at the same sample again.
    _assert_one_line_error(_invoke(_args(out, "nan_teacher", "dataset")), "sample 137")
    assert snapshot(out) == before

    for extra, fragment in [
        (["--shard-rows", "32"], "shard_rows: stored 64, now 32"),
        (["--dtype", "float32"], "value_dtype: stored 'float16', now 'float32'"),
        (["--batch-size", "8"], "batch_size: stored 24, now 8"),
    ]:
        result = _invoke([*_args(out, "nan_teacher", "dataset"), *extra])
        line = _assert_one_line_error(
            result, "holds a partial build with a different configuration"
        )
        assert fragment in line and "--overwrite" in line
        assert snapshot(out) == before
    result = _invoke(_args(out, "teacher", "dataset"))
    _assert_one_line_error(result, "teacher: stored")
    assert snapshot(out) == before

    result = _invoke([*_args(out, "teacher", "dataset"), "--overwrite", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["shards_resumed"] == 0
    assert LogitStore.open(out).meta.complete


def test_directory_that_is_not_a_store_is_refused_even_with_overwrite(
    in_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mydata"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        result = _invoke([*_args(out), *extra])
        _assert_one_line_error(result, "exists and is not a softcache store")
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_empty_directory_is_used(in_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert _invoke(_args(out)).exit_code == 0
    assert LogitStore.open(out).meta.complete


def test_foreign_zarr_group_is_refused_even_with_overwrite(in_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "user.zarr"
    zarr.open_group(str(out), mode="w").create_array("images", shape=(4,), dtype="i4")[:] = 7
    before = snapshot(out)
    result = _invoke([*_args(out), "--overwrite"])
    assert (snapshot(out) if out.exists() else {}) == before
    _assert_one_line_error(result, "not a softcache store")


def test_interrupted_build_exits_130(in_root: Path, tmp_path: Path, monkeypatch) -> None:
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("softcache.builder.build", interrupt)
    result = _invoke(_args(tmp_path / "s.zarr"))
    assert result.exit_code == 130
    assert "run the same command again to resume" in result.output


def test_relative_spec_and_output_from_the_current_directory(tmp_path: Path, monkeypatch) -> None:
    """Specs import from the current directory (a file.py spec too); outputs are relative to it."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "tests" / "helpers" / "specs.py", tmp_path / "my_factories.py")
    result = _invoke(
        [
            "build",
            "--teacher",
            "my_factories.py:teacher",
            "--dataset",
            "my_factories:dataset",
            "--output",
            "rel.zarr",
            "-q",
            *SMALL,
        ]
    )
    assert result.exit_code == 0, result.output
    assert LogitStore.open(tmp_path / "rel.zarr").meta.num_samples == 300
    assert os.path.isdir(tmp_path / "rel.zarr")
