"""bsr: Block Selective Reprogramming of timm Vision Transformers (Sarkar et al., arXiv 2405.10951)."""

from . import models  # noqa: F401  (registers the small ViTs with timm)
from .config import BSRConfig, parse_blocks
from .errors import BSRError

__all__ = ["BSRConfig", "BSRError", "parse_blocks"]
__version__ = "0.1.0"
