"""Token scoring, selection, gathering and fusing: the pure tensor functions behind BSR's token dropping.

Sarkar et al., "Block Selective Reprogramming for On-device Training of Vision Transformers" (arXiv 2405.10951),
following EViT (Liang et al., ICLR 2022): at a drop block the CLS token's attention, averaged over heads, scores every
other token; the `k` best are kept and the rest are dropped or fused into one extra token.

Shapes: B batch, H heads, N tokens including CLS (always at position 0), n = N - 1 non-CLS tokens, D head width,
C embedding width, k kept tokens.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def kept_count(num_tokens: int, keep_rate: float) -> int:
    """Number of non-CLS tokens kept out of a sequence of `num_tokens` (CLS included): ceil(keep_rate * (N - 1)).

    The product is rounded to 9 decimals first so that e.g. 0.7 * 10 keeps 7 tokens, not 8.
    """
    return math.ceil(round(keep_rate * (num_tokens - 1), 9))


def token_counts(num_tokens: int, depth: int, drop_blocks: Sequence[int], keep_rate: float,
                 fuse_token: bool) -> list[tuple[int, int]]:
    """Tokens seen by the attention and by the MLP of every block: a list of `depth` pairs `(attn, mlp)`.

    `num_tokens` counts CLS. A fused token is appended only when something was dropped, and counts as an ordinary
    token at later drop blocks.
    """
    counts, n_tokens, drops = [], num_tokens, set(drop_blocks) if keep_rate < 1.0 else set()
    for i in range(depth):
        attn_tokens = n_tokens
        if i in drops:
            k = kept_count(n_tokens, keep_rate)
            dropped = n_tokens - 1 - k
            n_tokens = 1 + k + (1 if fuse_token and dropped > 0 else 0)
        counts.append((attn_tokens, n_tokens))
    return counts


def cls_attention_scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Head-averaged attention probability from the CLS query to every other token.

    Only the CLS row of the attention is computed: O(N) per head, never an N x N matrix.
    q, k: (B, H, N, D) -> (B, N - 1), float32, each row summing to 1 minus the CLS self-attention.
    """
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
    probs = logits.float().softmax(dim=-1)
    return probs.mean(dim=1)[:, 0, 1:]  # (B, N - 1)


def select_tokens(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Split the non-CLS tokens into the `k` highest-scoring and the rest.

    scores: (B, n) -> (keep_idx (B, k), drop_idx (B, n - k)), both int64 and in ascending token order (so the kept
    tokens keep their original order). Ties are broken towards the earlier token.
    """
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (B, n)
    keep_idx = order[:, :k].sort(dim=1).values
    drop_idx = order[:, k:].sort(dim=1).values
    return keep_idx, drop_idx


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Pick tokens by index along dim 1. x: (B, M, C), idx: (B, K) -> (B, K, C).

    Advanced indexing saves only the indices for backward; `torch.gather` would also keep all of `x` alive.
    """
    return x[torch.arange(x.shape[0], device=x.device).unsqueeze(1), idx]


def fuse_tokens(x: Tensor, weights: Tensor) -> Tensor:
    """One token: the sum of `x`'s tokens, each weighted by its (not renormalised) weight.

    x: (B, M, C), weights: (B, M) -> (B, 1, C).
    """
    return torch.bmm(weights.unsqueeze(1).to(x.dtype), x)


def drop_tokens(x: Tensor, scores: Tensor, keep_rate: float, fuse: bool) -> tuple[Tensor, Tensor]:
    """Keep CLS and the best `ceil(keep_rate * (N - 1))` tokens of `x`; optionally append the fused rest.

    x: (B, N, C) with CLS at 0, scores: (B, N - 1) -> (x' (B, 1 + k [+ 1], C), keep_idx (B, k)). `keep_idx` indexes
    the non-CLS tokens of `x` (0 is the token right after CLS).
    """
    k = kept_count(x.shape[1], keep_rate)
    keep_idx, drop_idx = select_tokens(scores.detach(), k)
    parts = [x[:, :1], gather_tokens(x, keep_idx + 1)]  # + 1: the indices skip CLS
    if fuse and drop_idx.shape[1] > 0:
        parts.append(fuse_tokens(gather_tokens(x, drop_idx + 1), gather_tokens(scores.unsqueeze(-1), drop_idx)[..., 0]))
    return torch.cat(parts, dim=1), keep_idx
