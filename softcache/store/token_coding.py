"""Per-token soft labels for language models: sparse encodings of big-vocabulary rows, and losses.

A 128k-vocabulary teacher row is 256 KiB in fp16, so an LM cache keeps a few entries per token:

- ``topk``: the k largest log-probabilities, their ids, and the log of the mass left out (the
  *residual*: one extra bin, so the loss is an exact KL over k + 1 outcomes, like Megatron-LM's
  "ghost" bin). Biased: the tail's shape is lost.
- ``sampled``: ids drawn from the teacher with replacement, and their counts. The frequencies are
  an unbiased estimate of the teacher's distribution, so the loss is an unbiased estimate of the
  full cross-entropy (Anshumann et al., 2025); the price is variance.

Values are log-probabilities at the build temperature, not raw logits: normalised, so a kept
probability needs no per-row normaliser; in ``(-inf, 0]``, so a fixed scale quantises them with
no per-row scale; and with the tail mass stored on its own, quantising them cannot corrupt the
tail bin (``1 - sum p`` would). A cache is tied to its build temperature: at another one the kept
probabilities keep their ratios but the residual and a sampled set's distribution are wrong.

The trade-off, measured by ``benchmarks/tokens.py`` (V = 2^17, a synthetic LM teacher, bytes per
token on disk under zstd + crc32c). Ids: a set of k ids of V carries ``log2 C(V, k)`` bits, 53 B
at k = 32. Elias-Fano coding of the sorted ids takes a fixed 56 B (`encode_elias_fano`), against
68 B bit-packed (`pack_indices`), 70 B as delta-coded int32 and 78 B as int32, each under zstd,
which cannot shrink ids that rarely recur. Values then follow id order, and their order costs
``log2 k!`` bits (15 B at k = 32) whatever the code. Top-32: 109 B with fp16 values; 77.5 B with
7-bit `quantize_logprobs` ``"sqrt"`` codes and the residual in 8-bit ``"log"`` codes, at a KL
cost of 0.0004 nats per token (0.0013 at 6 bits, 74 B), against the 0.42 nats of the lost tail. Sampled, 32 draws (11.5
unique ids): 33 B with the ids in Elias-Fano and uint8 counts (25 + 7) and an fp16 entropy (2).

Every function is pure torch, runs on the tensors' device and computes losses in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

QUANT_SCHEMES = ("log", "sqrt")


# ---- encoders ------------------------------------------------------------------------------------


def topk_residual(
    logits: Tensor, k: int, *, temperature: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """The k most probable tokens of each row, with the log of the probability mass left out.

    Args:
        logits: ``(T, V)`` teacher logits, any float dtype.
        k: kept entries per row, ``0 <= k <= V``.
        temperature: the build temperature ``tau``: ``p = softmax(logits / tau)``.

    Returns:
        ``(values, indices, residual)``: ``(T, k)`` float32 log-probabilities ``log p_i``, sorted
        descending; ``(T, k)`` int64 token ids; ``(T,)`` float32 ``log(1 - sum_i p_i)``, the log
        of the tail mass, computed as a log-sum-exp over the other ``V - k`` entries (exact even
        when the tail is tiny), and ``-inf`` when ``k = V``.
    """
    check_temperature(temperature)
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    if not 0 <= k <= log_p.shape[1]:
        raise ValueError(f"k must be in [0, V = {log_p.shape[1]}], got {k}")
    values, indices = torch.topk(log_p, k, dim=1, largest=True, sorted=True)
    residual = torch.logsumexp(log_p.scatter(1, indices, float("-inf")), dim=1)
    return values, indices, residual


def residual_of_topk(values: Tensor) -> Tensor:
    """The log tail mass of rows known only by their k largest log-probabilities.

    ``log(1 - sum_i exp(v_i))``, summed in float64. Unlike `topk_residual`'s log-sum-exp over the
    tail, this subtracts from 1, so a tail below the rounding of the kept values cannot be
    resolved: the tail is clamped to at least ``k * 2^-24`` (float32 values' relative rounding,
    ``k`` times), which also covers kept masses that round to 1 or above. At k = 8 the floor is
    ``log(4.8e-7) = -14.6``; a tail that small weighs less than 5e-7 nats in any KL term.

    Args:
        values: ``(T, k)`` log-probabilities (``<= 0``), any float dtype, ``k >= 1``.

    Returns:
        ``(T,)`` float32 log tail masses, at least ``log(k * 2^-24)``.
    """
    floor = values.shape[1] * 2.0**-24
    kept = values.double().exp().sum(dim=1)
    return torch.log((1.0 - kept).clamp_min(floor)).float()


def sample_ids(
    logits: Tensor,
    draws: int,
    *,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw ``draws`` token ids per row from the teacher's distribution, with replacement.

    Sampling follows ``p = softmax(logits / tau)`` (``torch.multinomial``: the same generator state
    gives the same ids). The draws are kept as their sorted unique ids and counts, padded to the
    fixed width ``draws``; padding slots have count 0 and repeat the row's last id. At 32 draws
    the benchmark's teacher gives 11.5 unique ids, 25 B in Elias-Fano plus 7 B of counts; the 32
    sorted draws themselves would cost 56 B in Elias-Fano (every repeat takes a full slot).

    Args:
        logits: ``(T, V)`` teacher logits, any float dtype.
        draws: ``D``, draws per row, ``1 <= D <= 65535``.
        temperature: the sampling temperature ``tau``; the loss must use the same one.
        generator: a ``torch.Generator`` on the logits' device, for determinism.

    Returns:
        ``(ids, counts)``: ``(T, D)`` int64 ids, ascending over the first ``U`` slots (``U`` =
        number of unique ids of the row); ``(T, D)`` counts, uint8 when ``D <= 255`` else uint16,
        summing to ``D`` per row.
    """
    check_temperature(temperature)
    if not 1 <= draws <= 65535:
        raise ValueError(f"draws must be in [1, 65535], got {draws}")
    count_dtype = torch.uint8 if draws <= 255 else torch.uint16
    rows = logits.shape[0]
    if rows == 0:
        empty = torch.zeros((0, draws), dtype=torch.int64, device=logits.device)
        return empty, empty.to(count_dtype)
    probs = torch.softmax(logits.float() / temperature, dim=1)
    drawn = torch.multinomial(probs, draws, replacement=True, generator=generator)
    drawn = drawn.sort(dim=1).values
    new = torch.ones_like(drawn, dtype=torch.bool)
    new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = new.long().cumsum(dim=1) - 1  # the unique slot each draw falls into
    ids = torch.zeros_like(drawn).scatter_(1, slot, drawn)  # duplicates write equal values
    counts = torch.zeros_like(drawn).scatter_add_(1, slot, torch.ones_like(drawn))
    unique = slot[:, -1:] + 1
    pad = torch.arange(draws, device=drawn.device) >= unique
    ids = torch.where(pad, ids.gather(1, unique - 1), ids)
    return ids, counts.to(count_dtype)


