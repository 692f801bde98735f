"""Tests for softcache.store.token_coding: codecs round-trip, quantisers keep their bounds, losses are exact.

The top-k loss at k = V is the dense loss; the sampled estimator is unbiased, checked against the
standard error computed from the full rows (and an estimator that ignores the counts is caught).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from softcache.losses import kd_loss_dense
from softcache.losses import tokens as token_losses
from softcache.store import token_coding as tk

FEW = settings(max_examples=40, deadline=None)
# Tolerance, in standard errors, of the statistical tests: with ~200 checked quantities per test a
# 5-sigma miss has a probability of ~1e-4 for a correct estimator; the seeds are fixed anyway.
Z = 5.0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(seed: int, rows: int, vocab: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=_gen(seed)) * scale


def _sorted_rows(seed: int, rows: int, width: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, width), generator=_gen(seed)).sort(dim=1).values


# ---- ids -----------------------------------------------------------------------------------------


@FEW
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.integers(1, 18),
    rows=st.integers(0, 5),
    width=st.integers(0, 20),
)
def test_pack_indices_round_trips(seed: int, bits: int, rows: int, width: int) -> None:
    ids = torch.randint(0, 2**bits, (rows, width), generator=_gen(seed))
    packed = tk.pack_indices(ids, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, math.ceil(width * bits / 8))
    assert torch.equal(tk.unpack_indices(packed, bits, width), ids)


def test_pack_indices_rejects_ids_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match=r"\[0, 2\^4\)"):
        tk.pack_indices(torch.tensor([[3, 16]]), 4)
    with pytest.raises(ValueError, match=r"\[0, 2\^4\)"):
        tk.pack_indices(torch.tensor([[-1, 2]]), 4)


def test_index_bits() -> None:
    assert [tk.index_bits(v) for v in (1, 2, 3, 256, 257, 131072, 2**18)] == [1, 1, 2, 8, 9, 17, 18]


@FEW
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(1, 2**18),
    rows=st.integers(0, 5),
    width=st.integers(0, 40),
    ragged=st.booleans(),
    low=st.one_of(st.none(), st.integers(0, 18)),
)
def test_elias_fano_round_trips(seed, vocab, rows, width, ragged, low) -> None:
    ids = _sorted_rows(seed, rows, width, vocab)  # repeats allowed: non-decreasing is enough
    lengths = torch.randint(0, width + 1, (rows,), generator=_gen(seed + 1)) if ragged else None
    packed = tk.encode_elias_fano(ids, vocab, lengths=lengths, low_bits=low)
    lo = tk.elias_fano_low_bits(vocab, width) if low is None else low
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, math.ceil(tk.elias_fano_bits(vocab, width, lo) / 8))
    decoded = tk.decode_elias_fano(packed, vocab, width, lengths=lengths, low_bits=low)
    n = torch.full((rows,), width) if lengths is None else lengths
    for row in range(rows):
        m = int(n[row])
        assert torch.equal(decoded[row, :m], ids[row, :m])
        pad = ids[row, m - 1] if m else 0
        assert bool((decoded[row, m:] == pad).all())


def _elias_fano_by_the_bit(
    packed: torch.Tensor, vocab: int, width: int, lengths: torch.Tensor | None, lo: int
) -> torch.Tensor:
    """`decode_elias_fano` spelt out a bit at a time, for any bytes (a valid code or not): slot
    i's low bits are bits [i L, (i + 1) L); the row's n L low bits are followed by the unary
    vector, whose i-th one at column c gives the high part c - i (a missing one reads as the
    vector's length); slots past the row's length repeat its last id (0 when it has none)."""
    span = width + ((vocab - 1) >> lo) + 1
    out = torch.zeros((packed.shape[0], width), dtype=torch.long)
    for r, row in enumerate(packed.tolist()):
        bits = [(byte >> j) & 1 for byte in row for j in range(8)]
        n = width if lengths is None else int(lengths[r])
        vector = bits[n * lo : n * lo + span]
        ones = [c for c, bit in enumerate(vector) if bit][:width]
        ones += [span] * (width - len(ones))
        for i in range(width):
            low = sum(bits[i * lo + j] << j for j in range(lo))
            out[r, i] = ((ones[i] - i) << lo) | low
        out[r, n:] = out[r, n - 1] if n else 0
    return out


@FEW
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(1, 2**12),
    rows=st.integers(0, 6),
    width=st.integers(1, 24),
    ragged=st.booleans(),
    low=st.one_of(st.none(), st.integers(0, 30)),
)
def test_elias_fano_decodes_any_bytes_as_the_bit_by_bit_reading(
    seed, vocab, rows, width, ragged, low
) -> None:
    """The vectorised decoder (running ranks, one scatter) reads any bytes, a corrupt row's
    included, as the bit-by-bit reading does: it cannot differ from the code's definition on the
    rows no encoder wrote."""
    lo = tk.elias_fano_low_bits(vocab, width) if low is None else low
    nbytes = math.ceil(tk.elias_fano_bits(vocab, width, lo) / 8)
    gen = _gen(seed)
    packed = torch.randint(0, 256, (rows, nbytes), generator=gen, dtype=torch.uint8)
    if rows:  # rows of a real code as well, and sparse random bits
        packed[0] = tk.encode_elias_fano(_sorted_rows(seed, 1, width, vocab), vocab, low_bits=lo)
        packed[-1] &= torch.randint(0, 256, (nbytes,), generator=gen, dtype=torch.uint8)
    lengths = torch.randint(0, width + 1, (rows,), generator=gen) if ragged else None
    decoded = tk.decode_elias_fano(packed, vocab, width, lengths=lengths, low_bits=low)
    assert torch.equal(decoded, _elias_fano_by_the_bit(packed, vocab, width, lengths, lo))


def test_elias_fano_is_near_the_entropy_of_a_set() -> None:
    """32 ids of 2^17: 56 bytes, against log2 C(2^17, 32) / 8 = 53.3 and 68 bit-packed."""
    vocab = 2**17
    bound = (math.lgamma(vocab + 1) - math.lgamma(33) - math.lgamma(vocab - 31)) / math.log(2)
    packed = tk.encode_elias_fano(_sorted_rows(0, 3, 32, vocab), vocab)
    assert packed.shape[1] == 56
    assert bound / 8 < packed.shape[1] < bound / 8 + 2 * 32 / 8


def test_elias_fano_rejects_unsorted_or_out_of_range_ids() -> None:
    with pytest.raises(ValueError, match="sorted"):
        tk.encode_elias_fano(torch.tensor([[5, 3]]), 10)
    with pytest.raises(ValueError, match=r"\[0, V = 10\)"):
        tk.encode_elias_fano(torch.tensor([[5, 10]]), 10)
    # Entries past a row's length are ignored, sorted or not.
    packed = tk.encode_elias_fano(torch.tensor([[5, 3]]), 10, lengths=torch.tensor([1]))
    assert torch.equal(
        tk.decode_elias_fano(packed, 10, 2, lengths=torch.tensor([1])), torch.tensor([[5, 5]])
    )


def test_sort_by_index_keeps_the_pairs() -> None:
    values, ids = torch.randn(4, 9, generator=_gen(0)), _logits(1, 4, 50).topk(9, dim=1).indices
    sorted_values, sorted_ids = tk.sort_by_index(values, ids)
    assert bool((sorted_ids[:, 1:] > sorted_ids[:, :-1]).all())
    for row in range(4):
        assert dict(zip(ids[row].tolist(), values[row].tolist(), strict=True)) == dict(
            zip(sorted_ids[row].tolist(), sorted_values[row].tolist(), strict=True)
        )


# ---- values --------------------------------------------------------------------------------------


@FEW
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.integers(1, 16),
    scheme=st.sampled_from(tk.QUANT_SCHEMES),
    scale=st.floats(0.1, 30.0),
)
def test_quantisation_error_is_within_its_bound(seed, bits, scheme, scale) -> None:
    values = F.log_softmax(_logits(seed, 6, 40, scale), dim=1)
    codes = tk.quantize_logprobs(values, bits, scheme=scheme)
    assert codes.dtype == (torch.uint8 if bits <= 8 else torch.uint16)
    decoded = tk.dequantize_logprobs(codes, bits, scheme=scheme)
    levels = 2**bits - 1
    if scheme == "sqrt":
        error = ((decoded / 2).exp() - (values / 2).exp()).abs()
        assert float(error.max()) <= 0.5 / levels + 1e-6
    else:
        step = 16.0 / levels
        inside = values >= -16.0
        assert bool(((decoded - values).abs()[inside] <= step / 2 + 1e-5).all())
        assert bool((decoded[~inside] == -16.0).all())


# ---- encoders ------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_topk_residual_holds_exact_log_probs_and_the_log_tail_mass(temperature: float) -> None:
    logits = _logits(0, 5, 60)
    log_p = F.log_softmax(logits / temperature, dim=1)
    values, indices, residual = tk.topk_residual(logits, 7, temperature=temperature)
    assert values.dtype == residual.dtype == torch.float32 and indices.dtype == torch.int64
    assert bool((values[:, 1:] <= values[:, :-1]).all())
    torch.testing.assert_close(values, log_p.gather(1, indices))
    # The reference in float64: in float32, 1 - sum(p) has lost most digits of a small tail.
    kept = F.log_softmax(logits.double() / temperature, dim=1).gather(1, indices)
    torch.testing.assert_close(
        residual.double(), torch.log1p(-kept.exp().sum(dim=1)), rtol=1e-5, atol=1e-5
    )
    assert bool(torch.isneginf(tk.topk_residual(logits, 60)[2]).all())


def test_sample_ids_layout_and_determinism() -> None:
    logits = _logits(0, 6, 30, 2.0)
    ids, counts = tk.sample_ids(logits, 50, generator=_gen(3))
    again = tk.sample_ids(logits, 50, generator=_gen(3))
    assert torch.equal(ids, again[0]) and torch.equal(counts, again[1])
    assert ids.shape == counts.shape == (6, 50) and counts.dtype == torch.uint8
    assert bool((counts.long().sum(dim=1) == 50).all())
    for row in range(6):
        unique = int((counts[row] > 0).sum())
        assert bool((counts[row, :unique] > 0).all()) and bool((counts[row, unique:] == 0).all())
        assert bool((ids[row, 1:unique] > ids[row, : unique - 1]).all())
        assert bool((ids[row, unique:] == ids[row, unique - 1]).all())
    assert tk.sample_ids(logits, 300, generator=_gen(0))[1].dtype == torch.uint16
    empty_ids, empty_counts = tk.sample_ids(logits[:0], 12)
    assert empty_ids.shape == empty_counts.shape == (0, 12)


# ---- losses --------------------------------------------------------------------------------------


@FEW
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 6),
    vocab=st.integers(2, 40),
    temperature=st.floats(0.25, 8.0),
)
@example(seed=342074735, rows=1, vocab=2, temperature=0.25)
def test_topk_residual_kl_with_every_token_kept_is_the_dense_loss(seed, rows, vocab, temperature):
    student, teacher = _logits(seed, rows, vocab), _logits(seed + 1, rows, vocab)
    values, indices, residual = tk.topk_residual(teacher, vocab, temperature=temperature)
    s_topk, s_dense = student.clone().requires_grad_(), student.clone().requires_grad_()
    topk = token_losses.topk_residual_kl(s_topk, values, indices, residual, temperature=temperature)
    dense = kd_loss_dense(s_dense, teacher, None, temperature=temperature)
    topk.backward()
    dense.backward()
    # Float32 rounding of the stored log-probabilities, scaled by tau^2 like the loss; the
    # gradient, tau (q - p), by tau, and no less than the rounding of q - p itself: at tau = 0.25
    # a gradient of O(0.1) differed by 2e-7 (seed 342074735, 1 row, vocab 2).
    torch.testing.assert_close(topk, dense, rtol=1e-4, atol=2e-6 * temperature**2)
    grad_atol = 1e-6 * max(temperature, 1.0)
    torch.testing.assert_close(s_topk.grad, s_dense.grad, rtol=1e-4, atol=grad_atol)


@FEW
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(1, 29),
    temperature=st.floats(0.5, 4.0),
)
def test_topk_residual_kl_is_the_kl_over_kept_tokens_and_one_tail_bin(seed, k, temperature):
    student, teacher = _logits(seed, 4, 30), _logits(seed + 1, 4, 30)
    values, indices, residual = tk.topk_residual(teacher, k, temperature=temperature)
    p = torch.softmax(teacher / temperature, dim=1).double()
    q = torch.softmax(student / temperature, dim=1).double()
    kept = torch.zeros_like(p, dtype=torch.bool).scatter_(1, indices, True)
    p_tail, q_tail = p.masked_fill(kept, 0).sum(1), q.masked_fill(kept, 0).sum(1)
    expected = torch.where(kept, p * (p / q).log(), 0).sum(1) + p_tail * (p_tail / q_tail).log()
    loss = token_losses.topk_residual_kl(
        student, values, indices, residual, temperature=temperature
    )
    torch.testing.assert_close(
        loss.double(), temperature**2 * expected.mean(), rtol=1e-4, atol=1e-6
    )
    # The bins are renormalised: a common shift of every stored log-probability changes nothing.
    shifted = token_losses.topk_residual_kl(
        student, values - 0.3, indices, residual - 0.3, temperature=temperature
    )
    torch.testing.assert_close(shifted, loss, rtol=1e-5, atol=1e-6)
    same = token_losses.topk_residual_kl(
        teacher, values, indices, residual, temperature=temperature
    )
    assert abs(float(same)) < 1e-5


def _replicated(rows: int, vocab: int, replicas: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher rows of different sharpness, and a student, each row repeated `replicas` times."""
    scales = torch.linspace(0.5, 4.0, rows).unsqueeze(1)
    teacher, student = _logits(10, rows, vocab, 1.0) * scales, _logits(11, rows, vocab, 2.0)
    return teacher.repeat_interleave(replicas, 0), student.repeat_interleave(replicas, 0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_estimator_is_unbiased(temperature: float) -> None:
    """The mean of many independent draws of D = 12 ids matches the exact cross-entropy and the
    exact teacher probabilities, each within Z standard errors computed from the full rows; an
    estimator that ignores the counts fails the same check."""
    rows, vocab, draws, replicas = 4, 40, 12, 4000
    teacher, student = _replicated(rows, vocab, replicas)
    ids, counts = tk.sample_ids(teacher, draws, temperature=temperature, generator=_gen(5))
    p = torch.softmax(teacher[::replicas] / temperature, dim=1).double()
    log_q = F.log_softmax(student[::replicas] / temperature, dim=1).double()
    exact = -(p * log_q).sum(1)
    se = (((p * log_q**2).sum(1) - exact**2) / (draws * replicas)).sqrt()

    def per_token(weights: torch.Tensor) -> torch.Tensor:
        """The estimate of each teacher row: `sampled_ce` over its `replicas` independent draws."""
        blocks = [slice(t * replicas, (t + 1) * replicas) for t in range(rows)]
        estimates = [
            token_losses.sampled_ce(student[b], ids[b], weights[b], temperature=temperature)
            for b in blocks
        ]
        return torch.stack(estimates).double() / temperature**2

    assert bool(((per_token(counts) - exact).abs() <= Z * se).all())
    assert not bool(((per_token((counts > 0).to(torch.uint8)) - exact).abs() <= Z * se).all())

    frequency = torch.zeros(rows * replicas, vocab).scatter_add_(1, ids, counts.float()) / draws
    frequency = frequency.reshape(rows, replicas, vocab).mean(1).double()
    se_p = (p * (1 - p) / (draws * replicas)).sqrt()
    assert bool(((frequency - p).abs() <= Z * se_p + 1e-12).all())


def test_sampled_kl_is_the_sampled_ce_minus_the_entropy() -> None:
    teacher, student = _logits(0, 5, 30), _logits(1, 5, 30)
    ids, counts = tk.sample_ids(teacher, 12, temperature=2.0, generator=_gen(0))
    entropy = tk.teacher_entropy(teacher, temperature=2.0)
    ce = token_losses.sampled_ce(student, ids, counts, temperature=2.0)
    kl = token_losses.sampled_kl(student, ids, counts, entropy, temperature=2.0)
    torch.testing.assert_close(kl, ce - 4.0 * entropy.mean())
    p = torch.softmax(teacher / 2.0, dim=1)
    torch.testing.assert_close(entropy, -(p * p.log()).sum(1))


@pytest.mark.parametrize("k", [1, 8, 50])
def test_losses_have_finite_gradients_on_extreme_logits(k: int) -> None:
    teacher, student = _logits(0, 6, 50, 40.0), _logits(1, 6, 50, 40.0).requires_grad_()
    values, indices, residual = tk.topk_residual(teacher, k)
    ids, counts = tk.sample_ids(teacher, 12, generator=_gen(0))
    for loss in (
        token_losses.topk_residual_kl(student, values, indices, residual),
        token_losses.sampled_ce(student, ids, counts),
    ):
        (grad,) = torch.autograd.grad(loss, student)
        assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())


def test_losses_reject_mismatched_shapes() -> None:
    student = _logits(0, 3, 20)
    values, indices, residual = tk.topk_residual(_logits(1, 4, 20), 5)
    with pytest.raises(ValueError, match="T = 3"):
        token_losses.topk_residual_kl(student, values, indices, residual)
    with pytest.raises(ValueError, match="temperature"):
        token_losses.sampled_ce(student, indices[:3], indices[:3], temperature=0.0)
