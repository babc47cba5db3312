"""The drop step shared by every host family: what a drop block does between its attention and its MLP.

A drop block carries its settings as attributes (set by `bsr.core.patch.reprogram`, removed by `restore`):
`_bsr_keep_rate`, `_bsr_fuse`, `_bsr_drop_in_eval`, `_bsr_score_grad`, `_bsr_score` (the resolved rule, `cls` or
`mean`), `_bsr_prefix` (the model's prefix tokens), and on an export copy `_bsr_static` (ONNX-expressible ops).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import BSRError
from .ops import drop_tokens, gather_tokens_static, scores_without_gradient

_STATE = "_bsr_state"  # the attribute holding a reprogrammed model's patch state (`bsr.core.patch._PatchState`)
DROP_ATTRS = ("_bsr_keep_rate", "_bsr_fuse", "_bsr_drop_in_eval", "_bsr_score_grad", "_bsr_score", "_bsr_prefix",
              "_bsr_static", "_bsr_recorder")


def refuse_masks(attn_mask: Optional[Tensor], is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise BSRError("attention masks / causal attention are not supported by BSR token dropping; "
                       "call bsr.restore(model) to run the host model with a mask")


def is_dropping(blk: nn.Module) -> bool:
    """Whether `blk` is a drop block that drops in its current mode (training, or eval with `drop_in_eval`)."""
    return hasattr(blk, "_bsr_keep_rate") and (blk.training or blk._bsr_drop_in_eval)


def scores_need_grad(blk: nn.Module) -> bool:
    """Whether the scores of `blk` carry a gradient (into the fused token's weights)."""
    if getattr(blk, "_bsr_static", False):  # an export copy: eval graphs have no gradient at all
        return blk._bsr_score_grad and blk.training
    return blk._bsr_score_grad


def drop_step(blk: nn.Module, x: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Keep the prefix and the best patch tokens of `x` by `scores` (`bsr.core.ops.drop_tokens`), record the kept
    indices if `record_kept_tokens` asks. x: (B, N, C), scores: (B, N - P) -> (x', keep_idx (B, k))."""
    static = getattr(blk, "_bsr_static", False)
    if static and blk.training and not blk._bsr_score_grad:
        scores = scores_without_gradient(scores)  # the ORT training graph: no gradient through the scores
    x, keep_idx = drop_tokens(x, scores, blk._bsr_keep_rate, blk._bsr_fuse, blk._bsr_prefix, static)
    recorder = getattr(blk, "_bsr_recorder", None)
    if recorder is not None:
        recorder.append(keep_idx if static else keep_idx.detach())
    return x, keep_idx


def follow_positions(table: Optional[Tensor], keep_idx: Tensor, fused: bool) -> Optional[Tensor]:
    """A per-patch-token rotary table (`[sin, cos]` concatenated) after a drop: the kept tokens' rows, then for a
    fused token the identity rotation (sin 0, cos 1): it stands for no single position, like a prefix token.

    table: (n, 2R) or (B, 1, n, 2R), keep_idx: (B, k) -> (B, 1, k [+ 1], 2R); None stays None.
    """
    if table is None:
        return None
    rows = table.unsqueeze(0).expand(keep_idx.shape[0], -1, -1) if table.dim() == 2 else table[:, 0]
    kept = gather_tokens_static(rows, keep_idx)
    if fused:
        half = rows.shape[-1] // 2
        identity = torch.cat([rows.new_zeros(half), rows.new_ones(half)]).expand(keep_idx.shape[0], 1, -1)
        kept = torch.cat([kept, identity], dim=1)
    return kept.unsqueeze(1)
