"""bsr: Block Selective Reprogramming of timm Vision Transformers (Sarkar et al., arXiv 2405.10951)."""

from .core import (BSRConfig, bsr_state, kept_patch_indices, parse_blocks, record_kept_tokens, reprogram, restore,
                   summary)
from .errors import BSRError
from .version import __version__

__all__ = ["BSRConfig", "BSRError", "__version__", "bsr_state", "kept_patch_indices", "parse_blocks",
           "record_kept_tokens", "reprogram", "restore", "summary"]
