"""What "no label" is, in every layout.

Distillation is how a teacher's knowledge reaches unlabelled data, so a missing label is normal, not
an error. softcache spells it one way internally, `NO_LABEL = -100` (PyTorch's and Hugging Face's
ignore index), for rows and tokens alike. Row datasets may give `None` or any negative integer
(`-1` is common); collation turns both into `NO_LABEL`, and the row losses treat every negative
target as "no label".
"""

from __future__ import annotations

NO_LABEL = -100
