"""Tiny deterministic causal-LM students for `softcache train --lm`, as `tests.helpers.lm_train_specs:NAME`.

Every factory takes no arguments (as specs require) and seeds its own weights, so a student is the
same whatever the global RNG holds, in any process. The vocabularies match `token_specs`:

- `causal_student`: the `token_specs.CausalMean` architecture (embedding, causal running mean,
  linear head) over `VOCAB` tokens, but narrower (`STUDENT_DIM`), with another seed and PyTorch's
  default (small) initialisation: it starts far from `causal_teacher` and can move towards it.
- `next_token_student`: an embedding of the current token and a linear head, over `NEXT_VOCAB`
  tokens (no context at all): able to learn `token_specs.next_token`'s token -> token map, and
  nothing else.
"""

from __future__ import annotations

import torch
from torch import nn

from tests.helpers import token_specs as ts

STUDENT_SEED = 2024
STUDENT_DIM = 8
NEXT_DIM = 64


class CausalMeanStudent(nn.Module):
    """Embedding, a causal running mean over positions, a linear head: (B, L) -> (B, L, V)."""

    def __init__(self, vocab: int = ts.VOCAB, dim: int = STUDENT_DIM) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(2 * dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)
        mean = x.cumsum(dim=1) / steps[None, :, None]
        return self.head(torch.cat([x, mean], dim=2))


class CurrentToken(nn.Module):
    """Logits from the current token alone: (B, L) -> (B, L, V), a learnable token -> token map."""

    def __init__(self, vocab: int = ts.NEXT_VOCAB, dim: int = NEXT_DIM) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids))


def _seeded(factory, seed: int) -> nn.Module:
    state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        return factory()
    finally:
        torch.set_rng_state(state)  # leave the caller's RNG as it was


def causal_student() -> nn.Module:
    """`CausalMeanStudent` over `token_specs.VOCAB` tokens, width `STUDENT_DIM`."""
    return _seeded(CausalMeanStudent, STUDENT_SEED)


def next_token_student() -> nn.Module:
    """`CurrentToken` over `token_specs.NEXT_VOCAB` tokens."""
    return _seeded(CurrentToken, STUDENT_SEED + 1)
