"""Token scoring, selection, gathering and fusing: the pure tensor functions behind BSR's token dropping.

Sarkar et al., "Block Selective Reprogramming for On-device Training of Vision Transformers" (arXiv 2405.10951),
following EViT (Liang et al., ICLR 2022): at a drop block every patch token gets a score from the block's attention;
the `k` best are kept and the rest are dropped or fused into one extra token.

Prefix tokens: the P tokens timm puts before the patches (the class token, then register tokens; P may be 0). They
are never scored, dropped or fused, and stay at the front. Two scores (`score_rule`):
- `cls` (the paper's): the class token's attention to each patch token, averaged over heads. The class token's output
  is the attention-weighted sum of the values, so this is each token's share of what the head reads.
- `mean`, for models whose head does not read a class token (average pooling, attention pooling, or no class token):
  the attention each patch token receives, averaged over all queries and heads. With average pooling the pooled output
  of an attention layer is the mean over queries of the attention-weighted values, so this is, exactly, each token's
  share of that mean: the same quantity the `cls` score is for a class-token head. The fused token is then the sum of
  the dropped tokens weighted by their scores (their share of the pooled attention output), as with `cls`.

Shapes: B batch, H heads, N tokens (prefix included), P prefix tokens, n = N - P patch tokens (fused token included
once one exists), D head width, C embedding width, k kept tokens.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

SCORE_RULES = ("cls", "mean")


def kept_count(num_tokens: int, keep_rate: float, prefix: int = 1) -> int:
    """Number of patch tokens kept out of `num_tokens` (with `prefix` prefix tokens): ceil(keep_rate * (N - P)).

    The product is rounded to 9 decimals first so that e.g. 0.7 * 10 keeps 7 tokens, not 8.
    """
    return math.ceil(round(keep_rate * (num_tokens - prefix), 9))


def token_counts(num_tokens: int, depth: int, drop_blocks: Sequence[int], keep_rate: float,
                 fuse_token: bool, prefix: int = 1) -> list[tuple[int, int]]:
    """Tokens seen by the attention and by the MLP of every block: a list of `depth` pairs `(attn, mlp)`.

    `num_tokens` counts the `prefix` tokens. A fused token is appended only when something was dropped, and counts as
    an ordinary token at later drop blocks.
    """
    counts, n_tokens, drops = [], num_tokens, set(drop_blocks) if keep_rate < 1.0 else set()
    for i in range(depth):
        attn_tokens = n_tokens
        if i in drops:
            k = kept_count(n_tokens, keep_rate, prefix)
            dropped = n_tokens - prefix - k
            n_tokens = prefix + k + (1 if fuse_token and dropped > 0 else 0)
        counts.append((attn_tokens, n_tokens))
    return counts


def cls_attention_scores(q: Tensor, k: Tensor, scale: float, prefix: int = 1) -> Tensor:
    """Head-averaged attention probability from the class token (position 0) to every patch token.

    Only the class row of the attention is computed: O(N) per head, never an N x N matrix.
    q, k: (B, H, N, D) -> (B, N - P), float32.
    """
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
    probs = logits.float().softmax(dim=-1)
    return probs.mean(dim=1)[:, 0, prefix:]  # (B, N - P)


def mean_attention_scores(q: Tensor, k: Tensor, scale: float, prefix: int = 0, chunk: int = 0) -> Tensor:
    """Attention probability each patch token receives, averaged over all N queries and the H heads.

    Computed `chunk` queries at a time (default: D, so no step holds more than a q-sized (B, H, D, N) block), never
    the N x N matrix at once. q, k: (B, H, N, D) -> (B, N - P), float32; with P = 0 each row sums to 1.
    """
    B, H, N, D = q.shape
    chunk = chunk or max(D, 1)
    kt = k.transpose(-2, -1)
    received = None
    for start in range(0, N, chunk):
        probs = ((q[:, :, start:start + chunk] * scale) @ kt).float().softmax(dim=-1)  # (B, H, c, N)
        part = probs.sum(dim=(1, 2))
        received = part if received is None else received + part
    return received[:, prefix:] / (H * N)


def attention_probs_scores(probs: Tensor, rule: str, prefix: int) -> Tensor:
    """The scores of `rule` from an attention already materialised (the non-fused path). probs: (B, H, N, N)."""
    probs = probs.float()
    if rule == "cls":
        return probs[:, :, 0, prefix:].mean(dim=1)
    return probs.mean(dim=(1, 2))[:, prefix:]


def select_tokens(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Split the patch tokens into the `k` highest-scoring and the rest.

    scores: (B, n) -> (keep_idx (B, k), drop_idx (B, n - k)), both int64 and in ascending token order (so the kept
    tokens keep their original order). Ties are broken towards the earlier token.
    """
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (B, n)
    keep_idx = order[:, :k].sort(dim=1).values
    drop_idx = order[:, k:].sort(dim=1).values
    return keep_idx, drop_idx


