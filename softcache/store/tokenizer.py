"""The teacher's tokenizer as a store records it, and the check a student's tokenizer must pass.

A token store's soft labels are distributions over the teacher's token ids: a student whose
tokenizer maps ids to other strings learns from labels that mean something else, silently. So a
store built from a teacher that comes with a tokenizer records its identity (the `tokenizer` key
of the `softcache` attribute, docs/FORMAT.md) without storing the vocabulary itself:

- ``class`` (information only), ``size`` (``len(tokenizer)``), ``ids`` (one past the largest id)
  and ``logit_width`` (the teacher's logits per token, the store's ``V``);
- ``vocab_sha256``: SHA-256 of every (id, token) pair in id order, added tokens included;
- ``special_tokens`` (name -> [token, id]) and their ``special_sha256``;
- ``blocks``: per ``block_ids`` (4,096) ids, the sum mod 2^128 of a 128-bit hash of each
  (id, token) pair in the block. A sum, not a chained digest, so a range that ends inside a
  block can be checked by subtracting the pairs known beyond its end: 32 hex digits per block,
  2 KiB at a 262k vocabulary, and a mismatch names the first 4,096 ids that differ;
- ``added``: the added tokens (id, content; at most `MAX_ADDED`, the last by id), the public
  strings (``<|im_start|>``, reserved slots) that usually make up a padded vocabulary's end.

`check_tokenizer` compares a recorded identity with a live tokenizer. Equal vocabularies and
special tokens pass. So does a *prefix*: one vocabulary ends earlier and every shared id agrees
(a vocabulary padded or extended at its end, e.g. 151,665 tokens against 151,646, or a teacher
with chat tokens the student lacks). Anything else is refused, naming what differs.

Only duck typing is used (``get_vocab()``, ``len()``, ``added_tokens_decoder``, the special token
attributes), so this module never imports `transformers`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from softcache.errors import StoreFormatError, TokenizerMismatchError

#: Ids per block of `blocks`.
BLOCK_IDS = 4096
#: Added tokens recorded (the last ones by id, beyond).
MAX_ADDED = 4096
#: Largest id space recorded (2^24, `token_codec.vocab_size`'s bound, times 16).
MAX_IDS = 1 << 28
#: The special tokens compared, by their attribute names in `transformers`.
SPECIAL_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_MOD = 1 << 128
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")


def _pair_hash(token_id: int, token: str) -> int:
    digest = hashlib.sha256(token_id.to_bytes(8, "little") + _utf8(token)).digest()
    return int.from_bytes(digest[:16], "little")


def _utf8(token: str) -> bytes:
    return token.encode("utf-8", "surrogatepass")


def _range_sum(pairs: Iterable[tuple[int, str]]) -> int:
    return sum(_pair_hash(i, t) for i, t in pairs) % _MOD


@dataclass(frozen=True)
class TokenizerIdentity:
    """What a token store records of its teacher's tokenizer (see the module docstring)."""

    cls: str
    size: int
    ids: int
    logit_width: int | None
    vocab_sha256: str
    special_tokens: Mapping[str, tuple[str, int]]
    special_sha256: str
    block_ids: int
    blocks: tuple[str, ...]
    added: tuple[tuple[int, str], ...] | None

    @classmethod
    def of(cls, tokenizer: Any, logit_width: int | None = None) -> TokenizerIdentity:
        """The identity of a `transformers` tokenizer (or anything with its methods)."""
        pairs = vocabulary(tokenizer)
        ids = max(len(tokenizer), pairs[-1][0] + 1 if pairs else 0)
        sha = hashlib.sha256()
        for token_id, token in pairs:
            data = _utf8(token)
            sha.update(token_id.to_bytes(8, "little") + len(data).to_bytes(4, "little") + data)
        sums = [0] * -(-ids // BLOCK_IDS)
        for token_id, token in pairs:
            block = token_id // BLOCK_IDS
            sums[block] = (sums[block] + _pair_hash(token_id, token)) % _MOD
        special = special_tokens(tokenizer)
        added = sorted(
            (int(i), str(getattr(t, "content", t)))
            for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
        )
        return cls(
            cls=type(tokenizer).__name__,
            size=len(tokenizer),
            ids=ids,
            logit_width=logit_width,
            vocab_sha256=sha.hexdigest(),
            special_tokens=special,
            special_sha256=_special_digest(special),
            block_ids=BLOCK_IDS,
            blocks=tuple(f"{s:032x}" for s in sums),
            added=tuple(added[-MAX_ADDED:]),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "class": self.cls,
            "size": self.size,
            "ids": self.ids,
            "logit_width": self.logit_width,
            "vocab_sha256": self.vocab_sha256,
            "special_tokens": {k: list(v) for k, v in self.special_tokens.items()},
            "special_sha256": self.special_sha256,
            "block_ids": self.block_ids,
            "blocks": list(self.blocks),
            "added": None if self.added is None else [list(a) for a in self.added],
        }

    @classmethod
    def from_dict(cls, raw: Any) -> TokenizerIdentity:
        """Parse (and check) a recorded identity; `StoreFormatError` names the bad key."""
        if not isinstance(raw, Mapping):
            raise StoreFormatError("tokenizer is not a JSON object")

        def bad(key: str, expected: str) -> StoreFormatError:
            found = json.dumps(raw.get(key))[:60] if key in raw else "missing"
            return StoreFormatError(f"tokenizer.{key} is {found}; expected {expected}")

        def integer(key: str, lo: int, hi: int, *, nullable: bool = False) -> Any:
            value = raw.get(key)
            if nullable and value is None:
                return None
            if type(value) is not int or not lo <= value <= hi:
                raise bad(key, f"an integer in [{lo}, {hi}]" + (" or null" if nullable else ""))
            return value

        if not isinstance(raw.get("class"), str):
            raise bad("class", "a string")
        size = integer("size", 0, MAX_IDS)
        ids = integer("ids", size, MAX_IDS)
        width = integer("logit_width", 1, MAX_IDS, nullable=True)
        for key in ("vocab_sha256", "special_sha256"):
            if not isinstance(raw.get(key), str) or not _HEX64.fullmatch(raw[key]):
                raise bad(key, "64 lowercase hex digits")
        special = raw.get("special_tokens")
        if not isinstance(special, Mapping) or len(special) > 64:
            raise bad("special_tokens", "an object of at most 64 names")
        parsed: dict[str, tuple[str, int]] = {}
        for name, value in special.items():
            if (
                not isinstance(value, list)
                or len(value) != 2
                or not isinstance(value[0], str)
                or type(value[1]) is not int
            ):
                raise bad("special_tokens", f'[token, id] pairs (see "{name}")')
            parsed[name] = (value[0], value[1])
        if _special_digest(parsed) != raw["special_sha256"]:
            raise bad("special_sha256", "the SHA-256 of special_tokens")
        block = integer("block_ids", 1, MAX_IDS)
        blocks = raw.get("blocks")
        wanted = -(-ids // block)
        if (
            not isinstance(blocks, list)
            or len(blocks) != wanted
            or not all(isinstance(b, str) and _HEX32.fullmatch(b) for b in blocks)
        ):
            raise bad("blocks", f"{wanted} strings of 32 hex digits (ceil(ids / block_ids))")
        added = raw.get("added")
        if added is not None and (
            not isinstance(added, list)
            or len(added) > MAX_ADDED
            or not all(
                isinstance(a, list)
                and len(a) == 2
                and type(a[0]) is int
                and 0 <= a[0] < ids
                and isinstance(a[1], str)
                for a in added
            )
        ):
            raise bad("added", f"null or at most {MAX_ADDED} [id < ids, content] pairs")
        return cls(
            cls=raw["class"],
            size=size,
            ids=ids,
            logit_width=width,
            vocab_sha256=raw["vocab_sha256"],
            special_tokens=parsed,
            special_sha256=raw["special_sha256"],
            block_ids=block,
            blocks=tuple(blocks),
            added=None if added is None else tuple((a[0], a[1]) for a in added),
        )


def vocabulary(tokenizer: Any) -> list[tuple[int, str]]:
    """Every (id, token) pair of a tokenizer, added tokens included, ordered by id."""
    vocab = tokenizer.get_vocab()
    return sorted((int(i), str(t)) for t, i in vocab.items())


def special_tokens(tokenizer: Any) -> dict[str, tuple[str, int]]:
    """The special tokens that are set: name -> (token, id)."""
    out = {}
    for name in SPECIAL_NAMES:
        token = getattr(tokenizer, name, None)
        if token is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(str(token))
        out[name] = (str(token), -1 if token_id is None else int(token_id))
    return out


def _special_digest(special: Mapping[str, tuple[str, int]]) -> str:
    data = json.dumps({k: list(v) for k, v in sorted(special.items())}, ensure_ascii=False)
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()


class TokenizerCheck(NamedTuple):
    """What `check_tokenizer` let pass: the same tokenizer, or a prefix (`message` says)."""

    identical: bool
    message: str


def check_tokenizer(
    stored: TokenizerIdentity, tokenizer: Any, *, where: str, whose: str
) -> TokenizerCheck:
    """Refuse a tokenizer that differs from the one a store records; say what passed.

    Args:
        stored: the store's record (`StoreMeta.tokenizer_identity`).
        tokenizer: the student's tokenizer (live: ranges are hashed on demand).
        where: the store, for messages.
        whose: the tokenizer, for messages (e.g. ``the student's tokenizer (DIR)``).

    Returns:
        Whether the tokenizers are identical, and one line for the log (for a prefix: what
        was allowed).

    Raises:
        TokenizerMismatchError: the special tokens differ, or the vocabularies differ at an id
            both have; the message names each difference.
    """
    live = TokenizerIdentity.of(tokenizer)
    pairs = dict(vocabulary(tokenizer))
    problems = _special_differences(stored.special_tokens, live.special_tokens)
    differing = (
        None
        if live.vocab_sha256 == stored.vocab_sha256
        else _first_difference(stored, pairs, live.ids)
    )
    sizes = f"{stored.size:,} tokens in the store's tokenizer, {live.size:,} in {_short(whose)}"
    if differing is not None:
        lo, hi, why = differing
        problems.append(f"vocabulary: the tokens of ids {lo:,}..{hi:,} {why}; {sizes}")
    if problems:
        raise TokenizerMismatchError(
            f"{whose} differs from the teacher's, which store {where} records: {'; '.join(problems)} "
            f"(tokenizer classes: {stored.cls} in the store, {live.cls} here). A student must "
            "read token ids as the teacher did: train it with the teacher's tokenizer (and a "
            "vocabulary at least as large), or rebuild the store with a teacher that shares "
            "the student's tokenizer"
        )
    if stored.ids == live.ids and live.vocab_sha256 == stored.vocab_sha256:
        return TokenizerCheck(
            True,
            f"{whose} matches the teacher's, which store {where} records ({live.size:,} tokens, "
            f"vocabulary sha256 {live.vocab_sha256[:12]}..., same special tokens)",
        )
    shared = min(stored.ids, live.ids)
    longer = "the store's tokenizer" if stored.ids > live.ids else _short(whose)
    message = (
        f"{whose} and the teacher's, which store {where} records, agree on their shared ids "
        f"0..{shared - 1:,} and on their special tokens; ids {shared:,}..{max(stored.ids, live.ids) - 1:,} "
        f"exist only in {longer} (a vocabulary padded or extended at its end; {sizes}): allowed. "
        f"The store's soft labels index ids below {stored.logit_width or stored.ids:,}, so the "
        "student's logits must be at least that wide"
    )
    return TokenizerCheck(False, message)


def _short(whose: str) -> str:
    return whose.split(" (", 1)[0]


def _special_differences(
    stored: Mapping[str, tuple[str, int]], live: Mapping[str, tuple[str, int]]
) -> list[str]:
    out = []
    for name in [n for n in SPECIAL_NAMES if n in stored or n in live] + sorted(
        set(stored) - set(SPECIAL_NAMES)
    ):
        a, b = stored.get(name), live.get(name)
        if a is not None and b is not None and tuple(a) == tuple(b):
            continue
        out.append(
            f"special token {name} is {_show(a)} in the store's tokenizer but {_show(b)} here"
        )
    return out


def _show(entry: tuple[str, int] | None) -> str:
    return "unset" if entry is None else f"{entry[0]!r} (id {entry[1]})"


def _first_difference(
    stored: TokenizerIdentity, pairs: Mapping[int, str], live_ids: int
) -> tuple[int, int, str] | None:
    """The first block of the stored id space (cut at the shorter vocabulary's end) whose
    tokens differ: (first id, last id, why), or None when every shared id agrees."""
    block = stored.block_ids
    shared = min(stored.ids, live_ids)
    known = dict(stored.added or ())
    for k, digest in enumerate(stored.blocks):
        lo, hi = k * block, min((k + 1) * block, stored.ids)
        if lo >= shared:
            break
        expected = int(digest, 16)
        if hi > live_ids:  # the live vocabulary ends inside this block: subtract the store's rest
            rest = range(live_ids, hi)
            if not all(i in known for i in rest):
                return (
                    lo,
                    live_ids - 1,
                    f"cannot be checked (the store records its ids {live_ids:,}..{hi - 1:,}, "
                    "which are no added tokens, only in the digest of their block)",
                )
            expected = (expected - _range_sum((i, known[i]) for i in rest)) % _MOD
            hi = live_ids
        found = _range_sum((i, pairs[i]) for i in range(lo, hi) if i in pairs)
        if found != expected:
            return lo, hi - 1, f"differ (the first block of {block:,} ids that does)"
    return None
