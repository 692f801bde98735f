"""softcache: offline soft-label caching for knowledge distillation."""

__version__ = "0.1.0"
