"""Tests for softcache.config: TOML loading, overrides, type coercion and validation of BuildConfig."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from softcache.config import BuildConfig, config_from_mapping, load_config
from softcache.errors import ConfigError

REQUIRED = {"teacher": "m:t", "dataset": "m:d", "output": "out.zarr"}


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    config = BuildConfig(**REQUIRED)
    assert config.encoding == "dense" and config.dtype == "float16"
    assert config.temperatures == (1.0, 2.0, 4.0)
    assert config.shard_rows == 4096 and config.effective_chunk_rows == 1024
    assert config.overwrite is False


def test_top_level_toml(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        'teacher = "a:b"\ndataset = "c:d"\noutput = "o.zarr"\n'
        'encoding = "topk"\ntop_k = 3\ntemperatures = [1, 3]\nchunk_rows = 8\nshard_rows = 32\n',
    )
    config = load_config(BuildConfig, path, {}, section="build")
    assert config.teacher == "a:b" and config.encoding == "topk" and config.top_k == 3
    assert config.temperatures == (1.0, 3.0)
    assert all(isinstance(t, float) for t in config.temperatures)
    assert config.chunk_rows == 8 and config.effective_chunk_rows == 8


def test_build_section_is_read_and_other_sections_left_alone(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        '[build]\nteacher = "a:b"\ndataset = "c:d"\noutput = "o.zarr"\nbatch_size = 8\n'
        '[train]\nstudent = "s:t"\nsome_train_only_key = 1\n',
    )
    config = load_config(BuildConfig, path, {}, section="build")
    assert config.batch_size == 8 and config.teacher == "a:b"


def test_keys_outside_the_tables_are_an_error(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'stray = 1\n[build]\nteacher = "a:b"\n')
    with pytest.raises(ConfigError, match="stray sit outside"):
        load_config(BuildConfig, path, {}, section="build")


@pytest.mark.parametrize("where", ["top", "section"])
def test_unknown_key_is_an_error_naming_it(tmp_path: Path, where: str) -> None:
    body = 'teacher = "a:b"\ndataset = "c:d"\noutput = "o"\nbatch_sise = 8\n'
    path = _toml(tmp_path, body if where == "top" else "[build]\n" + body)
    with pytest.raises(ConfigError) as info:
        load_config(BuildConfig, path, {}, section="build")
    message = str(info.value)
    assert "unknown key(s) batch_sise" in message
    assert "batch_size" in message  # the known keys are listed, so the typo is easy to spot
    assert str(path) in message


def test_unknown_override_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown key.*colour"):
        load_config(BuildConfig, None, {**REQUIRED, "colour": "red"}, section="build")


def test_command_line_wins_over_file_and_file_over_defaults(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        'teacher = "a:b"\ndataset = "c:d"\noutput = "file.zarr"\nbatch_size = 8\nshard_rows = 64\n',
    )
    overrides = {"batch_size": 16, "output": "cli.zarr", "shard_rows": None, "dtype": None}
    config = load_config(BuildConfig, path, overrides, section="build")
    assert config.batch_size == 16  # option beats file
    assert config.output == "cli.zarr"
    assert config.shard_rows == 64  # None means "not given": the file's value stays
    assert config.dtype == "float16"  # neither given: the default


def test_temperatures_from_the_command_line() -> None:
    config = load_config(BuildConfig, None, {**REQUIRED, "temperatures": "1, 2.5,4"}, "build")
    assert config.temperatures == (1.0, 2.5, 4.0)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("batch_size", "many", "batch_size = 'many' is not a valid"),
        ("batch_size", 1.5, "batch_size = 1.5 is not a valid"),
        ("batch_size", True, "batch_size = True is not a valid"),
        ("amp", "yes", "amp = 'yes' is not a valid"),
        ("overwrite", 1, "overwrite = 1 is not a valid"),
        ("temperatures", "1,hot", "temperatures = '1,hot' is not a valid"),
        ("temperatures", 2.0, "temperatures = 2.0 is not a valid"),
    ],
)
def test_type_errors_name_the_key(key: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(BuildConfig, {**REQUIRED, key: value}, source="x.toml")
    assert fragment in str(info.value)
    assert str(info.value).startswith("x.toml: ")


def test_optional_int_accepts_none_and_ints() -> None:
    assert (
        config_from_mapping(BuildConfig, {**REQUIRED, "chunk_rows": None}, source="s").chunk_rows
        is None
    )
    assert (
        config_from_mapping(BuildConfig, {**REQUIRED, "chunk_rows": 16}, source="s").chunk_rows
        == 16
    )


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"encoding": "sparse"}, "encoding must be one of dense, topk, sampled, got 'sparse'"),
        ({"dtype": "int8"}, "dtype must be one of float16, bfloat16, float32"),
        ({"top_k": 0}, "top_k must be a positive integer, got 0"),
        ({"batch_size": -1}, "batch_size must be a positive integer"),
        ({"shard_rows": 0}, "shard_rows must be a positive integer"),
        ({"writer_threads": 0}, "writer_threads must be a positive integer"),
        ({"num_workers": -1}, "num_workers must be >= 0"),
        ({"chunk_rows": 0}, "chunk_rows must be a positive integer"),
        ({"shard_rows": 100, "chunk_rows": 30}, "must be a multiple of chunk_rows"),
        ({"temperatures": ()}, "temperatures must be positive"),
        ({"temperatures": (1.0, -2.0)}, "temperatures must be positive"),
        ({"compression_level": 0}, "compression_level must be in 1..22"),
        ({"compression_level": 23}, "compression_level must be in 1..22"),
        ({"teacher": ""}, "teacher is required"),
    ],
)
def test_validation(changes: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        BuildConfig(**{**REQUIRED, **changes})
    assert fragment in str(info.value)


def test_missing_required_settings_are_named() -> None:
    with pytest.raises(ConfigError, match=r"missing required setting\(s\): dataset, output"):
        load_config(BuildConfig, None, {"teacher": "a:b"}, section="build")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(BuildConfig, tmp_path / "nope.toml", REQUIRED, section="build")


def test_invalid_toml(tmp_path: Path) -> None:
    path = _toml(tmp_path, "teacher = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(BuildConfig, path, {}, section="build")


@pytest.mark.parametrize(
    ("shard_rows", "chunk"), [(4096, 1024), (512, 512), (100, 100), (1500, 750), (3000, 1000)]
)
def test_default_chunk_rows_is_the_largest_divisor_up_to_1024(shard_rows: int, chunk: int) -> None:
    config = BuildConfig(**REQUIRED, shard_rows=shard_rows)
    assert config.effective_chunk_rows == chunk
    assert shard_rows % config.effective_chunk_rows == 0


def test_to_dict_is_plain_json() -> None:
    config = BuildConfig(**REQUIRED, encoding="topk", temperatures=(1.0, 2.0))
    data = json.loads(json.dumps(config.to_dict()))
    assert data["temperatures"] == [1.0, 2.0]
    assert config_from_mapping(BuildConfig, data, source="stored") == config


def test_config_is_frozen() -> None:
    config = BuildConfig(**REQUIRED)
    with pytest.raises(AttributeError):
        config.batch_size = 3  # type: ignore[misc]
