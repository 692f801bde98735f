"""Test helpers: tiny deterministic teachers and datasets (`tests.helpers.specs:NAME`), and tools to
snapshot, run and compare stores from the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from softcache.store import READABLE_VERSIONS

ROOT = Path(__file__).resolve().parents[2]
NEWER = max(READABLE_VERSIONS) + 1  # a store format version no reader here knows
READABLE = ", ".join(map(str, READABLE_VERSIONS))  # as error messages list them


def build_row_stores(base: Path, kinds: Mapping[str, Mapping[str, Any]]) -> dict[str, Path]:
    """A small row store per kind, `base / NAME.zarr`: `tests.helpers.specs`' teacher and dataset
    (its default size), shards of 64 rows, batches of 24, each kind's build settings on top."""
    import pytest

    from softcache.builder import build
    from softcache.config import BuildConfig

    out: dict[str, Path] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the specs import from the repository root
        mp.delenv("SOFTCACHE_TEST_N", raising=False)
        for name, extra in kinds.items():
            values = {
                "teacher": "tests.helpers.specs:teacher",
                "dataset": "tests.helpers.specs:dataset",
                **extra,
            }
            out[name] = base / f"{name}.zarr"
            config = BuildConfig(
                output=str(out[name]), shard_rows=64, batch_size=24, device="cpu", **values
            )
            build(config, progress=False)
    return out


def build_token_store(path: Path, *args: str) -> Path:
    """`softcache build --lm` of `tests.helpers.token_specs`' ragged dataset with its causal
    teacher into `path` (shards of 16 rows, batches of 3); `args` choose the encoding."""
    subprocess.run(
        [
            sys.executable, "-m", "softcache.cli", "build", "--lm",
            "--teacher", "tests.helpers.token_specs:causal_teacher",
            "--dataset", "tests.helpers.token_specs:ragged_dataset",
            "--shard-rows", "16", "--batch-size", "3", "--device", "cpu", "-q",
            "-o", str(path), *args,
        ],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    return path


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (relative name -> bytes): to prove a refused command changed nothing."""
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def cli(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    executable: Sequence[str] = (sys.executable, "-m", "softcache.cli"),
) -> subprocess.CompletedProcess[str]:
    """Run `python -m softcache.cli ARGS` (or `executable ARGS`) in a subprocess from the repo root."""
    return subprocess.run(
        [*executable, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_popen(args: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start `python -m softcache.cli ARGS` in the background, output to `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "softcache.cli", *args],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def array_names(path: Path) -> list[str]:
    return sorted(zarr.open_group(str(path), mode="r").array_keys())


def assert_same_arrays(a: Path, b: Path) -> None:
    """Every array of store `a` equals store `b`'s: same names, metadata, dtype and bits.

    Float arrays are compared as raw storage bits (so -0.0 vs 0.0 or NaN payloads would count), the
    same test as for integer arrays: identical, not merely close.
    """
    ga = zarr.open_group(str(a), mode="r")
    gb = zarr.open_group(str(b), mode="r")
    names = sorted(ga.array_keys())
    assert names == sorted(gb.array_keys())
    for name in names:
        xa, xb = ga[name], gb[name]
        assert isinstance(xa, zarr.Array) and isinstance(xb, zarr.Array)
        assert xa.metadata.to_dict() == xb.metadata.to_dict(), name
        da, db = xa[...], xb[...]
        assert da.dtype == db.dtype and da.shape == db.shape, name
        bits = np.dtype(f"u{da.dtype.itemsize}")
        assert np.array_equal(da.view(bits), db.view(bits)), f"array {name} differs"


def one_line_error(result: Any, *fragments: str) -> str:
    """Assert a `CliRunner` result is the CLI's one-line `Error:` (exit 1, no traceback) holding
    every fragment; return that line."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