def select_tokens_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`select_tokens` with ops ONNX has: `TopK` breaks ties towards the lower index, as the stable sort does, and a
    second `TopK` puts each set back in ascending order. `n` is read as a constant (static while exporting)."""
    n = int(scores.shape[1])
    order = torch.topk(scores, n, dim=1, largest=True, sorted=True).indices  # (B, n), best first
    keep_idx = torch.topk(order[:, :k], k, dim=1, largest=False, sorted=True).values
    drop_idx = torch.topk(order[:, k:], n - k, dim=1, largest=False, sorted=True).values
    return keep_idx, drop_idx


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Pick tokens by index along dim 1. x: (B, M, C), idx: (B, K) -> (B, K, C).

    Advanced indexing saves only the indices for backward; `torch.gather` would also keep all of `x` alive.
    """
    return x[torch.arange(x.shape[0], device=x.device).unsqueeze(1), idx]


def gather_tokens_static(x: Tensor, idx: Tensor) -> Tensor:
    """`gather_tokens` as one ONNX `GatherElements` with a dynamic batch. x: (B, M, C), idx: (B, K) -> (B, K, C)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def fuse_tokens(x: Tensor, weights: Tensor) -> Tensor:
    """One token: the sum of `x`'s tokens, each weighted by its (not renormalised) weight.

    x: (B, M, C), weights: (B, M) -> (B, 1, C).
    """
    return torch.bmm(weights.unsqueeze(1).to(x.dtype), x)


def drop_tokens(x: Tensor, scores: Tensor, keep_rate: float, fuse: bool, prefix: int = 1,
                static: bool = False) -> tuple[Tensor, Tensor]:
    """Keep the `prefix` tokens and the best `ceil(keep_rate * (N - P))` patch tokens of `x`; optionally append the
    fused rest.

    x: (B, N, C) with the prefix tokens first, scores: (B, N - P) -> (x' (B, P + k [+ 1], C), keep_idx (B, k)).
    `keep_idx` indexes the patch tokens of `x` (0 is the token right after the prefix). `static`: the same result
    with ops ONNX has (`select_tokens_topk`, `gather_tokens_static`), for export.
    """
    k = kept_count(int(x.shape[1]), keep_rate, prefix)  # int: a constant while exporting
    select, gather = (select_tokens_topk, gather_tokens_static) if static else (select_tokens, gather_tokens)
    keep_idx, drop_idx = select(scores.detach(), k)
    parts = [x[:, :prefix], gather(x, keep_idx + prefix)]
    if fuse and drop_idx.shape[1] > 0:
        weights = torch.gather(scores, 1, drop_idx)
        parts.append(fuse_tokens(gather(x, drop_idx + prefix), weights))
    return torch.cat(parts, dim=1), keep_idx


def scores_without_gradient(scores: Tensor) -> Tensor:
    """`scores.detach()` that survives the ONNX export (the exporter drops `detach`): ORT's gradient builder stops at a
    Cast to an integer type, so the values make a round trip through int64 scaled by 2^60, exact for every float32 in
    [2^-36, 1] (both scores are probabilities) and off by at most 2^-60 below."""
    return (scores * 2.0 ** 60).to(torch.int64).to(scores.dtype) * 2.0 ** -60
