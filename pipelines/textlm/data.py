"""A byte-level corpus from the running Python's standard library sources, split by file.

The corpus needs no download and is the same on every machine with the same Python version: the
`*.py` files under `sysconfig.get_paths()["stdlib"]`, minus the `test`, `tests`, `idlelib` and
`site-packages` folders, and minus `encodings` and `pydoc_data`, which are generated tables (1.4 MB
of codec maps and one 0.76 MB string) rather than code. Of the rest (about 9 MB on Python 3.11),
files are taken in the order of sha256(`"select:" + relative path`), which spreads the pick over the
whole library, until `CORPUS_BYTES` (3 MiB) is reached; the chosen files are then sorted by path.
The corpus is their bytes in that order, each followed by a NUL byte (`FILE_SEP`, which no stdlib
source contains). `manifest()` lists the files and the sha256 of the corpus bytes: a patch release
may edit a file, so compare `fingerprint()` before reusing a cache built elsewhere.

Each file goes to the test split when the first 8 bytes of sha256(`"split:" + relative path`), as
an integer, are below `TEST_FRACTION` (10 %) of 2^64; a file's bytes are in one split only. Each
split is a *stream*: its files' bytes in corpus order, each followed by `FILE_SEP`.

Alignment (the convention a per-token cache follows): an item is a span `[s, s + n)` of a split's
stream; `input_ids = stream[s : s + n]` and `labels = stream[s + 1 : s + n + 1]`, so position `j`'s
target is token `j + 1`, and a model's logits at position `j` are its distribution for the token
after position `j`. The last label of a span is the first byte of the next one. Vocabulary: the 256
byte values (`VOCAB`).

- `train_set()`, `test_set()`: non-overlapping windows of exactly `WINDOW` = 128 bytes (stride 128)
  over the stream. The training set keeps at most `MAX_TRAIN_WINDOWS` = 4,096 windows (0.5 M tokens;
  the teacher's forward pass over them takes about 25 s on one core), taken evenly across the
  split's 23,236 windows (Python 3.11.7) so that they sample the whole split.
- `ragged_train_set()`: the same split cut into blocks at blank lines (after every `\\n\\n`, and after
  every `FILE_SEP`), blocks longer than 128 bytes cut into 128-byte pieces: lengths 1..128. The
  spans tile the stream; at most `MAX_TRAIN_WINDOWS` of them are kept, evenly spread. Batch them
  with `pad_collate`, which right-pads.

Items are `(input_ids (n,) int64, labels (n,) int64)`, values in 0..255.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

VOCAB = 256
WINDOW = 128
FILE_SEP = 0
CORPUS_BYTES = 3 * 2**20
TEST_FRACTION = 0.1
MAX_TRAIN_WINDOWS = 4096
IGNORE_INDEX = -100  # the label at padded positions, cross_entropy's default ignore_index
EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "encodings", "pydoc_data"})
_BLOCK_END = re.compile(rb"\n\n|\x00")


@dataclass(frozen=True)
class Corpus:
    """The selected stdlib files and their bytes.

    Attributes:
        root: the stdlib folder they were read from.
        files: relative paths (POSIX form), sorted.
        sizes: each file's size in bytes, in the order of `files`.
        data: the corpus bytes: each file followed by `FILE_SEP`.
    """

    root: Path
    files: tuple[str, ...]
    sizes: tuple[int, ...]
    data: bytes

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _path_key(rel: str, purpose: str) -> bytes:
    """sha256 of `purpose:rel`: the selection and the split use unrelated keys."""
    return hashlib.sha256(f"{purpose}:{rel}".encode()).digest()


def is_test_file(rel: str) -> bool:
    """Whether the file at relative path `rel` belongs to the test split."""
    return int.from_bytes(_path_key(rel, "split")[:8], "big") < TEST_FRACTION * 2**64


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def select_files(root: Path, budget: int = CORPUS_BYTES) -> list[str]:
    """The corpus's files under `root`: relative POSIX paths, sorted (see the module docstring)."""
    candidates = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if p.is_file() and not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
    ]
    chosen, total = [], 0
    for rel in sorted(candidates, key=lambda rel: _path_key(rel, "select")):
        if total >= budget:
            break
        chosen.append(rel)
        total += (root / rel).stat().st_size
    return sorted(chosen)


@functools.cache
def corpus() -> Corpus:
    """The corpus of the running Python (read once per process)."""
    root = stdlib_root()
    files = select_files(root)
    blobs = [(root / rel).read_bytes() for rel in files]
    data = b"".join(blob + bytes([FILE_SEP]) for blob in blobs)
    return Corpus(root, tuple(files), tuple(len(b) for b in blobs), data)


def fingerprint() -> str:
    """The sha256 of the corpus bytes, hex."""
    return corpus().sha256


