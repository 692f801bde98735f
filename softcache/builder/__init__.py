"""`softcache build`: run a teacher over a dataset once and write its soft labels into a store.

`frame` is the one build skeleton; `rows` and `tokens` are its layouts; `cluster` runs shards on
Dask; `teacher` loads and identifies the teacher.
"""

from softcache.builder.frame import BuildResult, build

__all__ = ["BuildResult", "build"]
