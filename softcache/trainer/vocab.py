"""The student's vocabulary against a token store's: its tokenizer, and the width of its logits.

A token store's rows are distributions over the teacher's token ids. Before training, the
student's tokenizer (``--tokenizer DIR``, or the ``hf:``/``hf-init:`` student's ``DIR`` when it
holds one; a ``tokenizer`` / ``processing_class`` in the Trainer path) is checked against the
identity the store records (`softcache.store.tokenizer.check_tokenizer`): a mismatch is refused
with what differs; a vocabulary that only ends earlier or later (padding, added tokens) is
allowed and logged. A store that records no tokenizer (older, or a teacher without one) trains as
before, and the log says that nothing was checked.

Whatever the tokenizers, the student's logits must be at least the store's ``V`` wide: stored
ids index them directly. Wider is fine (a padded vocabulary: its extra slots get the teacher's
zero probability, so they fall in the tail bin); narrower is refused at the first batch
(`check_logit_width`), not left to an index error inside the loss.
"""

from __future__ import annotations

import logging
from typing import Any

from softcache.errors import TokenizerMismatchError
from softcache.runtime.specs import hf_directory
from softcache.store import StoreMeta
from softcache.store.token_codec import TokenCodec
from softcache.store.tokenizer import check_tokenizer

log = logging.getLogger("softcache")


def tokenizer_directory(tokenizer: str | None, student: Any) -> tuple[str | None, bool]:
    """The directory of the student's tokenizer, and whether it was named explicitly (then it
    must hold one): ``tokenizer`` when given, else an ``hf:``/``hf-init:`` student's ``DIR``."""
    if tokenizer:
        return tokenizer, True
    return hf_directory(student), False


def load_student_tokenizer(tokenizer: str | None, student: Any) -> tuple[Any, str] | None:
    """The student's tokenizer and its directory (see `tokenizer_directory`), or None."""
    directory, required = tokenizer_directory(tokenizer, student)
    if directory is None:
        return None
    from softcache.runtime.hf import load_tokenizer  # imports transformers only when used

    loaded = load_tokenizer(directory, required=required)
    return None if loaded is None else (loaded, directory)


def check_student_tokenizer(meta: StoreMeta, where: str, tokenizer: Any, whose: str) -> None:
    """Refuse a student tokenizer the store's teacher did not use; log what was checked.

    Args:
        meta: the token store's metadata.
        where: the store's location, for messages.
        tokenizer: the student's tokenizer, or None when it has none.
        whose: how messages name it, e.g. ``the student's tokenizer (DIR)``.

    Raises:
        TokenizerMismatchError: see `softcache.store.tokenizer.check_tokenizer`.
    """
    stored = meta.tokenizer_identity
    if stored is None:
        # Said as a warning when there was a tokenizer to check, else for the record only.
        (log.info if tokenizer is None else log.warning)(
            "store %s records no tokenizer (built before tokenizer identity, or from a teacher "
            "without one): no check of the student's tokenizer is possible",
            where,
        )
        return
    if tokenizer is None:
        log.warning(
            "the student names no tokenizer (pass --tokenizer DIR, or a tokenizer to the "
            "dataset): not checked against the one store %s records",
            where,
        )
        return
    check = check_tokenizer(stored, tokenizer, where=where, whose=whose)
    # A vocabulary that only differs at its end passed: said, since it was a judgement.
    (log.info if check.identical else log.warning)("tokenizer check: %s", check.message)


def logit_width(model: Any) -> int | None:
    """The width of a model's logits when it says (a Hugging Face model's output embeddings or
    config), else None (known at the first forward pass)."""
    model = getattr(model, "module", model)  # a DDP wrapper
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    weight = getattr(head, "weight", None)
    if weight is not None and getattr(weight, "ndim", 0) == 2:
        return int(weight.shape[0])
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) else None


def check_student_width(model: Any, codec: TokenCodec) -> None:
    """`check_logit_width` before training, for a model whose width is known (`logit_width`):
    a student narrower than the store's vocabulary could not even embed the data's tokens."""
    width = logit_width(model)
    if width is not None:
        check_logit_width(width, codec)


def check_logit_width(width: int, codec: TokenCodec) -> None:
    """Refuse a student whose logits are narrower than the store's vocabulary ``V``."""
    if width < codec.vocab_size:
        raise TokenizerMismatchError(
            f"the student's logits are {width:,} wide but the store's soft labels index token "
            f"ids up to {codec.vocab_size - 1:,} (the teacher's {codec.vocab_size:,} logits per "
            f"token); give the student a vocabulary (vocab_size) of at least "
            f"{codec.vocab_size:,}: a larger, padded one is fine"
        )
