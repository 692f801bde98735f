"""How a per-token store codes its rows: teacher logits in, fixed-width row fields out, and back.

A row is one token's soft label, in one of two encodings (`softcache.store.token_coding` explains both):

- ``topk``: fields ``ids`` (the k kept token ids), ``values`` (their log-probabilities, in id
  order) and ``residual`` (the log of the probability mass left out);
- ``sampled``: fields ``ids`` (the unique ids of ``draws`` draws from the teacher), ``counts``
  (how often each was drawn; 0 marks padding) and ``entropy`` (the teacher's entropy, which makes
  the sampled cross-entropy a KL).

Ids are sorted ascending within a row and coded as Elias-Fano (``ids = "elias_fano"``, the
smallest: 56 B for 32 ids of 2^17 against 68 B bit-packed and 78 B as int32 under zstd) or kept
as plain integers (``ids = "plain"``, readable with nothing but zarr). Values are float16
log-probabilities, or, with ``value_bits``, ``"sqrt"`` codes of ``value_bits`` bits and a
residual in ``residual_bits``-bit ``"log"`` codes (`softcache.store.token_coding.quantize_logprobs`).

The field names here are neutral: only `softcache.store` maps them to array names.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from softcache.errors import ConfigError, StoreFormatError
from softcache.store import token_coding as tk

TOKEN_ENCODINGS = ("topk", "sampled")
ID_CODINGS = ("elias_fano", "plain")
MAX_VOCAB = 1 << 24


@dataclass(frozen=True)
class TokenCodec:
    """The coding of a per-token store's rows (the ``token_codec`` store attribute).

    Attributes:
        encoding: ``topk`` or ``sampled``.
        width: ids per row: k for ``topk``, draws for ``sampled``.
        vocab_size: V, the teacher's vocabulary.
        temperature: the temperature the log-probabilities were taken (and ids drawn) at.
        ids: ``elias_fano`` (bytes per row: `id_bytes`) or ``plain`` (uint16 / int32 per id).
        ef_low_bits: the Elias-Fano low-bit width (`softcache.store.token_coding.elias_fano_low_bits`).
        value_bits: 0 keeps float16 log-probabilities; 1..16 stores ``sqrt`` codes (``topk``).
        residual_bits: bits of the residual's ``log`` code when ``value_bits`` is set.
        log_floor: the lowest log-probability a ``log`` code represents.
        seed: seeds the draws of ``sampled`` (per shard: a rebuilt shard draws the same ids).
    """

    encoding: str
    width: int
    vocab_size: int
    temperature: float = 1.0
    ids: str = "elias_fano"
    ef_low_bits: int = -1
    value_bits: int = 0
    residual_bits: int = 8
    log_floor: float = -16.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.encoding not in TOKEN_ENCODINGS:
            raise ConfigError(
                f"token encoding must be one of {TOKEN_ENCODINGS}, got {self.encoding!r}"
            )
        if self.ids not in ID_CODINGS:
            raise ConfigError(f"id coding must be one of {ID_CODINGS}, got {self.ids!r}")
        if not 2 <= self.vocab_size <= MAX_VOCAB:
            raise ConfigError(f"vocabulary size must be in [2, 2^24], got {self.vocab_size}")
        limit = self.vocab_size if self.encoding == "topk" else 65535
        if not 1 <= self.width <= limit:
            what = "top-k" if self.encoding == "topk" else "draws"
            raise ConfigError(f"{what} must be in [1, {limit}], got {self.width}")
        if not 0 <= self.value_bits <= 16 or not 1 <= self.residual_bits <= 16:
            raise ConfigError(
                f"value_bits must be in [0, 16] and residual_bits in [1, 16], got "
                f"{self.value_bits} and {self.residual_bits}"
            )
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not (math.isfinite(self.log_floor) and self.log_floor < 0):
            raise ConfigError(f"log_floor must be a finite negative number, got {self.log_floor}")
        if self.encoding == "sampled" and self.value_bits:
            raise ConfigError("value_bits applies to topk; sampled stores keep counts, not values")
        if self.ef_low_bits < 0:  # derived, then recorded so readers need not re-derive it
            low = tk.elias_fano_low_bits(self.vocab_size, self.width)
            object.__setattr__(self, "ef_low_bits", low)

    # ---- layout --------------------------------------------------------------------------------

    @property
    def id_bytes(self) -> int:
        """Bytes of a row's Elias-Fano coded ids."""
        return -(-tk.elias_fano_bits(self.vocab_size, self.width, self.ef_low_bits) // 8)

    def field_layout(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-row shape and numpy dtype of each field."""
        if self.ids == "elias_fano":
            ids: tuple[tuple[int, ...], np.dtype] = ((self.id_bytes,), np.dtype(np.uint8))
        else:
            ids = ((self.width,), np.dtype(np.uint16 if self.vocab_size <= 65536 else np.int32))
        if self.encoding == "sampled":
            counts = np.dtype(np.uint8 if self.width <= 255 else np.uint16)
            return {
                "ids": ids,
                "counts": ((self.width,), counts),
                "entropy": ((), np.dtype(np.float16)),
            }
        if self.value_bits:
            return {
                "ids": ids,
                "values": ((self.width,), _code_dtype(self.value_bits)),
                "residual": ((), _code_dtype(self.residual_bits)),
            }
        return {
            "ids": ids,
            "values": ((self.width,), np.dtype(np.float16)),
            "residual": ((), np.dtype(np.float16)),
        }

    def bytes_per_token_raw(self) -> int:
        """Uncompressed bytes of one row."""
        return sum(
            int(np.prod(shape)) * dtype.itemsize for shape, dtype in self.field_layout().values()
        )

    # ---- coding --------------------------------------------------------------------------------

    def encode(
        self, logits: Tensor, *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Code ``(T, V)`` teacher logits into row fields, on the logits' device.

        Returns:
            One tensor per field of `field_layout`, ``T`` rows each, in its storage dtype.
        """
        if logits.ndim != 2 or logits.shape[1] != self.vocab_size:
            raise ValueError(f"expected (T, {self.vocab_size}) logits, got {tuple(logits.shape)}")
        tau = self.temperature
        if self.encoding == "sampled":
            ids, counts = tk.sample_ids(logits, self.width, temperature=tau, generator=generator)
            lengths = (counts.to(torch.int32) > 0).sum(dim=1)  # torch has no uint16 compare
            entropy = tk.teacher_entropy(logits, temperature=tau)
            return {
                "ids": self._encode_ids(ids, lengths),
                "counts": counts,
                "entropy": entropy.to(torch.float16),
            }
        values, indices, residual = tk.topk_residual(logits, self.width, temperature=tau)
        return self._code_topk(values, indices, residual)

    def encode_logprobs(self, ids: Tensor, logprobs: Tensor) -> dict[str, Tensor]:
        """Code rows given as their k most probable ids and log-probabilities (``topk`` only).

        For teachers that return normalised log-probabilities rather than logits (vLLM's prompt
        log-probs, `softcache.runtime.vllm`): the tail is whatever the k entries leave,
        ``residual = log(1 - sum exp(logprobs))`` (`softcache.store.token_coding.residual_of_topk`).
        Such values are at temperature 1, so the codec's must be 1.

        Args:
            ids: ``(T, k)`` integer token ids in ``[0, V)``, distinct within a row, any order.
            logprobs: ``(T, k)`` float log-probabilities of those ids, at temperature 1.

        Returns:
            One tensor per field of `field_layout`, ``T`` rows each, in its storage dtype.
        """
        if self.encoding != "topk":
            raise ValueError(f"given log-probabilities code topk rows, not {self.encoding}")
        if self.temperature != 1.0:
            raise ValueError(
                f"given log-probabilities are at temperature 1; this codec's is {self.temperature}"
            )
        if ids.ndim != 2 or ids.shape != logprobs.shape or ids.shape[1] != self.width:
            raise ValueError(
                f"expected (T, {self.width}) ids and log-probabilities, got "
                f"{tuple(ids.shape)} and {tuple(logprobs.shape)}"
            )
        values = logprobs.float()
        return self._code_topk(values, ids.long(), tk.residual_of_topk(values))

    def _code_topk(self, values: Tensor, indices: Tensor, residual: Tensor) -> dict[str, Tensor]:
        """``(T, k)`` log-probabilities and ids, ``(T,)`` log tail mass -> ``topk`` row fields."""
        values, indices = tk.sort_by_index(values, indices)
        if self.value_bits:
            return {
                "ids": self._encode_ids(indices, None),
                "values": tk.quantize_logprobs(values, self.value_bits, scheme="sqrt"),
                "residual": tk.quantize_logprobs(
                    residual, self.residual_bits, scheme="log", log_floor=self.log_floor
                ),
            }
        return {
            "ids": self._encode_ids(indices, None),
            "values": values.to(torch.float16),
            "residual": residual.to(torch.float16),
        }

    def decode(self, fields: Mapping[str, np.ndarray | Tensor]) -> dict[str, Tensor]:
        """Row fields (as stored) -> the loss's inputs, as torch tensors on the fields' device.

        Returns:
            ``topk``: ``values`` ``(T, k)`` float32 log-probabilities, ``indices`` ``(T, k)``
            int64, ``residual`` ``(T,)`` float32 log tail mass. ``sampled``: ``ids`` ``(T, D)``
            int64, ``counts`` ``(T, D)`` int32, ``entropy`` ``(T,)`` float32.
        """
        f = {name: _tensor(value) for name, value in fields.items()}
        if self.encoding == "sampled":
            counts = f["counts"].to(torch.int32)
            ids = self._decode_ids(f["ids"], (counts > 0).sum(dim=1))
            return {"ids": ids, "counts": counts, "entropy": f["entropy"].float()}
        indices = self._decode_ids(f["ids"], None)
        if self.value_bits:
            values = tk.dequantize_logprobs(f["values"], self.value_bits, scheme="sqrt")
            residual = tk.dequantize_logprobs(
                f["residual"], self.residual_bits, scheme="log", log_floor=self.log_floor
            )
        else:
            values, residual = f["values"].float(), f["residual"].float()
        return {"values": values, "indices": indices, "residual": residual}

    def top1(self, decoded: Mapping[str, Tensor]) -> Tensor:
        """``(T,)`` int64: each row's most probable (``topk``) or most drawn (``sampled``) id."""
        if self.encoding == "sampled":
            best = decoded["counts"].argmax(dim=1, keepdim=True)
            return decoded["ids"].gather(1, best).squeeze(1)
        best = decoded["values"].argmax(dim=1, keepdim=True)
        return decoded["indices"].gather(1, best).squeeze(1)

    def _encode_ids(self, ids: Tensor, lengths: Tensor | None) -> Tensor:
        if self.ids == "plain":
            dtype = torch.int32 if self.vocab_size > 65536 else torch.uint16
            return ids.to(dtype)
        return tk.encode_elias_fano(
            ids, self.vocab_size, lengths=lengths, low_bits=self.ef_low_bits
        )

    def _decode_ids(self, coded: Tensor, lengths: Tensor | None) -> Tensor:
        if self.ids == "plain":
            return coded.to(torch.int64)
        return tk.decode_elias_fano(
            coded, self.vocab_size, self.width, lengths=lengths, low_bits=self.ef_low_bits
        )

    # ---- metadata ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenCodec:
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except (TypeError, ConfigError) as exc:
            raise StoreFormatError(f"malformed token_codec {dict(data)}: {exc}") from exc


def _code_dtype(bits: int) -> np.dtype:
    return np.dtype(np.uint8 if bits <= 8 else np.uint16)


def _tensor(value: np.ndarray | Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if value.dtype == np.uint16:  # torch reads uint16 arrays, but its ops are few: widen
        return torch.from_numpy(value.astype(np.int32))
    return torch.from_numpy(np.ascontiguousarray(value))
