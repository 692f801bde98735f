"""`softcache fidelity --sweep`: which encoding to build, measured on the teacher's own rows.

Each candidate encoding (row stores: dense or top-k at each k, float16 or bfloat16 values; token
stores: top-k at each k with float16 or quantised values, and sampled at several draw counts) is
applied to the reference rows `softcache.tools.fidelity` loaded, by the encoders a build uses
(`softcache.store.row_codec.encode_batch`, `TokenCodec.encode`), and measured the same way: mean
``KL(p || p~)``, top-1 agreement, kept mass. Its bytes are those of the encoded arrays compressed
the way a store compresses them (zstd level 3 in chunks of up to 1,024 rows, plus the 4-byte
crc32c of each chunk, plus the 8-byte sample hash of each row of a row store), over the rows.

The trade-off: the bytes are an estimate from a sample (a store of the same encoding also holds
its metadata, a few kB, and zstd does a little better on full shards than on a sample's chunks),
measured in seconds instead of a build per candidate. The frontier is the candidates no other
beats in both bytes and KL; the recommendation is the smallest candidate whose mean KL is within
``max_kl``. Sampled candidates have no finite KL (see `softcache.tools.fidelity`) and are listed
beside the frontier, not on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numcodecs import Zstd
from torch import Tensor

from softcache.store import LSE, TOPK_INDICES, TOPK_VALUES, decode_values
from softcache.store.format import LOGITS
from softcache.store.row_codec import NONFINITE, OVERFLOW, encode_batch
from softcache.store.token_codec import TokenCodec
from softcache.tools.fidelity import (
    BATCH,
    Reference,
    RowFigures,
    concat_figures,
    reconstruct_topk,
    row_figures,
    sampled_log_probs,
    topk_tail,
)

ROW_KS = (1, 2, 3, 5, 10, 20, 32, 50, 100, 200, 500)
ROW_DTYPES = ("float16", "bfloat16")
TOKEN_KS = (4, 8, 16, 32, 64, 128, 256)
TOKEN_VALUE_BITS = (0, 8, 6)
TOKEN_DRAWS = (8, 16, 32, 64)
CHUNK_ROWS = 1024
CRC_BYTES = 4
HASH_BYTES = 8
DEFAULT_TEMPERATURES = (1.0, 2.0, 4.0)


@dataclass(frozen=True)
class Candidate:
    """One encoding measured on the reference rows."""

    label: str
    settings: dict[str, Any]
    bytes_per_unit: float
    kl_mean: float | None
    agreement: float
    kept_mass: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def sweep(
    ref: Reference,
    *,
    tokens: bool,
    temperature: float,
    max_kl: float,
    codec: TokenCodec | None = None,
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES,
) -> dict[str, Any]:
    """Measure every candidate encoding on the reference rows.

    Args:
        ref: the reference rows (`softcache.tools.fidelity.load_reference`).
        tokens: candidates for a token store (`TokenCodec`) instead of a row store.
        temperature: ``T`` at which the KL is measured (and token candidates encoded).
        max_kl: the mean KL (nats per row) the recommendation must stay within.
        codec: the measured token store's codec (its id coding is kept), or None.
        temperatures: the normalisers a top-k row candidate keeps (their bytes count).

    Returns:
        ``{"candidates": [...], "frontier": [labels], "recommended": label or None,
        "max_kl": max_kl}``, candidates as `Candidate.to_dict`, ascending by bytes.
    """
    if tokens:
        found = _token_candidates(ref, temperature, codec)
    else:
        found = _row_candidates(ref, temperature, temperatures)
    found.sort(key=lambda c: c.bytes_per_unit)
    front = frontier(found)
    within = [c for c in front if c.kl_mean is not None and c.kl_mean <= max_kl]
    return {
        "candidates": [c.to_dict() for c in found],
        "frontier": [c.label for c in front],
        "recommended": within[0].label if within else None,
        "max_kl": max_kl,
    }


def frontier(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates with a finite KL that no other beats in both bytes and KL, by bytes."""
    finite = sorted(
        (c for c in candidates if c.kl_mean is not None),
        key=lambda c: (c.bytes_per_unit, c.kl_mean),
    )
    out: list[Candidate] = []
    best = float("inf")
    for c in finite:
        assert c.kl_mean is not None
        if c.kl_mean < best:
            out.append(c)
            best = c.kl_mean
    return out


