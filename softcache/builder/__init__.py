"""`softcache build`: run a teacher over a dataset once and write its soft labels into a store."""

from softcache.builder.rows import BuildResult, build

__all__ = ["BuildResult", "build"]
