"""Tiny deterministic causal-LM teachers and token-sequence datasets, as `tests.helpers.token_specs:NAME`.

Every factory takes no arguments (as specs require) and is seeded, so two processes build the same
objects bit for bit. Environment variables shape a CLI run in a subprocess (the environment
propagates) without changing the spec, which a resumed build must repeat exactly:

- `SOFTCACHE_TEST_LM_VARIANT`: `""` (default) gives the datasets as documented; `token` changes
  one token of sample `CHANGED_SAMPLE` (same lengths); `length` makes that sample one token
  longer (so the token count changes too); `swap` moves one token from sample `CHANGED_SAMPLE` to
  sample `CHANGED_SAMPLE + 1` (other lengths, the same token count).
- `SOFTCACHE_TEST_LM_SLEEP`: seconds `causal_teacher` sleeps per forward pass (default 0): for
  the kill tests. Sleeping changes no value, so a slow build and a fast one write the same store.

Item formats: `ragged_dataset` gives `(input_ids, labels)` tuples with the shifted inputs as
labels; `dict_dataset` gives the same tokens as right-padded dicts with an `attention_mask`;
`next_token_dataset` gives dicts with `input_ids` only.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

VOCAB = 300
NUM_SEQUENCES = 40
MAX_LEN = 20
DATA_SEED = 4321
WEIGHT_SEED = 77
# Samples with no tokens at all: several, the first one included, and two in a row.
EMPTY_SAMPLES = (0, 7, 8, 19, 33)
# Samples of exactly one token (the teacher's only row predicts a token outside the sample).
SINGLE_SAMPLES = (3, 25)
CHANGED_SAMPLE = 11  # the sample the `token` / `length` / `swap` variants alter (never empty)
PAD_ID = 0

# The known next-token rule: token j + 1 of a `next_token_dataset` sample is `next_token(token j)`.
# Over a prime vocabulary of which 7 is a primitive root, x -> 7x + 3 has a single fixed point
# (`NEXT_FIXED`, never used as a start) and one cycle through every other token: a sequence never
# repeats within NEXT_VOCAB - 1 steps, so a row shifted by any number of positions is caught.
NEXT_VOCAB = 293
NEXT_MUL, NEXT_ADD = 7, 3
NEXT_FIXED = 146  # 7 * 146 + 3 = 1025 = 3 * 293 + 146
NEXT_LOGIT = 20.0  # the logit `next_token_teacher` puts on the right token (every other is 0)


def next_token(ids: torch.Tensor | np.ndarray | int, vocab: int = NEXT_VOCAB):
    """The token `next_token_dataset` has after `ids` (elementwise)."""
    return (ids * NEXT_MUL + NEXT_ADD) % vocab


def variant() -> str:
    value = os.environ.get("SOFTCACHE_TEST_LM_VARIANT", "")
    if value not in ("", "token", "length", "swap"):
        raise ValueError(f"SOFTCACHE_TEST_LM_VARIANT must be '', token, length or swap: {value!r}")
    return value


def lengths() -> np.ndarray:
    """(NUM_SEQUENCES,) int64 lengths in [0, MAX_LEN] of the ragged dataset (before any variant)."""
    rng = np.random.default_rng(DATA_SEED)
    out = rng.integers(2, MAX_LEN + 1, NUM_SEQUENCES).astype(np.int64)
    out[list(EMPTY_SAMPLES)] = 0
    out[list(SINGLE_SAMPLES)] = 1
    out[-1] = MAX_LEN
    return out


def sequences() -> list[torch.Tensor]:
    """The ragged dataset's token ids, one (n_i,) int64 tensor per sample, `variant` applied."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    seqs = [torch.randint(0, VOCAB, (int(n),), generator=gen) for n in lengths()]
    return _apply_variant(seqs)


def _apply_variant(seqs: list[torch.Tensor]) -> list[torch.Tensor]:
    kind, i = variant(), CHANGED_SAMPLE
    seqs = [s.clone() for s in seqs]
    if kind == "token":
        seqs[i][-1] = (seqs[i][-1] + 1) % VOCAB
    elif kind == "length":
        seqs[i] = torch.cat([seqs[i], seqs[i][:1]])
    elif kind == "swap":
        seqs[i + 1] = torch.cat([seqs[i + 1], seqs[i][-1:]])
        seqs[i] = seqs[i][:-1]
    return seqs


class Sequences(Dataset):
    """A map-style dataset of token sequences, in one of the item formats of `softcache.data.sequences`."""

    def __init__(self, seqs: list[torch.Tensor], style: str = "tuple", pad_to: int = 0) -> None:
        self.seqs = seqs
        self.style = style
        self.pad_to = pad_to

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int):
        ids = self.seqs[i]
        if self.style == "tuple":
            labels = torch.cat([ids[1:], torch.tensor([-100], dtype=ids.dtype)])[: len(ids)]
            return ids, labels
        if self.style == "dict_ids":
            return {"input_ids": ids}
        # "dict": right-padded to pad_to, with the attention mask marking the real tokens.
        pad = self.pad_to - len(ids)
        return {
            "input_ids": torch.cat([ids, torch.full((pad,), PAD_ID, dtype=ids.dtype)]),
            "attention_mask": torch.cat(
                [torch.ones(len(ids), dtype=torch.int64), torch.zeros(pad, dtype=torch.int64)]
            ),
        }


