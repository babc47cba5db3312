"""BSR on timm's `VisionTransformer` (ViT, DeiT, DeiT-III, DINOv2 with or without registers, SigLIP, ...): the
drop block and the model class `bsr.core.patch.reprogram` swaps in (their `__class__`, so state dicts are unchanged)."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .attention import vit_attention_with_scores
from .drop import _STATE, drop_step, is_dropping, refuse_masks, scores_need_grad


class BSRBlock(Block):
    """A timm `Block` that drops tokens between its attention and its MLP.

    Changes against the host: after `x + attn(norm1(x))`, only the prefix tokens (class, registers), the
    `ceil(keep_rate * (N - P))` patch tokens with the highest scores and (with `fuse_token`) one token fusing the rest
    reach the MLP and the later blocks. Dropping is skipped in eval mode when `drop_in_eval` is off. Attention masks
    are refused.
    """

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        refuse_masks(attn_mask, is_causal)
        return mlp_residual(self, attn_residual(self, x))


def attn_residual(blk: Block, x: Tensor) -> Tensor:
    """First half of a timm `Block`: `x + attn(norm1(x))`, then token dropping if `blk` is a dropping drop block.

    x: (B, N, C) -> (B, N, C), or (B, P + k [+ 1], C) after dropping.
    """
    if not is_dropping(blk):
        return x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
    a, scores = vit_attention_with_scores(blk.attn, blk.norm1(x), blk._bsr_score, blk._bsr_prefix,
                                          scores_need_grad(blk))
    return drop_step(blk, x + blk.drop_path1(blk.ls1(a)), scores)[0]


def mlp_residual(blk: Block, x: Tensor) -> Tensor:
    """Second half of a timm `Block`: `x + mlp(norm2(x))`. x: (B, N, C) -> (B, N, C)."""
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def frozen_prefix(model, first: int):
    """`torch.no_grad()` when the patch embedding, its norm, the class/register tokens, the position embedding and the
    blocks before `first` need no gradient (they then keep no activations), else a null context. For every host."""
    modules = [model.patch_embed, model.norm_pre, *model.blocks[:first]]
    frozen = not any(p.requires_grad for m in modules for p in m.parameters()) and not any(
        p is not None and p.requires_grad for p in (model.cls_token, model.pos_embed, model.reg_token))
    return torch.no_grad() if frozen else contextlib.nullcontext()


def recomputed(resolved, rest: int) -> int:
    """How many of the `rest` blocks after the frozen prefix run under `torch.utils.checkpoint` (none without grad)."""
    return {"none": 0, "first": 1, "all": rest}[resolved.recompute] if torch.is_grad_enabled() else 0


class BSRVisionTransformer(VisionTransformer):
    """A timm `VisionTransformer` whose frozen prefix runs without autograd, optionally recomputing the rest.

    Changes against the host `forward_features`: the patch embedding and the blocks before the first trainable block
    run under `torch.no_grad()` while none of their parameters needs a gradient; the remaining blocks run as in timm
    (`checkpoint_seq` when timm's gradient checkpointing is on), or each under `torch.utils.checkpoint` per the
    `recompute` option. Attention masks are refused.
    """

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        refuse_masks(attn_mask, is_causal)
        resolved = getattr(self, _STATE).resolved
        first = resolved.first_trainable
        with frozen_prefix(self, first):
            x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
            for blk in self.blocks[:first]:
                x = blk(x)
        rest = self.blocks[first:]
        recompute = recomputed(resolved, len(rest))
        if self.grad_checkpointing and not torch.jit.is_scripting() and len(rest) > 0:
            x = checkpoint_seq(rest, x)
        else:
            for i, blk in enumerate(rest):
                if i < recompute:  # attention and MLP halves apart: backward holds one half's activations at a time
                    x = checkpoint(attn_residual, blk, x, use_reentrant=False)
                    x = checkpoint(mlp_residual, blk, x, use_reentrant=False)
                else:
                    x = blk(x)
        return self.norm(x)
