"""Teacher and student for the byte-level LM pipeline: two causal transformers over V = 256 bytes.

Both map `input_ids (B, L) int64` to `logits (B, L, 256) float32`, where row `j` is the model's
distribution for the byte *after* position `j` (see `pipelines.textlm.data`). Attention is causal
(`scaled_dot_product_attention(is_causal=True)`), so no position sees a later one; that is also why
the models take no attention mask: in a right-padded batch the real positions never attend to the
padding after them, and the logits at padded positions are simply ignored (their labels are -100).

The teacher (4 layers, d = 128, 4 heads, 891,648 parameters) is trained by
`python -m pipelines.textlm.prepare`; the student (2 layers, d = 48, 4 heads, 93,504) is about
9.5 times smaller. Both use learned positional embeddings up to `MAX_LEN` = 512 positions, pre-norm
blocks with a 4x GELU MLP, and an output layer tied to the byte embedding. Factories take no
arguments, as specs require.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.checkpoints import load_prepared

VOCAB = 256
MAX_LEN = 512
DATA_DIR = Path(
    os.environ.get("SOFTCACHE_TEXTLM_DIR", Path(__file__).resolve().parents[2] / "data" / "textlm")
)
TEACHER_CHECKPOINT = DATA_DIR / "teacher.pt"


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, L, d / heads)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


class ByteTransformer(nn.Module):
    """A causal byte-level transformer: `input_ids (B, L) int64 -> logits (B, L, 256) float32`."""

    def __init__(self, *, layers: int, dim: int, heads: int, max_len: int = MAX_LEN) -> None:
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied input and output embeddings
        self.apply(_init)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds the model's {self.max_len}")
        x = self.embed(input_ids) + self.pos(torch.arange(length, device=input_ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def _init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def student() -> nn.Module:
    """A 2-layer, d = 48 byte transformer (about 0.09 M parameters), freshly initialised."""
    return ByteTransformer(layers=2, dim=48, heads=4)


def untrained_teacher() -> nn.Module:
    """The teacher architecture (4 layers, d = 128, 4 heads) with fresh weights (used by `prepare`)."""
    return ByteTransformer(layers=4, dim=128, heads=4)


def teacher() -> nn.Module:
    """The trained teacher, loaded from `data/textlm/teacher.pt`, in eval mode."""
    return load_prepared(untrained_teacher(), TEACHER_CHECKPOINT, "pipelines.textlm.prepare")