def manifest() -> dict:
    """What the corpus is made of, for provenance: Python version, files, sizes, sha256."""
    c = corpus()
    return {
        "python": ".".join(map(str, sys.version_info[:3])),
        "stdlib": str(c.root),
        "bytes": len(c.data),
        "sha256": c.sha256,
        "files": [
            {"path": f, "bytes": n, "split": "test" if is_test_file(f) else "train"}
            for f, n in zip(c.files, c.sizes, strict=True)
        ],
    }


@functools.cache
def stream(split: str) -> torch.Tensor:
    """A split's bytes, `(N,) uint8`: its files in corpus order, each followed by `FILE_SEP`."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    c = corpus()
    parts, offset = [], 0
    for rel, size in zip(c.files, c.sizes, strict=True):
        if is_test_file(rel) == (split == "test"):
            parts.append(c.data[offset : offset + size + 1])
        offset += size + 1
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


class Spans(Dataset):
    """Spans of a byte stream as a map-style dataset of `(input_ids, labels)` items.

    Args:
        data: `(N,) uint8` stream.
        starts, lengths: `(M,) int64` each: span `i` is `data[starts[i] : starts[i] + lengths[i]]`,
            with `starts[i] + lengths[i] < N` so that every position has a target.
        split: `"train"` or `"test"`, for reference.
    """

    def __init__(
        self, data: torch.Tensor, starts: np.ndarray, lengths: np.ndarray, split: str
    ) -> None:
        if len(starts) and int((starts + lengths).max()) >= len(data):
            raise ValueError("a span's last target lies past the end of the stream")
        self.data, self.starts, self.lengths, self.split = data, starts, lengths, split

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, n = int(self.starts[i]), int(self.lengths[i])
        chunk = self.data[s : s + n + 1].long()
        return chunk[:-1], chunk[1:]


def spread(n: int, cap: int | None) -> np.ndarray:
    """`min(n, cap)` indices of 0..n-1, evenly spread and increasing."""
    if cap is None or n <= cap:
        return np.arange(n, dtype=np.int64)
    return (np.arange(cap, dtype=np.int64) * n) // cap


def windows(split: str, cap: int | None = None) -> Spans:
    """Non-overlapping `WINDOW`-byte windows of a split's stream, at most `cap` of them."""
    data = stream(split)
    starts = spread((len(data) - 1) // WINDOW, cap) * WINDOW
    return Spans(data, starts, np.full(len(starts), WINDOW, dtype=np.int64), split)


def blocks(data: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Starts and lengths of the blank-line blocks of a stream, each cut to at most `WINDOW` bytes.

    The spans tile `data[: N - 1]` (the last byte has no target).
    """
    raw = data.numpy().tobytes()
    ends = [m.end() for m in _BLOCK_END.finditer(raw)]
    cuts = sorted({0, *(e for e in ends if e < len(raw) - 1), len(raw) - 1})
    starts, lengths = [], []
    for a, b in itertools.pairwise(cuts):
        for s in range(a, b, WINDOW):
            starts.append(s)
            lengths.append(min(WINDOW, b - s))
    return np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)


def train_set() -> Spans:
    """Up to 4,096 training windows of 128 bytes: items `(input_ids (128,), labels (128,))` int64."""
    return windows("train", MAX_TRAIN_WINDOWS)


def test_set() -> Spans:
    """Every 128-byte window of the test split (1,773 on Python 3.11.7)."""
    return windows("test")


def test_sample() -> Spans:
    """256 of the test split's windows, evenly spread (32k tokens): a quick `softcache fidelity`."""
    return windows("test", 256)


def ragged_train_set() -> Spans:
    """Up to 4,096 blank-line blocks of the training split, 1..128 bytes each; batch with `pad_collate`."""
    data = stream("train")
    starts, lengths = blocks(data)
    keep = spread(len(starts), MAX_TRAIN_WINDOWS)
    return Spans(data, starts[keep], lengths[keep], "train")


def pad_collate(
    items: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad variable-length items into a batch.

    Args:
        items: `(input_ids (n_i,) int64, labels (n_i,) int64)` pairs, `n_i >= 1`.

    Returns:
        `input_ids (B, Lmax) int64`, padded with 0 (`FILE_SEP`; a causal model's real positions
        never see it); `labels (B, Lmax) int64`, padded with `IGNORE_INDEX` (-100);
        `attention_mask (B, Lmax) bool`, True at real positions.
    """
    if not items:
        raise ValueError("pad_collate needs at least one item")
    longest = max(len(x) for x, _ in items)
    input_ids = torch.full((len(items), longest), FILE_SEP, dtype=torch.int64)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.int64)
    mask = torch.zeros((len(items), longest), dtype=torch.bool)
    for i, (x, y) in enumerate(items):
        input_ids[i, : len(x)] = x
        labels[i, : len(y)] = y
        mask[i, : len(x)] = True
    return input_ids, labels, mask
