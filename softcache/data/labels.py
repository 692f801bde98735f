"""What "no label" is, in every layout.

Distillation is how a teacher's knowledge reaches unlabelled data, so a missing label is normal, not
an error. softcache spells it one way internally, `NO_LABEL = -100` (PyTorch's and Hugging Face's
ignore index), for rows and tokens alike. Row datasets may give `None` or any negative integer
(`-1` is common); collation turns both into `NO_LABEL`, and the row losses treat every negative
target as "no label".
"""

from __future__ import annotations

import torch

NO_LABEL = -100

# Integer label dtypes whose every value converts to int64 as `int(label)` reads it.
LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def with_no_label(labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` int64 labels from integer `labels`, `NO_LABEL` where a label is negative."""
    labels = labels.to(torch.int64)
    return torch.where(labels < 0, NO_LABEL, labels)