def teacher_entropy(logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """``H(p) = -sum_i p_i log p_i`` per row, ``p = softmax(logits / tau)``: ``(T,)`` float32.

    Stored next to a sampled set, it turns the sampled cross-entropy into a KL (`sampled_kl`).
    """
    check_temperature(temperature)
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


# ---- ids -----------------------------------------------------------------------------------------


def index_bits(vocab_size: int) -> int:
    """Bits per id for a vocabulary of ``V`` tokens: ``ceil(log2 V)`` (at least 1)."""
    return max(1, (vocab_size - 1).bit_length())


def pack_indices(indices: Tensor, bits: int) -> Tensor:
    """Bit-pack ``(T, k)`` ids of ``[0, 2^bits)`` into ``(T, ceil(k bits / 8))`` uint8, LSB first."""
    if not 1 <= bits <= 62:
        raise ValueError(f"bits must be in [1, 62], got {bits}")
    ids = indices.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >> bits):
        raise ValueError(f"ids must lie in [0, 2^{bits}), got [{int(ids.min())}, {int(ids.max())}]")
    rows, width = ids.shape
    return _pack_bits(_bits_of(ids, bits).reshape(rows, width * bits))


def unpack_indices(packed: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of `pack_indices`: ``(T, nbytes)`` uint8 -> ``(T, k)`` int64."""
    rows = packed.shape[0]
    flat = _unpack_bits(packed, k * bits).reshape(rows, k, bits).long()
    return (flat << torch.arange(bits, device=packed.device)).sum(dim=2)


def sort_by_index(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Reorder each row by ascending id (the losses do not depend on the order): ``(values, ids)``."""
    order = indices.argsort(dim=1)
    return values.gather(1, order), indices.gather(1, order)


def elias_fano_low_bits(vocab_size: int, n: int) -> int:
    """The low-bit width that minimises Elias-Fano size for n ids of V: ``floor(log2(V / n))``."""
    return max(0, (vocab_size // max(n, 1)).bit_length() - 1)


def elias_fano_bits(vocab_size: int, width: int, low_bits: int) -> int:
    """Bits of one Elias-Fano row of up to ``width`` ids: ``width * (L + 1) + (V - 1 >> L) + 1``."""
    return 0 if width == 0 else width * (low_bits + 1) + ((vocab_size - 1) >> low_bits) + 1


def encode_elias_fano(
    ids: Tensor, vocab_size: int, *, lengths: Tensor | None = None, low_bits: int | None = None
) -> Tensor:
    """Elias-Fano code each row's non-decreasing ids into a fixed number of bytes.

    Each id ``x`` keeps its ``L`` low bits verbatim and its high part ``x >> L`` in unary: the
    ``i``-th id sets bit ``(x_i >> L) + i`` of a bit vector. ``n`` ids of ``[0, V)`` take
    ``n (L + 1) + (V >> L)`` bits, within 2 bits per id of ``log2 C(V, n)`` at
    ``L = floor(log2(V / n))`` (Elias 1974; Fano 1971). A row holds the ``n L`` low bits, then the
    bit vector, then zeros up to a full row's width: short rows end in zeros that zstd removes.

    Args:
        ids: ``(T, W)`` integer ids in ``[0, V)``, non-decreasing over each row's first
            ``lengths[t]`` entries (the rest are ignored).
        vocab_size: ``V``.
        lengths: ``(T,)`` ids per row, ``<= W``; None means ``W`` everywhere.
        low_bits: ``L``; None means `elias_fano_low_bits` ``(V, W)``. Decoding needs the same.

    Returns:
        ``(T, ceil(elias_fano_bits(V, W, L) / 8))`` uint8.
    """
    rows, width = ids.shape
    if width == 0:
        return torch.zeros((rows, 0), dtype=torch.uint8, device=ids.device)
    lo = elias_fano_low_bits(vocab_size, width) if low_bits is None else low_bits
    nbits = elias_fano_bits(vocab_size, width, lo)
    ids, n, valid, slot = _ef_rows(ids, lengths, width)
    if ids.numel() and bool(((ids[:, 1:] < ids[:, :-1]) & valid[:, 1:]).any()):
        raise ValueError("Elias-Fano coding needs each row's ids sorted ascending")
    if ids.numel() and bool(((ids < 0) | (ids >= vocab_size))[valid].any()):
        raise ValueError(f"ids must lie in [0, V = {vocab_size})")
    high = torch.where(valid, n.unsqueeze(1) * lo + (ids >> lo) + slot, nbits)
    low = (slot.unsqueeze(1) * lo + torch.arange(lo, device=ids.device)).expand(rows, width, lo)
    low = torch.where(valid.unsqueeze(2), low, nbits)
    positions = torch.cat([high, low.reshape(rows, width * lo)], dim=1)
    ones = torch.cat(
        [valid, (_bits_of(ids, lo) & valid.unsqueeze(2)).reshape(rows, width * lo)], dim=1
    )
    # Column nbits is a sink for the invalid entries: every write there is False, and it is cut.
    bits = torch.zeros((rows, nbits + 1), dtype=torch.bool, device=ids.device)
    return _pack_bits(bits.scatter_(1, positions, ones)[:, :nbits])


def decode_elias_fano(
    packed: Tensor,
    vocab_size: int,
    width: int,
    *,
    lengths: Tensor | None = None,
    low_bits: int | None = None,
) -> Tensor:
    """Inverse of `encode_elias_fano`: ``(T, nbytes)`` uint8 -> ``(T, W)`` int64 ids.

    Slots past a row's length repeat its last id (0 for an empty row), as `sample_ids` pads.
    """
    rows = packed.shape[0]
    if width == 0:
        return torch.zeros((rows, 0), dtype=torch.long, device=packed.device)
    lo = elias_fano_low_bits(vocab_size, width) if low_bits is None else low_bits
    nbits = elias_fano_bits(vocab_size, width, lo)
    _, n, valid, slot = _ef_rows(packed.new_zeros((rows, width), dtype=torch.long), lengths, width)
    bits = _unpack_bits(packed, nbits)
    # Slot i's low bits are bits [i L, (i + 1) L): the first W L bits, whatever the row's length
    # (slots past it read the bit vector's bits, and are replaced below).
    low = _bit_values(bits[:, : width * lo].reshape(rows, width, lo))
    span = width + ((vocab_size - 1) >> lo) + 1  # length of the unary bit vector
    column = torch.arange(span, device=packed.device)
    if lengths is None:  # every row's vector starts at W L
        vector = bits[:, width * lo : width * lo + span]
    else:
        vector = bits.gather(1, n.unsqueeze(1) * lo + column)
    # The i-th one of the vector goes to slot i: its rank among the ones, by a running count
    # (ones past the W-th, which a valid row has not, go to a sink column that is cut, as do
    # the zeros); slots without a one keep `span`, as a sort of where(vector, column, span) did.
    target = (vector.cumsum(dim=1) - 1).masked_fill_(~vector, width).clamp_(max=width)
    ones_at = torch.full((rows, width + 1), span, dtype=torch.long, device=packed.device)
    ones_at = ones_at.scatter_(1, target, column.expand(rows, span))[:, :width]
    ids = ones_at.sub_(slot).bitwise_left_shift_(lo).bitwise_or_(low)
    if lengths is None:  # every slot holds an id
        return ids
    last = ids.gather(1, (n - 1).clamp_min(0).unsqueeze(1))
    return torch.where(valid, ids, torch.where(n.unsqueeze(1) > 0, last, 0))


# ---- values --------------------------------------------------------------------------------------


def quantize_logprobs(
    values: Tensor, bits: int, *, scheme: str = "sqrt", log_floor: float = -16.0
) -> Tensor:
    """Quantise log-probabilities (any shape, ``<= 0``) to ``bits``-bit codes at a fixed scale.

    With ``m = 2^bits - 1`` levels, codes are uint8 for ``bits <= 8``, else uint16:

    - ``"sqrt"``: ``code = round(m sqrt(p))``, error ``|sqrt(p^) - sqrt(p)| <= 1 / (2m)`` for any
      p. To second order the KL this costs is ``2 sum_i (sqrt(p_i) - sqrt(p^_i))^2``, at most
      ``k / (2 m^2)``, ``~k / (6 m^2)`` for uniform rounding error: equal for every entry, as KL
      wants (an entry's log error matters in proportion to its probability).
    - ``"log"``: ``code = round(-log p / s)``, ``s = -log_floor / m``: error ``|log p^ - log p|
      <= s / 2`` down to ``log_floor``; lower values clip to the floor.
    """
    levels = _check_quant(bits, scheme, log_floor)
    v = values.float().clamp_max(0.0)
    x = (v / 2).exp() * levels if scheme == "sqrt" else v * (levels / log_floor)
    codes = x.round().clamp(0, levels)
    return codes.to(torch.uint8 if bits <= 8 else torch.uint16)


def dequantize_logprobs(
    codes: Tensor, bits: int, *, scheme: str = "sqrt", log_floor: float = -16.0
) -> Tensor:
    """Inverse of `quantize_logprobs`: codes -> ``(T, k)`` float32 log-probabilities.

    ``"sqrt"`` code 0 (``p < 1 / (4 m^2)``) decodes to ``p = 1 / (12 m^2)``, inside its bin.
    """
    levels = _check_quant(bits, scheme, log_floor)
    c = codes.to(torch.int32).float()
    if scheme == "log":
        return c * (log_floor / levels)
    return torch.where(c > 0, 2 * torch.log(c / levels), math.log(1 / (12 * levels**2)))


def _bits_of(ids: Tensor, bits: int) -> Tensor:
    """``(T, k)`` int64 -> ``(T, k, bits)`` bool, least significant bit first."""
    return ((ids.unsqueeze(2) >> torch.arange(bits, device=ids.device)) & 1).bool()


def _bit_values(bits: Tensor) -> Tensor:
    """``(..., L)`` bool, least significant bit first -> ``(...)`` int64 values."""
    count = bits.shape[-1]
    if count == 0 or count > 52:
        return (bits.long() << torch.arange(count, device=bits.device)).sum(dim=-1)
    # One matrix product, twice as fast as shifting and summing on a CPU. float64 is exact below
    # 2^53, and autocast leaves it alone (it would round a float32 product to float16 on a GPU).
    weights = 2.0 ** torch.arange(count, dtype=torch.float64, device=bits.device)
    return (bits.to(torch.float64) @ weights).long()


def _pack_bits(bits: Tensor) -> Tensor:
    """``(T, n)`` bool -> ``(T, ceil(n / 8))`` uint8, bit ``j`` of a byte = column ``8b + j``."""
    rows, n = bits.shape
    padded = F.pad(bits.to(torch.uint8), (0, -n % 8)).reshape(rows, -(-n // 8), 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=bits.device)
    return (padded * weights).sum(dim=2, dtype=torch.uint8)


def _unpack_bits(packed: Tensor, n: int) -> Tensor:
    """Inverse of `_pack_bits`: ``(T, nbytes)`` uint8 -> ``(T, n)`` bool."""
    if packed.dtype != torch.uint8 or packed.shape[1] * 8 < n:
        raise ValueError(f"need (T, {-(-n // 8)}) uint8, got {packed.dtype} {tuple(packed.shape)}")
    rows, nbytes = packed.shape
    masks = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(2) & masks) != 0).reshape(rows, nbytes * 8)[:, :n]


def _ef_rows(
    ids: Tensor, lengths: Tensor | None, width: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(ids int64, n (T,), valid (T, W), slot (W,))`` for Elias-Fano coding."""
    ids = ids.long()
    n = torch.full((ids.shape[0],), width) if lengths is None else lengths.long()
    n = n.to(ids.device)
    if n.numel() and (int(n.min()) < 0 or int(n.max()) > width):
        raise ValueError(f"lengths must lie in [0, {width}]")
    slot = torch.arange(width, device=ids.device)
    return ids, n, slot < n.unsqueeze(1), slot


def _check_quant(bits: int, scheme: str, log_floor: float) -> int:
    if scheme not in QUANT_SCHEMES:
        raise ValueError(f"scheme must be one of {QUANT_SCHEMES}, got {scheme!r}")
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in [1, 16], got {bits}")
    if not (math.isfinite(log_floor) and log_floor < 0):
        raise ValueError(f"log_floor must be a finite negative number, got {log_floor!r}")
    return (1 << bits) - 1


def check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
