"""Token-sequence datasets for the Hugging Face model tests, as `tests.helpers.hf_specs:NAME`.

The models themselves are tiny configs the tests build and `save_pretrained` into tmp_path, named
by `hf:DIR` / `hf-init:DIR` specs; these factories give the data, seeded, so the build and train
processes see the same tokens. Ids are below `VOCAB` (the tests' model vocabulary) and sequences
are at most `MAX_LEN` (below the models' `n_positions`) tokens long.

`ragged_dataset` mixes the item formats of `softcache.data.sequences`: even samples are
`(input_ids, labels)` tuples (labels the shifted inputs, `-100` last), odd ones right-padded dicts
of `input_ids`, `attention_mask` and `labels` (padding tokens are `PAD_ID` and labelled `-100`).
Lengths vary, with empty and one-token samples among them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

VOCAB = 300
NUM_SEQUENCES = 37
MAX_LEN = 24
PADDED_LEN = 32  # the width odd samples are right-padded to (still below n_positions)
DATA_SEED = 2468
EMPTY_SAMPLES = (5, 20)
SINGLE_SAMPLES = (0, 13)
PAD_ID = 7  # a real id, so padding that leaked into the store would show


def lengths() -> np.ndarray:
    """(NUM_SEQUENCES,) int64 real-token counts of `ragged_dataset`."""
    rng = np.random.default_rng(DATA_SEED)
    out = rng.integers(2, MAX_LEN + 1, NUM_SEQUENCES).astype(np.int64)
    out[list(EMPTY_SAMPLES)] = 0
    out[list(SINGLE_SAMPLES)] = 1
    out[-1] = MAX_LEN
    return out


def sequences() -> list[torch.Tensor]:
    """The real token ids of `ragged_dataset`, one (n_i,) int64 tensor per sample."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    return [torch.randint(0, VOCAB, (int(n),), generator=gen) for n in lengths()]


def shifted_labels(ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets of `ids`: ``labels[j] = ids[j + 1]``, -100 at the last position."""
    labels = torch.full_like(ids, -100)
    labels[:-1] = ids[1:]
    return labels


class RaggedTokens(Dataset):
    """Map-style dataset of `sequences()` in mixed item formats (see the module docstring)."""

    def __init__(self, seqs: list[torch.Tensor]) -> None:
        self.seqs = seqs

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> Any:
        ids = self.seqs[i]
        labels = shifted_labels(ids)
        if i % 2 == 0:
            return ids, labels
        n = len(ids)
        padded = torch.full((PADDED_LEN,), PAD_ID, dtype=torch.int64)
        padded[:n] = ids
        padded_labels = torch.full((PADDED_LEN,), -100, dtype=torch.int64)
        padded_labels[:n] = labels
        mask = torch.zeros(PADDED_LEN, dtype=torch.int64)
        mask[:n] = 1
        return {"input_ids": padded, "attention_mask": mask, "labels": padded_labels}


def ragged_dataset() -> RaggedTokens:
    return RaggedTokens(sequences())