def compressed_bytes(array: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> int:
    """Bytes of a row array as a store keeps it: zstd level 3 per chunk of rows, plus a crc32c."""
    zstd = Zstd(level=3)
    total = 0
    for start in range(0, max(array.shape[0], 1), chunk_rows):
        chunk = np.ascontiguousarray(array[start : start + chunk_rows])
        total += len(zstd.encode(chunk.tobytes())) + CRC_BYTES
    return total


# ---- row candidates ------------------------------------------------------------------------------


def _row_candidates(
    ref: Reference, temperature: float, temperatures: tuple[float, ...]
) -> list[Candidate]:
    num_classes = ref.logits.shape[1]
    temps = tuple(sorted({*temperatures, temperature}))
    t_index = temps.index(temperature)
    out = []
    for dtype in ROW_DTYPES:
        settings: list[dict[str, Any]] = [{"encoding": "dense"}]
        settings += [{"encoding": "topk", "top_k": k} for k in ROW_KS if k < num_classes]
        for s in settings:
            parts, arrays = [], []
            for start in range(0, ref.logits.shape[0], BATCH):
                logits = ref.logits[start : start + BATCH]
                enc = encode_batch(
                    logits,
                    encoding=s["encoding"],
                    value_dtype=dtype,
                    k=s.get("top_k"),
                    temperatures=temps,
                )
                arrays.append(
                    {k: v.numpy() for k, v in enc.items() if k not in (NONFINITE, OVERFLOW)}
                )
                parts.append(_row_figures(logits, enc, dtype, temperature, t_index, num_classes))
            joined = {k: np.concatenate([a[k] for a in arrays]) for k in arrays[0]}
            nbytes = sum(compressed_bytes(a) for a in joined.values())
            n = max(ref.logits.shape[0], 1)
            label = "dense" if s["encoding"] == "dense" else f"top-{s['top_k']}"
            out.append(
                _candidate(
                    f"{label} {dtype}",
                    {**s, "dtype": dtype},
                    nbytes / n + HASH_BYTES,
                    concat_figures(parts),
                )
            )
    return out


def _row_figures(
    logits: Tensor,
    enc: dict[str, Tensor],
    dtype: str,
    temperature: float,
    t_index: int,
    num_classes: int,
) -> RowFigures:
    log_p = torch.log_softmax(logits.float() / temperature, dim=1)
    if LOGITS in enc:
        stored = _decoded(enc[LOGITS], dtype)
        log_q = torch.log_softmax(stored / temperature, dim=1)
        return row_figures(log_p, (log_q, torch.ones_like(log_q, dtype=torch.bool)))
    values = _decoded(enc[TOPK_VALUES], dtype)
    ids = enc[TOPK_INDICES].long()
    log_kept = values / temperature - enc[LSE][:, t_index].unsqueeze(1)
    log_q = reconstruct_topk(log_kept, ids, topk_tail(log_kept), num_classes)
    kept = torch.zeros_like(log_q, dtype=torch.bool).scatter_(1, ids, True)
    return row_figures(log_p, (log_q, kept))


def _decoded(values: Tensor, dtype: str) -> Tensor:
    """Encoded values (bfloat16 as int16 bits, as `encode_batch` gives them) -> float32."""
    array = values.numpy()
    if dtype == "bfloat16":
        array = array.view(np.uint16)
    return torch.from_numpy(decode_values(array, dtype))


# ---- token candidates ----------------------------------------------------------------------------


def _token_candidates(
    ref: Reference, temperature: float, codec: TokenCodec | None
) -> list[Candidate]:
    vocab = ref.logits.shape[1]
    ids = codec.ids if codec is not None else "elias_fano"
    codecs = [
        TokenCodec("topk", k, vocab, temperature=temperature, ids=ids, value_bits=bits)
        for k in TOKEN_KS
        if k < vocab
        for bits in TOKEN_VALUE_BITS
    ]
    codecs += [
        TokenCodec("sampled", d, vocab, temperature=temperature, ids=ids) for d in TOKEN_DRAWS
    ]
    out = []
    for c in codecs:
        generator = torch.Generator().manual_seed(c.seed)
        parts, fields = [], []
        for start in range(0, ref.logits.shape[0], BATCH):
            logits = ref.logits[start : start + BATCH]
            enc = c.encode(logits, generator=generator)
            fields.append({k: v.numpy() for k, v in enc.items()})
            dec = c.decode(enc)
            log_p = torch.log_softmax(logits.float() / temperature, dim=1)
            if c.encoding == "topk":
                log_q = reconstruct_topk(dec["values"], dec["indices"], dec["residual"], vocab)
                kept = torch.zeros_like(log_q, dtype=torch.bool).scatter_(1, dec["indices"], True)
            else:
                log_q, kept = sampled_log_probs(dec["ids"], dec["counts"], vocab)
            parts.append(row_figures(log_p, (log_q, kept)))
        joined = {k: np.concatenate([f[k] for f in fields]) for k in fields[0]}
        nbytes = sum(compressed_bytes(a) for a in joined.values())
        if c.encoding == "topk":
            bits = f"u{c.value_bits}" if c.value_bits else "fp16"
            label = f"top-{c.width} {bits}"
            settings: dict[str, Any] = {"encoding": "topk", "top_k": c.width}
            settings["value_bits"] = c.value_bits
        else:
            label = f"sampled {c.width}"
            settings = {"encoding": "sampled", "draws": c.width}
        out.append(
            _candidate(label, settings, nbytes / max(ref.logits.shape[0], 1), concat_figures(parts))
        )
    return out


def _candidate(
    label: str, settings: dict[str, Any], bytes_per_unit: float, figures: RowFigures
) -> Candidate:
    finite = bool(np.isfinite(figures.kl).all())
    return Candidate(
        label=label,
        settings=settings,
        bytes_per_unit=float(bytes_per_unit),
        kl_mean=float(figures.kl.mean()) if finite else None,
        agreement=float(figures.agree.mean()),
        kept_mass=float(figures.kept.mean()),
    )
