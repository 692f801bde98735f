"""The teacher of a build: loaded from what the config names, and identified by its weights; and
the provenance every store records (teacher, dataset, build settings, softcache version)."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch import nn

from softcache._version import __version__
from softcache.config import BuildConfig
from softcache.errors import SoftcacheError, TeacherOutputError
from softcache.runtime.specs import (
    describe,
    hf_directory,
    is_spec,
    is_vllm_spec,
    load_callable,
    module_from,
    package_versions,
    source_of,
    vllm_directory,
)
from softcache.runtime.vllm import VllmTeacher
from softcache.store.tokenizer import TokenizerIdentity

log = logging.getLogger("softcache")


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_teacher(spec: Any, device: torch.device) -> nn.Module:
    """The teacher a config names (a spec, a factory or a module), in eval mode on `device`.

    A spec or factory that names an `nn.Module` class builds a randomly initialised teacher:
    almost never what a build wants, so it is said.
    """
    if isinstance(spec, type) or (is_spec(spec) and _names_a_class(spec)):
        log.warning(
            "teacher %s is an nn.Module class: it builds a randomly initialised teacher. Name a "
            "factory that loads trained weights (a function returning the module), or pass the "
            "trained module itself",
            describe(spec),
        )
    teacher = module_from(spec, "teacher")
    return teacher.eval().to(device)


def _names_a_class(spec: str) -> bool:
    try:
        return isinstance(load_callable(spec), type)
    except SoftcacheError:
        return False


def teacher_identity(spec: Any, teacher: nn.Module | VllmTeacher) -> dict[str, Any]:
    """What a store records of its teacher: the spec (or what identifies an object), its size
    and the sha256 of its weights (for a vLLM engine, of its checkpoint's tensors, and vLLM's
    version)."""
    if isinstance(teacher, VllmTeacher):
        return {"spec": describe(spec), **teacher.identity()}
    return {
        "spec": describe(spec),
        "num_parameters": sum(p.numel() for p in teacher.parameters()),
        "state_dict_sha256": state_dict_sha256(teacher),
    }


def tokenizer_record(config: BuildConfig, logit_width: int) -> dict[str, Any] | None:
    """The identity of the teacher's tokenizer a token store records, or None without one.

    The tokenizer is `config.tokenizer`'s directory, or else an ``hf:DIR`` or ``vllm:DIR``
    teacher's ``DIR`` when it holds one. A tokenizer with more ids than the teacher has logits is
    refused: it is not this teacher's.
    """
    teacher_dir = (
        vllm_directory(config.teacher)
        if is_vllm_spec(config.teacher)
        else hf_directory(config.teacher)
    )
    directory = config.tokenizer or teacher_dir
    if directory is None:
        log.info(
            "the teacher comes with no tokenizer (pass --tokenizer DIR to record one): the "
            "store records none, and `train` cannot check a student's"
        )
        return None
    from softcache.runtime.hf import load_tokenizer  # imports transformers only when used

    tokenizer = load_tokenizer(directory, required=config.tokenizer is not None)
    if tokenizer is None:
        log.info("%s holds no tokenizer: the store records none", directory)
        return None
    identity = TokenizerIdentity.of(tokenizer, logit_width)
    if identity.ids > logit_width:
        raise TeacherOutputError(
            f"the tokenizer in {directory} has ids up to {identity.ids - 1:,} but the teacher "
            f"returns {logit_width:,} logits per token: it is not this teacher's tokenizer; "
            "give the teacher's own (--tokenizer DIR)"
        )
    log.info(
        "recording the teacher's tokenizer (%s, %s tokens, vocabulary sha256 %s...)",
        identity.cls,
        f"{identity.size:,}",
        identity.vocab_sha256[:12],
    )
    return identity.to_dict()


def provenance(
    config: BuildConfig, teacher: nn.Module | VllmTeacher, num_samples: int
) -> dict[str, Any]:
    """The `StoreMeta` fields every layout fills alike: the shard layout, the teacher's and the
    dataset's identity (the specs as given, and in `provenance` what they resolved to and the
    package versions), the build settings and the softcache version."""
    return {
        "num_samples": num_samples,
        "shard_rows": config.shard_rows,
        "chunk_rows": config.effective_chunk_rows,
        "teacher": teacher_identity(config.teacher, teacher),
        "dataset": {
            "spec": describe(config.dataset),
            "num_samples": num_samples,
            "fingerprint": None,
        },
        "build_config": config.provenance(),
        "softcache_version": __version__,
        "provenance": {
            "teacher": source_of(config.teacher),
            "dataset": source_of(config.dataset),
            "packages": package_versions(),
        },
    }
