"""The tokenizer identity a token store records, and the check a student's tokenizer passes
(`softcache.store.tokenizer`), on real tokenizers saved and loaded back through `AutoTokenizer`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from softcache.errors import StoreFormatError, TokenizerMismatchError
from softcache.store.tokenizer import BLOCK_IDS, TokenizerIdentity, check_tokenizer
from tests.helpers.word_tokenizers import SPECIALS, save_tokenizer, words

transformers = pytest.importorskip("transformers")

BASE = 9000 - len(SPECIALS)  # 9,000 ids: blocks 0..4095, 4096..8191, 8192..8999


def _load(directory: Path) -> Any:
    from softcache.runtime.hf import load_tokenizer

    return load_tokenizer(directory, required=True)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tokenizers")
    vocab = words(BASE)
    changed = list(vocab)
    changed[5000] = "other"  # id 5003: in the block 4096..8191
    return {
        "teacher": save_tokenizer(base / "teacher", vocab),
        "same": save_tokenizer(base / "same", vocab),
        "eos": save_tokenizer(base / "eos", vocab, eos="<pad>"),
        "range": save_tokenizer(base / "range", changed),
        "extended": save_tokenizer(base / "extended", vocab, added=["<|im_start|>", "<|im_end|>"]),
        "longer_base": save_tokenizer(base / "longer_base", [*vocab, "x", "y"]),
        "extended_other": save_tokenizer(
            base / "extended_other", [*vocab[:-1], "z"], added=["<a>"]
        ),
    }


def _identity(directory: Path, width: int | None = None) -> TokenizerIdentity:
    return TokenizerIdentity.of(_load(directory), width)


def test_identity_fields_and_round_trip(dirs: dict[str, Path]) -> None:
    identity = _identity(dirs["teacher"], 9216)
    assert identity.size == identity.ids == 9000
    assert identity.logit_width == 9216
    assert len(identity.blocks) == -(-9000 // BLOCK_IDS) == 3
    assert identity.special_tokens["eos_token"] == ("<eos>", 2)
    assert identity.special_tokens["pad_token"] == ("<pad>", 1)
    assert TokenizerIdentity.from_dict(identity.to_dict()) == identity
    # Saved and loaded again, or built twice: the same identity.
    assert _identity(dirs["same"], 9216) == identity
    assert _identity(dirs["eos"]).vocab_sha256 == identity.vocab_sha256
    assert _identity(dirs["eos"]).special_sha256 != identity.special_sha256


def test_identical_tokenizer_passes(dirs: dict[str, Path]) -> None:
    stored = _identity(dirs["teacher"], 9000)
    identical, line = check_tokenizer(
        stored, _load(dirs["same"]), where="S", whose="the student's tokenizer"
    )
    assert identical and "matches" in line and "9,000 tokens" in line


def test_a_differing_special_token_is_named(dirs: dict[str, Path]) -> None:
    stored = _identity(dirs["teacher"], 9000)
    with pytest.raises(TokenizerMismatchError) as info:
        check_tokenizer(stored, _load(dirs["eos"]), where="S", whose="the student's tokenizer (D)")
    message = str(info.value)
    assert (
        "special token eos_token is '<eos>' (id 2) in the store's tokenizer but '<pad>' (id 1) here"
        in message
    )
    assert "vocabulary" not in message.split("(tokenizer classes")[0]


def test_a_differing_vocabulary_range_is_named(dirs: dict[str, Path]) -> None:
    stored = _identity(dirs["teacher"], 9000)
    with pytest.raises(TokenizerMismatchError) as info:
        check_tokenizer(stored, _load(dirs["range"]), where="S", whose="the student's tokenizer")
    message = str(info.value)
    assert "the tokens of ids 4,096..8,191 differ" in message
    assert "special token" not in message


@pytest.mark.parametrize("store_side", ["teacher", "extended"])
def test_a_padded_prefix_passes_both_ways(dirs: dict[str, Path], store_side: str) -> None:
    """Added tokens at the end of either vocabulary: the shared ids agree, so it passes."""
    student_side = "extended" if store_side == "teacher" else "teacher"
    stored = _identity(dirs[store_side], 9002)
    identical, line = check_tokenizer(
        stored, _load(dirs[student_side]), where="S", whose="the student's tokenizer"
    )
    assert not identical
    assert "agree on their shared ids 0..8,999" in line
    assert "ids 9,000..9,001 exist only in" in line
    longer = "the store's tokenizer" if store_side == "extended" else "the student's tokenizer"
    assert f"exist only in {longer}" in line
    assert "allowed" in line


def test_a_prefix_with_other_shared_ids_is_refused(dirs: dict[str, Path]) -> None:
    """Extended, but shared ids differ (8,999 and 9,000): not a prefix. The student ends at id
    9,000, inside the last block: the store's added tokens beyond it are subtracted."""
    stored = _identity(dirs["extended"], 9002)
    with pytest.raises(TokenizerMismatchError, match=r"ids 8,192\.\.9,000 differ"):
        check_tokenizer(stored, _load(dirs["extended_other"]), where="S", whose="the student's")


def test_a_store_longer_in_plain_tokens_cannot_be_checked_and_is_refused(
    dirs: dict[str, Path],
) -> None:
    """The store's extra ids are not added tokens: the partial block cannot be checked."""
    stored = _identity(dirs["longer_base"], 9002)
    with pytest.raises(TokenizerMismatchError, match="cannot be checked"):
        check_tokenizer(stored, _load(dirs["teacher"]), where="S", whose="the student's")


def test_malformed_records_are_refused(dirs: dict[str, Path]) -> None:
    good = _identity(dirs["teacher"], 9000).to_dict()
    for key, value, fragment in (
        ("blocks", good["blocks"][:-1], "tokenizer.blocks"),
        ("size", -1, "tokenizer.size"),
        ("vocab_sha256", "xyz", "tokenizer.vocab_sha256"),
        ("special_tokens", {"eos_token": ["<eos>", 3]}, "tokenizer.special_sha256"),
        ("added", [[99999, "<x>"]], "tokenizer.added"),
    ):
        with pytest.raises(StoreFormatError, match=fragment):
            TokenizerIdentity.from_dict({**good, key: value})


def test_logs_say_when_nothing_can_be_checked(caplog: pytest.LogCaptureFixture) -> None:
    from softcache.trainer.vocab import check_student_tokenizer

    class Meta:
        tokenizer_identity = None

    with caplog.at_level(logging.INFO, logger="softcache"):
        check_student_tokenizer(Meta(), "S", object(), "the student's tokenizer")  # type: ignore[arg-type]
    assert "records no tokenizer" in caplog.text
