"""Side-by-side benchmarks of softcache: `python -m benchmarks.run` (see benchmarks/README.md)."""
