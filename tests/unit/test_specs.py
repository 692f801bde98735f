"""Tests for softcache.runtime.specs: resolving `module:callable` and `file.py:callable` specs."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

from softcache.errors import ConfigError, SpecError
from softcache.runtime.specs import instantiate, load_callable
from tests.helpers import specs as helper_specs


@pytest.fixture
def isolated_imports(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run in tmp_path with sys.path restored afterwards (load_callable adds the cwd to it)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _module(directory: Path, body: str) -> str:
    """Write a uniquely named module into `directory`; return its name."""
    name = f"spec_mod_{uuid.uuid4().hex[:12]}"
    (directory / f"{name}.py").write_text(body)
    return name


def test_module_spec(in_root: Path) -> None:
    assert load_callable("tests.helpers.specs:teacher") is helper_specs.teacher


def test_module_in_the_current_directory_imports(isolated_imports: Path) -> None:
    name = _module(isolated_imports, "def make():\n    return 41 + 1\n")
    assert instantiate(f"{name}:make", "thing") == 42


def test_file_spec(isolated_imports: Path) -> None:
    sub = isolated_imports / "pipes"
    sub.mkdir()
    (sub / "factories.py").write_text("def make():\n    return 'from a file'\n")
    assert instantiate("pipes/factories.py:make", "thing") == "from a file"
    assert instantiate(f"{sub / 'factories.py'}:make", "thing") == "from a file"  # absolute


@pytest.mark.parametrize("spec", ["teacher", ":teacher", "tests.helpers.specs:", "", ":"])
def test_malformed_spec(spec: str) -> None:
    with pytest.raises(SpecError, match=r"is not of the form 'package\.module:callable'"):
        load_callable(spec)


def test_missing_module(isolated_imports: Path) -> None:
    with pytest.raises(SpecError, match="cannot import module 'no_such_module_xyz'"):
        load_callable("no_such_module_xyz:make")


def test_module_whose_own_import_fails(isolated_imports: Path) -> None:
    name = _module(isolated_imports, "import no_such_dependency_xyz\n")
    with pytest.raises(SpecError, match="no_such_dependency_xyz"):
        load_callable(f"{name}:make")


def test_missing_attribute(in_root: Path) -> None:
    with pytest.raises(SpecError, match="has no attribute 'no_such_factory'"):
        load_callable("tests.helpers.specs:no_such_factory")


def test_not_callable(in_root: Path) -> None:
    with pytest.raises(SpecError, match="'NOT_CALLABLE' is a int, not a callable"):
        load_callable("tests.helpers.specs:NOT_CALLABLE")


def test_missing_file(isolated_imports: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        load_callable("nowhere/factories.py:make")


def test_file_that_raises_on_load(isolated_imports: Path) -> None:
    (isolated_imports / "broken.py").write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(SpecError, match=r"executing .*broken\.py failed: RuntimeError"):
        load_callable("broken.py:make")


@pytest.mark.parametrize(
    "body", ["raise RuntimeError('boom at import')\n", "def broken(:\n"], ids=["raises", "syntax"]
)
def test_module_that_raises_on_import(isolated_imports: Path, body: str) -> None:
    name = _module(isolated_imports, body)
    with pytest.raises(SpecError, match=name):
        load_callable(f"{name}:make")


def test_factory_that_raises_is_wrapped(in_root: Path) -> None:
    with pytest.raises(SpecError) as info:
        instantiate("tests.helpers.specs:raising_factory", "teacher")
    message = str(info.value)
    assert "teacher factory 'tests.helpers.specs:raising_factory' raised RuntimeError" in message
    assert "checkpoint teacher.pt is missing" in message


def test_factory_softcache_errors_pass_through(isolated_imports: Path) -> None:
    name = _module(
        isolated_imports,
        "from softcache.errors import ConfigError\n"
        "def make():\n    raise ConfigError('pass --weights')\n",
    )
    with pytest.raises(ConfigError, match=r"^pass --weights$"):
        instantiate(f"{name}:make", "teacher")


def test_provenance_names_the_distribution_of_an_installed_module_only():
    """An installed package's spec records its distribution, found by name or, when the names
    differ (scikit-learn's `sklearn`), through the environment's file lists; a module of one's
    own project records none, without reading the environment's file lists."""
    import importlib.metadata

    from softcache.runtime.specs import source_of

    numpy_version = importlib.metadata.version("numpy")
    assert source_of("numpy:zeros")["distribution"] == f"numpy {numpy_version}"
    sklearn = source_of("sklearn.datasets:load_digits")
    assert sklearn["distribution"].startswith("scikit-learn ")
    local = source_of("tests.helpers.specs:teacher")
    assert "distribution" not in local and local["sha256"]
