"""Hugging Face `transformers` causal LMs as teachers and students (the optional ``hf`` extra).

A model directory is what ``save_pretrained`` writes: a ``config.json`` and, for trained weights,
``model.safetensors`` (or ``pytorch_model.bin``, or sharded files with their index). Nothing is
ever downloaded: loading passes ``local_files_only=True``. Specs name such a directory (see
`softcache.runtime.specs`):

- ``hf:DIR``: the pretrained model in ``DIR`` (a teacher, or a student to fine-tune);
- ``hf-init:DIR``: a fresh, randomly initialised model of ``DIR``'s config (a student trained
  from scratch); ``DIR`` needs only its ``config.json``.

The models return a ``CausalLMOutput`` whose ``logits`` are ``(B, L, V)``, and their ``forward``
takes ``attention_mask``, so `softcache.data.sequences.causal_logits` calls them as they are.

A model directory may also hold the model's tokenizer (``tokenizer.json``, ``tokenizer_config.json``,
...): `load_tokenizer` loads it, for the tokenizer check of token stores
(`softcache.store.tokenizer`) and to save it beside a trained student.

`transformers` is imported only when a model is loaded, so ``import softcache`` and every other
spec work without it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softcache.errors import SpecError

INSTALL_HINT = "pip install 'softcache[hf]'"

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def load_causal_lm(
    path: str | Path, *, pretrained: bool = True, dtype: torch.dtype | str | None = None
) -> nn.Module:
    """Load a causal LM from a local model directory.

    Args:
        path: the directory ``save_pretrained`` wrote (``~`` is expanded; relative to the current
            directory).
        pretrained: load the trained weights (``AutoModelForCausalLM.from_pretrained``); False
            builds a fresh model from the directory's config (``from_config``), randomly
            initialised under torch's current seed.
        dtype: the parameters' dtype: a ``torch.dtype``, ``"float32"``, ``"float16"``,
            ``"bfloat16"``, or ``"auto"`` (the dtype the config records). None means ``"auto"``
            for pretrained weights (as saved: a bfloat16 checkpoint loads in bfloat16) and
            float32 for a fresh model, which is then trained.

    Returns:
        The model (`transformers` puts a pretrained one in eval mode, a fresh one in train mode).

    Raises:
        SpecError: `transformers` is not installed, the directory or its ``config.json`` is
            missing, or `transformers` cannot build a causal LM from it.
    """
    transformers = _import_transformers()
    where = Path(path).expanduser()
    directory = where.resolve()
    kind = "pretrained" if pretrained else "fresh"
    if not directory.is_dir():
        raise SpecError(f"{kind} causal LM: {str(where)!r} is not a directory")
    if not (directory / "config.json").is_file():
        raise SpecError(
            f"{kind} causal LM: {directory} has no config.json; give a directory written by "
            "save_pretrained"
        )
    resolved = _resolve_dtype(dtype, pretrained)
    dtype_kwargs = {} if resolved is None else {_dtype_keyword(transformers): resolved}
    auto = transformers.AutoModelForCausalLM
    try:
        if pretrained:
            model = auto.from_pretrained(str(directory), local_files_only=True, **dtype_kwargs)
        else:
            config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
            model = auto.from_config(config, **dtype_kwargs)
    except Exception as exc:
        hint = ""
        if pretrained and not _has_weights(directory):
            hint = f"; it holds no weights: for a fresh model of its config use 'hf-init:{where}'"
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise SpecError(
            f"cannot load a {kind} causal LM from {directory} with transformers "
            f"{transformers.__version__}: {type(exc).__name__}: {message}{hint}"
        ) from exc
    if not isinstance(model, nn.Module):  # pragma: no cover - transformers returns modules
        raise SpecError(f"transformers returned a {type(model).__name__} for {directory}")
    return model


#: Files of which one marks a directory as holding a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)


def has_tokenizer(path: str | Path) -> bool:
    """Whether a directory holds a tokenizer's files (see `TOKENIZER_FILES`)."""
    directory = Path(path).expanduser()
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: str | Path, *, required: bool = False) -> Any | None:
    """The tokenizer saved in a directory (``AutoTokenizer``, local files only).

    Args:
        path: a directory ``save_pretrained`` wrote (a model's, or a tokenizer's alone).
        required: raise when the directory holds no tokenizer (else return None).

    Raises:
        SpecError: `transformers` is missing, the directory holds no tokenizer (``required``),
            or its tokenizer files do not load.
    """
    directory = Path(path).expanduser()
    if not has_tokenizer(directory):
        if required:
            raise SpecError(
                f"{str(directory)!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                "give the directory the tokenizer's save_pretrained wrote"
            )
        return None
    transformers = _import_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(directory.resolve()), local_files_only=True
        )
    except Exception as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise SpecError(
            f"cannot load the tokenizer in {directory} with transformers "
            f"{transformers.__version__}: {type(exc).__name__}: {message}"
        ) from exc


def _import_transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise SpecError(
            f"Hugging Face models (hf: and hf-init: specs) need the transformers package, which "
            f"does not import here ({exc}); install it with: {INSTALL_HINT}"
        ) from exc


def _resolve_dtype(dtype: torch.dtype | str | None, pretrained: bool) -> torch.dtype | str | None:
    if dtype is None:
        return "auto" if pretrained else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise SpecError(
            f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)} (or a torch.dtype)"
        )
    return _DTYPES[dtype]


def _dtype_keyword(transformers: Any) -> str:
    """``dtype`` from transformers 4.56 on; before, ``torch_dtype`` (now deprecated)."""
    try:
        major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    except ValueError:  # pragma: no cover - a version string without two numbers
        return "dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _has_weights(directory: Path) -> bool:
    patterns = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
    return any(any(directory.glob(pattern)) for pattern in patterns)
