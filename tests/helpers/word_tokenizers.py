"""Real tokenizers built locally for the tokenizer-identity tests (nothing is downloaded). Not
named `tokenizers.py`: a script run from tests/helpers would import it for the package.

`save_tokenizer` writes a word-level `tokenizers` model over a given word list, wrapped in
`transformers.PreTrainedTokenizerFast`, with `save_pretrained`: the directory `AutoTokenizer`
loads, as a teacher's or a student's model directory would hold it. Ids are the words' positions
(specials first), so a test controls exactly which ids differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

SPECIALS = ("<unk>", "<pad>", "<eos>")


def words(n: int, *, prefix: str = "w") -> list[str]:
    """`n` distinct plain words (`w0`, `w1`, ...)."""
    return [f"{prefix}{i}" for i in range(n)]


def make_tokenizer(
    vocab: Sequence[str], *, eos: str = "<eos>", added: Sequence[str] = (), model_max: int = 64
) -> Any:
    """A fast tokenizer whose ids are ``SPECIALS + vocab`` in order, then ``added`` tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {token: i for i, token in enumerate([*SPECIALS, *vocab])}
    inner = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=inner,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token=eos,
        model_max_length=model_max,
    )
    if added:
        tokenizer.add_tokens(list(added))
    return tokenizer


def save_tokenizer(directory: Path, vocab: Sequence[str], **kwargs: Any) -> Path:
    """`make_tokenizer(vocab, **kwargs)` saved with `save_pretrained` into `directory`."""
    make_tokenizer(vocab, **kwargs).save_pretrained(str(directory))
    return directory