# ---- datasets -------------------------------------------------------------------------------------


def ragged_dataset() -> Sequences:
    """NUM_SEQUENCES `(input_ids, labels)` items of 0..MAX_LEN tokens (see EMPTY_SAMPLES)."""
    return Sequences(sequences())


def dict_dataset() -> Sequences:
    """The ragged dataset's tokens as dicts right-padded to MAX_LEN + 3, with attention masks."""
    return Sequences(sequences(), style="dict", pad_to=MAX_LEN + 3)


def next_token_sequences() -> list[torch.Tensor]:
    """Token j + 1 = `next_token(token j)`; the ragged dataset's lengths, seeded first tokens."""
    gen = torch.Generator().manual_seed(DATA_SEED + 1)
    starts = torch.randint(0, NEXT_VOCAB - 1, (NUM_SEQUENCES,), generator=gen)
    starts += (starts >= NEXT_FIXED).long()  # skip the fixed point
    out = []
    for start, n in zip(starts.tolist(), lengths().tolist(), strict=True):
        ids, tok = [], start
        for _ in range(n):
            ids.append(tok)
            tok = int(next_token(tok))
        out.append(torch.tensor(ids, dtype=torch.int64))
    return out


def next_token_dataset() -> Sequences:
    """`{"input_ids"}` dict items following the known next-token rule (`next_token`)."""
    return Sequences(next_token_sequences(), style="dict_ids")


def empty_token_dataset() -> Sequences:
    """Three samples, all empty: a dataset without a single token."""
    return Sequences([torch.zeros(0, dtype=torch.int64)] * 3)


def left_padded_dataset() -> Sequences:
    """Dict items whose attention mask pads on the left (zeros, then ones): to be refused."""

    class LeftPadded(Sequences):
        def __getitem__(self, i: int):
            item = super().__getitem__(i)
            return {k: v.flip(0) for k, v in item.items()}

    return LeftPadded(sequences(), style="dict", pad_to=MAX_LEN + 3)


# ---- teachers -------------------------------------------------------------------------------------


class CausalMean(nn.Module):
    """Embedding, a causal running mean over positions, a linear head: (B, L) -> (B, L, V).

    Position j sees tokens 0..j only, so right padding never changes a real position's logits.
    """

    def __init__(self, vocab: int = VOCAB, dim: int = 16, seed: int = WEIGHT_SEED) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(2 * dim, vocab)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        sleep = float(os.environ.get("SOFTCACHE_TEST_LM_SLEEP", "0") or 0)
        if sleep:
            time.sleep(sleep)
        x = self.embed(input_ids)
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)
        mean = x.cumsum(dim=1) / steps[None, :, None]
        return self.head(torch.cat([x, mean], dim=2))


class NextToken(nn.Module):
    """Logits 0 everywhere but `NEXT_LOGIT` at `next_token(input_ids[j])` for position j: exactly
    right on `next_token_dataset`."""

    def __init__(self, vocab: int = NEXT_VOCAB) -> None:
        super().__init__()
        self.vocab = vocab
        self.scale = nn.Parameter(torch.tensor(NEXT_LOGIT))  # a parameter, so it has a checksum

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        target = next_token(input_ids, self.vocab)
        logits = torch.zeros((*input_ids.shape, self.vocab), device=input_ids.device)
        logits.scatter_(2, target.unsqueeze(2), 1.0)
        # Padding positions get a different (still finite) row, so a leak into the store shows.
        return logits * self.scale * attention_mask.unsqueeze(2)


def causal_teacher() -> nn.Module:
    """`CausalMean` over VOCAB tokens; sleeps `SOFTCACHE_TEST_LM_SLEEP` s per forward pass."""
    torch.manual_seed(WEIGHT_SEED)
    return CausalMean().eval()


def next_token_teacher() -> nn.Module:
    """`NextToken` over NEXT_VOCAB tokens (takes `attention_mask`)."""
    return NextToken().eval()


class _WrongVocab(nn.Module):
    """`CausalMean`, but one token fewer in the output for long inputs (a ragged vocabulary)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = CausalMean()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.inner(input_ids)
        return out[..., :-1] if input_ids.shape[1] > 4 else out


def wrong_vocab_teacher() -> nn.Module:
    return _WrongVocab().eval()


def reference_logits(model: nn.Module, seqs: list[torch.Tensor]) -> torch.Tensor:
    """(T, V) float32: every sample's real-token logits, each sample run alone, in dataset order."""
    rows = []
    with torch.inference_mode():
        for ids in seqs:
            if len(ids):
                mask = torch.ones((1, len(ids)), dtype=torch.int64)
                if isinstance(model, NextToken):
                    out = model(ids[None], attention_mask=mask)
                else:
                    out = model(ids[None])
                rows.append(out[0].float())
    return torch.cat(rows)
