"""Shared fixtures: the repository root as working directory, and tiny stores built in tmp_path.

Stores are built through the library (`softcache.builder.build`), from the deterministic factories in
`tests/helpers/specs.py`; specs resolve from the current directory, so the fixtures run from the
repository root.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from softcache.builder import BuildResult, build
from softcache.config import BuildConfig

# CI (`CI=true bash .ci/run`) draws hypothesis examples from a fixed seed, so a landing never hangs
# on a rare draw that no change made; local runs keep exploring new examples (and the seed that
# fails is printed). Loaded here, before the test modules build their `settings(...)` objects.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# The CLI processes the tests start turn the batch process's fallback warning into an error too
# (pyproject.toml's `filterwarnings` covers this process).
os.environ["PYTHONWARNINGS"] = "error:making batches on a thread:RuntimeWarning"

ROOT = Path(__file__).resolve().parents[1]
SPECS = "tests.helpers.specs"

# Small, fast defaults: 300 samples in shards of 64 rows (5 shards, the last one short), batches of
# 24 so shards hold several batches and the last batch of each shard is short.
SMALL = {"shard_rows": 64, "batch_size": 24, "device": "cpu"}


def spec(name: str) -> str:
    """`tests.helpers.specs:NAME`."""
    return f"{SPECS}:{name}"


@pytest.fixture(autouse=True)
def _small_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with the helper factories' default sizes."""
    monkeypatch.delenv("SOFTCACHE_TEST_N", raising=False)
    monkeypatch.delenv("SOFTCACHE_TEST_SLEEP", raising=False)


@pytest.fixture
def in_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test from the repository root, where `tests.helpers.specs:...` specs import."""
    monkeypatch.chdir(ROOT)
    return ROOT


@pytest.fixture
def make_store(in_root: Path, tmp_path: Path) -> Callable[..., tuple[Path, BuildResult]]:
    """Build a store under tmp_path; keyword arguments override the small defaults."""
    counter = iter(range(1_000_000))

    def make(name: str | None = None, **overrides: Any) -> tuple[Path, BuildResult]:
        values: dict[str, Any] = {
            "teacher": spec("teacher"),
            "dataset": spec("dataset"),
            **SMALL,
            **overrides,
        }
        values.setdefault("output", str(tmp_path / (name or f"store{next(counter)}.zarr")))
        result = build(BuildConfig(**values), progress=False)
        return Path(values["output"]), result

    return make


@pytest.fixture(scope="session")
def built_stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Read-only stores shared by a session: `dense` (float16) and `topk` (k=5, float32, T=1,2,4).

    Tests must not modify them; use `make_store` for a store of their own.
    """
    base = tmp_path_factory.mktemp("stores")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        mp.delenv("SOFTCACHE_TEST_N", raising=False)
        stores = {}
        for name, extra in {
            "dense": {},
            "topk": {"encoding": "topk", "top_k": 5, "dtype": "float32"},
        }.items():
            out = base / f"{name}.zarr"
            build(
                BuildConfig(
                    teacher=spec("teacher"),
                    dataset=spec("dataset"),
                    output=str(out),
                    **SMALL,
                    **extra,
                ),
                progress=False,
            )
            stores[name] = out
    yield stores
