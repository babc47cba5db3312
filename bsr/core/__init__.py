"""The method of Sarkar et al. (arXiv 2405.10951), usable alone: Block Selective Reprogramming of a timm ViT.

`config` (BSRConfig, block specs), `ops` (pure token functions), `patch` (the reversible patch: `reprogram`,
`restore`, `summary`), `moe` (task-routed mixtures of experts), `multitask` (the multi-task ViT of SPEC section 5)
and `models` (small ViTs registered with timm). Depends only on `bsr.errors`, torch and timm.
"""

from . import models  # noqa: F401  (registers the small ViTs with timm)
from .config import BSRConfig, parse_blocks
from .patch import bsr_state, kept_patch_indices, record_kept_tokens, reprogram, restore, summary

__all__ = ["BSRConfig", "bsr_state", "kept_patch_indices", "parse_blocks", "record_kept_tokens", "reprogram",
           "restore", "summary"]
