"""The version of `bsr` and `bsr_device` (one place, below every layer that records it; pyproject reads it too)."""

__version__ = "0.1.0"
