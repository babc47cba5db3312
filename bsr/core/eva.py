"""BSR on timm's `Eva` family (EVA-02, Perception Encoder, ...: rotary position embedding, SwiGLU MLPs, their own
attention modules): the drop block and the model class `bsr.core.patch.reprogram` swaps in.

The rotary embedding follows the kept tokens: timm computes one table of per-patch rotations per forward and hands it
to every block; after a drop block the table holds, per image, the rows of the kept tokens (as timm's own patch
dropout does at the input), and for a fused token the identity rotation (`bsr.core.drop.follow_positions`). The model
class threads the table through the blocks, which timm's loop cannot do once it differs between images.
"""

from __future__ import annotations

from typing import Optional

import torch
from timm.models.eva import Eva, EvaBlock
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .attention import eva_attention_with_scores
from .drop import _STATE, drop_step, follow_positions, is_dropping, refuse_masks, scores_need_grad
from .vit import frozen_prefix, recomputed


def eva_attn_residual(blk: EvaBlock, x: Tensor, rope: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """First half of an `EvaBlock`: `x + gamma_1 * attn(norm1(x), rope)`, then token dropping if `blk` drops; returns
    the tokens and the rotary table for the blocks after it. x: (B, N, C) -> (B, N or P + k [+ 1], C)."""
    if not is_dropping(blk):
        a = blk.attn(blk.norm1(x), rope=rope)
        return x + blk.drop_path1(a if blk.gamma_1 is None else blk.gamma_1 * a), rope
    a, scores = eva_attention_with_scores(blk.attn, blk.norm1(x), rope, blk._bsr_score, blk._bsr_prefix,
                                          scores_need_grad(blk))
    x, keep_idx = drop_step(blk, x + blk.drop_path1(a if blk.gamma_1 is None else blk.gamma_1 * a), scores)
    fused = x.shape[1] > blk._bsr_prefix + keep_idx.shape[1]
    return x, follow_positions(rope, keep_idx, fused)


def eva_mlp_residual(blk: EvaBlock, x: Tensor) -> Tensor:
    """Second half of an `EvaBlock`: `x + gamma_2 * mlp(norm2(x))`. x: (B, N, C) -> (B, N, C)."""
    m = blk.mlp(blk.norm2(x))
    return x + blk.drop_path2(m if blk.gamma_2 is None else blk.gamma_2 * m)


def eva_block(blk: EvaBlock, x: Tensor, rope: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """A whole block called as a module (its hooks run), returning the rotary table for the next block."""
    if isinstance(blk, BSREvaBlock):
        return blk(x, rope=rope, return_rope=True)
    return blk(x, rope=rope), rope


class BSREvaBlock(EvaBlock):
    """A timm `EvaBlock` that drops tokens between its attention and its MLP (see `bsr.core.vit.BSRBlock`).

    Changes against the host: token dropping, and with `return_rope` (what `BSREva` passes) the output is the pair
    (tokens, rotary table for the next block).
    """

    def forward(self, x: Tensor, rope: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                is_causal: bool = False, return_rope: bool = False):
        refuse_masks(attn_mask, is_causal)
        x, rope = eva_attn_residual(self, x, rope)
        x = eva_mlp_residual(self, x)
        return (x, rope) if return_rope else x


class BSREva(Eva):
    """A timm `Eva` whose blocks hand the rotary table on through the drops, whose frozen prefix runs without
    autograd, optionally recomputing the rest.

    Changes against the host `forward_features`: the rotary table follows the kept tokens; the patch embedding and
    the blocks before the first trainable block run under `torch.no_grad()` while none of their parameters needs a
    gradient; the other blocks run as in timm (whole blocks under `checkpoint` when timm's gradient checkpointing is
    on) or under `torch.utils.checkpoint` per the `recompute` option. Attention masks are refused; depth-dependent
    rotary tables (`rope_type='mixed'`) are refused by `reprogram`.
    """

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        refuse_masks(attn_mask, is_causal)
        resolved = getattr(self, _STATE).resolved
        first = resolved.first_trainable
        with frozen_prefix(self, first):
            x, rope = self._pos_embed(self.patch_embed(x))
            x = self.norm_pre(x)
            for blk in self.blocks[:first]:
                x, rope = eva_block(blk, x, rope)
        rest = self.blocks[first:]
        recompute = recomputed(resolved, len(rest))
        whole = self.grad_checkpointing and not torch.jit.is_scripting()
        for i, blk in enumerate(rest):
            if whole:
                x, rope = checkpoint(eva_block, blk, x, rope, use_reentrant=False)
            elif i < recompute:  # attention and MLP halves apart, as for ViT
                x, rope = checkpoint(eva_attn_residual, blk, x, rope, use_reentrant=False)
                x = checkpoint(eva_mlp_residual, blk, x, use_reentrant=False)
            else:
                x, rope = eva_block(blk, x, rope)
        return self.norm(x)
