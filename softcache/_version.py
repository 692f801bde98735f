"""The softcache release: one place, so that modules low in the package need not import its face."""

__version__ = "0.1.0"
