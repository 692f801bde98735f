"""Encoders: teacher logits (B, C) -> the arrays a store keeps, computed on the teacher's device.

Encoding runs where the logits are (the GPU in a real build) so only the small result crosses to the
host: for top-k at k = 5 of 1000 classes that is 1 % of the dense row. Values are raw logits, never
softened probabilities, so one store serves any temperature; `lse` keeps the full row's
log-sum-exp at each build temperature so the kept probabilities stay exact and the tail mass known.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from softcache.store import LOGITS, LSE, TOPK_INDICES, TOPK_VALUES

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# Keys of the per-row flags an encoder returns next to the arrays.
NONFINITE = "_nonfinite"
OVERFLOW = "_overflow"


def encode_batch(
    logits: torch.Tensor,
    *,
    encoding: str,
    value_dtype: str,
    k: int | None = None,
    temperatures: Sequence[float] = (),
    index_dtype: torch.dtype = torch.int32,
) -> dict[str, torch.Tensor]:
    """Encode a batch of teacher logits, on their device.

    Args:
        logits: (B, C) teacher logits, any float dtype.
        encoding: `dense` or `topk`.
        value_dtype: float16, bfloat16 or float32: the stored value type.
        k: kept entries per row (`topk`).
        temperatures: temperatures for the `lse` normalisers (`topk`).
        index_dtype: integer dtype for `topk_indices` (int16 carries uint16 bit patterns).

    Returns:
        For `dense`: LOGITS (B, C). For `topk`: TOPK_VALUES (B, k) sorted descending,
        TOPK_INDICES (B, k), LSE (B, len(temperatures)) float32 (keys are the store's array names). bfloat16 values come as their
        int16 bit patterns. Plus two (B,) bool flags: `NONFINITE` (the teacher's row has NaN/inf)
        and `OVERFLOW` (finite, but not representable in `value_dtype`).
    """
    full = logits.float()
    nonfinite = ~torch.isfinite(full).all(dim=1)
    if encoding == "dense":
        values = full
        out: dict[str, torch.Tensor] = {}
        key = LOGITS
    elif encoding == "topk":
        if k is None:
            raise ValueError("k is required for the topk encoding")
        values, indices = torch.topk(full, k, dim=1, largest=True, sorted=True)
        temps = torch.tensor(list(temperatures), dtype=torch.float32, device=full.device)
        lse = torch.logsumexp(full.unsqueeze(1) / temps.view(1, -1, 1), dim=2)
        out = {TOPK_INDICES: indices.to(index_dtype), LSE: lse}
        key = TOPK_VALUES
    else:
        raise ValueError(f"unknown encoding {encoding!r}")
    stored = values.to(_TORCH_DTYPES[value_dtype])
    overflow = ~torch.isfinite(stored).all(dim=1) & ~nonfinite
    if value_dtype == "bfloat16":
        stored = stored.view(torch.int16)
    out[key] = stored
    out[NONFINITE] = nonfinite
    out[OVERFLOW] = overflow
    return out


def copy_encoded(
    encoded: Mapping[str, torch.Tensor], buffers: Mapping[str, np.ndarray], offset: int
) -> None:
    """Copy host-side results of `encode_batch` into storage buffers, starting at row `offset`.

    Bit patterns are reinterpreted, not converted: int16 carries bfloat16 values and uint16
    class ids. The NONFINITE / OVERFLOW flags are not stored.
    """
    for name, tensor in encoded.items():
        if name in (NONFINITE, OVERFLOW):
            continue
        values = tensor.numpy()
        dest = buffers[name]
        dest[offset : offset + len(values)] = values.view(dest.dtype)
