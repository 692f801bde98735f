"""The errors softcache raises on purpose.

Every error a user can cause derives from `SoftcacheError`, so the CLI turns exactly these into a
one-line message and a non-zero exit, and lets anything else (a bug) keep its traceback. Messages say
what was expected, what was found, and what to do about it.
"""

from __future__ import annotations


class SoftcacheError(Exception):
    """Base class of the errors that come from bad input, bad stores or bad configuration."""


class ConfigError(SoftcacheError, ValueError):
    """A configuration file or option is malformed, unknown or out of range."""


class SpecError(SoftcacheError):
    """A `module:callable` spec does not import, does not exist, or returns the wrong kind of object."""


class StoreFormatError(SoftcacheError):
    """A store is not a softcache store, or was written in a format version this reader does not know."""


class NotAStoreError(StoreFormatError):
    """A location that is not a softcache store at all (nothing there, or foreign data)."""


class MissingArrayError(StoreFormatError):
    """A softcache store lacks arrays its metadata requires (interrupted creation, or damage)."""

    def __init__(self, message: str, missing: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.missing = missing


class UnsupportedVersionError(StoreFormatError):
    """A softcache store written in a format version this reader does not know."""


class CorruptChunkError(StoreFormatError, ValueError):
    """A chunk of a store failed its checksum or could not be decoded."""


class TamperedStoreError(SoftcacheError):
    """A store's bytes are not the ones its producer published: its digest is not the one a
    reader pinned, or an object differs from the store's manifest."""


class PublishConflictError(SoftcacheError):
    """Another publisher committed the same name first, or the version is already published."""


class IncompleteStoreError(SoftcacheError):
    """A store's build has not finished (its `complete` flag is unset)."""


class StoreExistsError(SoftcacheError):
    """A build would overwrite or mix with an existing store; pass `--overwrite` to replace it."""


class DatasetMismatchError(SoftcacheError):
    """A dataset does not match the one a store was built from (order, length or content)."""


class TeacherOutputError(SoftcacheError):
    """The teacher's output has the wrong shape or non-finite values."""


class DatasetFormatError(SoftcacheError):
    """A dataset's items are not of the expected `(input, label)` form."""


class TokenizerMismatchError(SoftcacheError):
    """A student's tokenizer (or its vocabulary width) differs from the one a token store's
    teacher used, so the stored token ids would mean other tokens to it."""
