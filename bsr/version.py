"""The version of `bsr`: the one defined in `bsr_device.version` (the lowest layer; pyproject reads it from there)."""

from bsr_device.version import __version__

__all__ = ["__version__"]
