"""bsr: Block Selective Reprogramming of timm Vision Transformers (Sarkar et al., arXiv 2405.10951)."""

from . import models  # noqa: F401  (registers the small ViTs with timm)
from .config import BSRConfig, parse_blocks
from .errors import BSRError
from .patch import bsr_state, kept_patch_indices, record_kept_tokens, reprogram, restore, summary

__all__ = ["BSRConfig", "BSRError", "bsr_state", "kept_patch_indices", "parse_blocks", "record_kept_tokens",
           "reprogram", "restore", "summary"]
__version__ = "0.1.0"
