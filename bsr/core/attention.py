"""The attention of a drop block, also returning the token scores of that same attention.

Each function is the host's attention forward (timm `Attention` of ViTs; `EvaAttention` and `AttentionRope` of timm's
`Eva` family, with their rotary position embedding) plus the scores of `bsr.core.ops`: the output takes the host's
path (fused `scaled_dot_product_attention` when `attn.fused_attn`); on that path the scores never form an N x N matrix
(`cls_attention_scores` computes one row, `mean_attention_scores` a q-sized block at a time); on the non-fused path
they are read from the attention the host computes anyway.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .ops import attention_probs_scores, cls_attention_scores, mean_attention_scores


def _scores(q: Tensor, k: Tensor, scale: float, rule: str, prefix: int, grad: bool) -> Tensor:
    """Scores of `rule` on the fused path. Without `grad` they are computed on detached q, k; with it the `mean`
    scores are recomputed in backward (torch.utils.checkpoint) rather than keeping every query block's softmax."""
    if not grad:
        q, k = q.detach(), k.detach()
    if rule == "cls":
        return cls_attention_scores(q, k, scale, prefix)
    if grad and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad) and not torch.jit.is_tracing():
        return checkpoint(mean_attention_scores, q, k, scale, prefix, use_reentrant=False)
    return mean_attention_scores(q, k, scale, prefix)


def _attend(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, rule: str, prefix: int,
            score_grad: bool) -> tuple[Tensor, Tensor]:
    """Attention output (B, H, N, D) of q, k, v (B, H, N, D) and the scores (B, N - P), on the host's path."""
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
        return out, _scores(q, k, attn.scale, rule, prefix, score_grad)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    scores = attention_probs_scores(probs if score_grad else probs.detach(), rule, prefix)
    return attn.attn_drop(probs) @ v, scores


def _output(attn: nn.Module, x: Tensor, gate: Optional[Tensor]) -> Tensor:
    """The host's tail: heads merged, `norm`, optional gate, projection. x: (B, H, N, D) -> (B, N, C)."""
    B, _, N, _ = x.shape
    x = attn.norm(x.transpose(1, 2).reshape(B, N, -1))
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x))


def vit_attention_with_scores(attn: Attention, x: Tensor, rule: str = "cls", prefix: int = 1,
                              score_grad: bool = True) -> tuple[Tensor, Tensor]:
    """timm `Attention.forward` plus the scores. x: (B, N, C) -> (out (B, N, C_out), scores (B, N - P))."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out, scores = _attend(attn, q, k, v, rule, prefix, score_grad)
    return _output(attn, out, gate), scores


def eva_attention_with_scores(attn: nn.Module, x: Tensor, rope: Optional[Tensor], rule: str = "mean",
                              prefix: int = 1, score_grad: bool = True) -> tuple[Tensor, Tensor]:
    """timm `EvaAttention.forward` / `AttentionRope.forward` plus the scores, rotary embedding applied to the patch
    tokens as the host does. x: (B, N, C), rope: (N - P, 2R) or (B, 1, N - P, 2R) -> (out, scores (B, N - P))."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    heads, kv_heads = attn.num_heads, getattr(attn, "num_kv_heads", attn.num_heads)
    if attn.qkv is not None:
        bias = getattr(attn, "q_bias", None)
        if bias is None:
            qkv = attn.qkv(x)
        elif attn.qkv_bias_separate:
            qkv = attn.qkv(x) + torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        else:
            qkv = F.linear(x, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        q, k, v = qkv.reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = attn.q_proj(x).reshape(B, N, heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out, scores = _attend(attn, q, k, v, rule, prefix, score_grad)
    return _output(attn, out, gate), scores
