"""Tiny deterministic causal-LM teachers and token datasets for `test_token_verify`, named as
`tests.helpers.token_verify_specs:NAME`.

`dataset()` holds `NUM_SEQUENCES` ragged sequences of random ids in a `VOCAB`-token vocabulary,
with the samples in `EMPTY` of length 0; the other datasets differ from it in known samples, as a
changed copy of the data would. The teacher is position-wise (embedding, then linear), so it is
trivially causal, and returns ``(B, L, V)`` logits. Everything is seeded: two processes build the
same objects bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

VOCAB = 300
NUM_SEQUENCES = 40
MAX_LENGTH = 24
EMPTY = (5, 17, 39)  # samples of length 0 (39 is the last: offsets end on an empty sample)
DATA_SEED = 4321
WEIGHT_SEED = 77
CHANGED_SAMPLE = 11  # `changed_dataset`: same length, one token differs
LONGER_SAMPLE = 23  # `length_changed_dataset`: one extra token at the end
SHORTER_SAMPLE = 30  # `length_changed_dataset`: its last token dropped


def sequences() -> list[torch.Tensor]:
    """The ``NUM_SEQUENCES`` int64 id sequences of `dataset`: 1..MAX_LENGTH ids (0 in EMPTY)."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    lengths = torch.randint(2, MAX_LENGTH + 1, (NUM_SEQUENCES,), generator=gen)
    out = []
    for i, n in enumerate(lengths.tolist()):
        ids = torch.randint(0, VOCAB, (n,), generator=gen)
        out.append(ids[:0] if i in EMPTY else ids)
    return out


class Sequences(Dataset):
    """A map-style dataset of ``(input_ids (n,) int64, labels (n,) int64)`` items.

    Labels are the shifted inputs (the last position has none: ``-100``).
    """

    def __init__(self, items: list[torch.Tensor]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.items[i]
        labels = torch.cat([ids[1:], torch.full((min(len(ids), 1),), -100)])
        return ids, labels


def dataset() -> Sequences:
    """The sequences the test stores are built from."""
    return Sequences(sequences())


def changed_dataset() -> Sequences:
    """`dataset`, with one token of sample `CHANGED_SAMPLE` replaced (its length unchanged)."""
    items = sequences()
    ids = items[CHANGED_SAMPLE].clone()
    ids[0] = (ids[0] + 1) % VOCAB
    items[CHANGED_SAMPLE] = ids
    return Sequences(items)


def length_changed_dataset() -> Sequences:
    """`dataset`, with `LONGER_SAMPLE` one token longer and `SHORTER_SAMPLE` one shorter.

    The total token count is unchanged, so only per-sample lengths tell the two apart.
    """
    items = sequences()
    items[LONGER_SAMPLE] = torch.cat([items[LONGER_SAMPLE], torch.tensor([7])])
    items[SHORTER_SAMPLE] = items[SHORTER_SAMPLE][:-1]
    return Sequences(items)


def short_dataset() -> Sequences:
    """The first ``NUM_SEQUENCES - 1`` sequences of `dataset`."""
    return Sequences(sequences()[:-1])


class PositionwiseLM(nn.Module):
    """Embedding then linear: ``(B, L)`` ids -> ``(B, L, V)`` logits, seeded."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16, seed: int = WEIGHT_SEED) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids))


def teacher() -> nn.Module:
    """The test LM teacher (``VOCAB`` logits per position)."""
    return PositionwiseLM().eval()
