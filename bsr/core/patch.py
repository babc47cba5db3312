"""Block Selective Reprogramming as an in-place, reversible patch on timm's `VisionTransformer` and `Eva`.

Sarkar, Kundu, Zheng, Beerel, "Block Selective Reprogramming for On-device Training of Vision Transformers"
(arXiv 2405.10951). `reprogram(model, config)` freezes every parameter except those of the trainable blocks, the
final norm and the head, and makes the drop blocks keep only the patch tokens their attention ranks highest (the
class token's attention, or for heads that do not read a class token the attention each token receives:
`bsr.core.ops`). The patch swaps the `__class__` of the model and of the drop blocks for subclasses (like ToMe's timm
patch; `bsr.core.vit`, `bsr.core.eva`), so `state_dict` keys, parameters and hooks stay exactly as they were;
`restore(model)` swaps them back.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Optional

import torch
from timm.layers import Attention, AttentionRope
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from ..errors import BSRError
from .config import BSRConfig, ResolvedBSR
from .drop import _STATE, DROP_ATTRS
from .eva import BSREva, BSREvaBlock
from .frozen import restore_frozen_linears, store_frozen_linears
from .ops import token_counts
from .vit import BSRBlock, BSRVisionTransformer

HOSTS = (VisionTransformer, Eva)
POOLS = ("token", "avg", "map")  # the heads token dropping keeps valid: the class token, an average, attention pooling


@dataclass
class _PatchState:
    """What `reprogram` changed, so that `restore` can undo it exactly."""

    resolved: ResolvedBSR
    model_class: type
    block_classes: dict[int, type]
    requires_grad: dict[str, bool]
    linear_dtypes: dict[str, torch.dtype]  # frozen Linears whose weight now lives in `frozen_dtype`


def _check_host_type(model: nn.Module) -> None:
    """Refuse anything but an unpatched timm VisionTransformer or Eva."""
    if hasattr(model, _STATE):
        raise BSRError("model is already reprogrammed; call bsr.restore(model) before reprogramming it again")
    if not isinstance(model, HOSTS):
        raise BSRError(f"bsr needs a timm VisionTransformer (ViT, DeiT, DINOv2, SigLIP, ...) or Eva (EVA-02, "
                       f"Perception Encoder), got {type(model).__name__}; build one with timm.create_model('vit_...') "
                       f"or fine-tune this model with --method full, lora or bitfit")


def has_class_token(model: nn.Module) -> bool:
    return getattr(model, "cls_token", None) is not None


def prefix_description(model: nn.Module) -> str:
    """The prefix tokens in words: "1 class + 4 registers", "none"."""
    registers = model.num_prefix_tokens - int(has_class_token(model))
    parts = (["1 class"] if has_class_token(model) else []) + ([f"{registers} registers"] if registers else [])
    return " + ".join(parts) or "none"


def _check_blocks(model: nn.Module) -> None:
    """Refuse blocks and attention modules the patch does not reimplement, naming the option that builds them."""
    eva = isinstance(model, Eva)
    block_type, attn_types = (EvaBlock, (EvaAttention, AttentionRope)) if eva else (Block, (Attention,))
    for i, blk in enumerate(model.blocks):
        if type(blk) is not block_type:
            raise BSRError(f"block {i} is a {type(blk).__name__}; bsr supports timm's pre-norm {block_type.__name__} "
                           f"only (not post-norm or parallel blocks); fine-tune this model with --method full, "
                           f"lora or bitfit")
        if type(blk.attn) not in attn_types:
            raise BSRError(f"block {i} uses {type(blk.attn).__name__}; bsr supports timm's "
                           f"{' / '.join(t.__name__ for t in attn_types)} only; fine-tune this model with --method "
                           f"full, lora or bitfit")
    if eva and getattr(model, "rope_mixed", False):
        raise BSRError("model uses a depth-dependent rotary embedding (rope_type='mixed'), which bsr does not patch; "
                       "use a model with rope_type 'cat' (EVA-02, Perception Encoder) or --method full, lora or "
                       "bitfit")


def _check_dropping(model: nn.Module, resolved: ResolvedBSR) -> None:
    """Refuse token dropping where its result would be wrong or empty, naming the fix."""
    pool = model.global_pool
    if pool not in POOLS:
        raise BSRError(f"model pools with global_pool={pool!r}; token dropping keeps valid only a class-token, "
                       f"average or attention-pool head (global_pool 'token', 'avg' or 'map'); rebuild the model with "
                       f"one of them or use keep_rate=1")
    if resolved.token_score == "cls" and not has_class_token(model):
        raise BSRError("token_score='cls' needs a class token, and this model has none; use token_score='mean' "
                       "(or 'auto')")
    patches = model.patch_embed.num_patches
    if patches < 2:
        raise BSRError(f"model has {patches} patch token(s) besides its prefix tokens ({prefix_description(model)}); "
                       f"token dropping needs at least 2; use a larger img_size or keep_rate=1")


def _trainable_modules(model: nn.Module, resolved: ResolvedBSR) -> list[nn.Module]:
    """The modules BSR trains: the trainable blocks, the final norms, the attention pool and the head."""
    modules = [model.blocks[i] for i in resolved.trainable_blocks]
    tail = (getattr(model, name, None) for name in ("norm", "fc_norm", "attn_pool", "head"))
    return modules + [m for m in tail if m is not None]


def resolve_for(model: nn.Module, config: BSRConfig) -> ResolvedBSR:
    """`config` resolved for `model`: explicit block lists; `recompute="auto"` made concrete (`first` when the first
    trainable block's MLP is a mixture of experts, `bsr.core.moe.MoEMlp`, recognised by its `num_experts`, whose top-k
    experts keep k times a dense MLP's activations, else `none`); `token_score="auto"` made concrete (`cls` when the
    head reads the class token, else `mean`)."""
    resolved = config.resolve(len(model.blocks))
    if resolved.recompute == "auto":
        first = resolved.first_trainable
        mixture = first < resolved.depth and hasattr(model.blocks[first].mlp, "num_experts")
        resolved = replace(resolved, recompute="first" if mixture else "none")
    if resolved.token_score == "auto":
        reads_cls = has_class_token(model) and getattr(model, "global_pool", "token") == "token"
        resolved = replace(resolved, token_score="cls" if reads_cls else "mean")
    return resolved


def reprogram(model: nn.Module, config: Optional[BSRConfig] = None) -> nn.Module:
    """Patch a timm `VisionTransformer` or `Eva` in place for BSR and return it.

    Freezes everything except the trainable blocks, the final norm(s), the attention pool and the head (and with
    `train_patch_embed` the patch embedding and its norm, position embedding, class and register tokens); installs
    token dropping at the drop blocks (prefix tokens: class and registers, never dropped); runs the frozen prefix
    without autograd.
    `state_dict` keys are unchanged. With `keep_rate=1` and `trainable_blocks="all"` the model keeps the host's exact
    forward. Undo with `restore(model)`.
    """
    config = config or BSRConfig()
    _check_host_type(model)
    resolved = resolve_for(model, config)
    _check_blocks(model)
    if resolved.drop_blocks:
        _check_dropping(model, resolved)

    state = _PatchState(resolved=resolved, model_class=type(model), block_classes={},
                        requires_grad={name: p.requires_grad for name, p in model.named_parameters()},
                        linear_dtypes={})
    # Freeze by structure: everything off, then the trainable modules on.
    for p in model.parameters():
        p.requires_grad_(False)
    for module in _trainable_modules(model, resolved):
        for p in module.parameters():
            p.requires_grad_(True)
    if resolved.train_patch_embed:
        for p in [*model.patch_embed.parameters(), *model.norm_pre.parameters(), model.cls_token, model.pos_embed,
                  model.reg_token]:
            if p is not None:
                p.requires_grad_(True)

    eva = isinstance(model, Eva)
    for i in resolved.drop_blocks:
        blk = model.blocks[i]
        state.block_classes[i] = type(blk)
        blk.__class__ = BSREvaBlock if eva else BSRBlock
        blk._bsr_keep_rate, blk._bsr_fuse = resolved.keep_rate, resolved.fuse_token
        blk._bsr_drop_in_eval, blk._bsr_score_grad = resolved.drop_in_eval, resolved.score_grad
        blk._bsr_score, blk._bsr_prefix = resolved.token_score, model.num_prefix_tokens
    if resolved.frozen_dtype != "float32":
        state.linear_dtypes = store_frozen_linears(model, resolved.trainable_blocks, resolved.frozen_dtype)
    if resolved.first_trainable > 0 or resolved.recompute != "none" or (eva and resolved.drop_blocks):
        model.__class__ = BSREva if eva else BSRVisionTransformer
    setattr(model, _STATE, state)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo `reprogram`: original classes, `requires_grad` flags and weight dtypes. Parameters (trained or not) are
    kept; weights stored in a lower `frozen_dtype` come back rounded to it (int8: on its per-row grid, exactly)."""
    state: Optional[_PatchState] = getattr(model, _STATE, None)
    if state is None:
        raise BSRError("model is not reprogrammed by bsr; nothing to restore")
    for i, cls in state.block_classes.items():
        blk = model.blocks[i]
        blk.__class__ = cls
        for name in DROP_ATTRS:
            blk.__dict__.pop(name, None)
    restore_frozen_linears(model, state.linear_dtypes)
    model.__class__ = state.model_class
    for name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, p.requires_grad))
    delattr(model, _STATE)
    return model


def set_keep_rate(model: nn.Module, keep_rate: float) -> None:
    """Change the keep rate of every drop block of a reprogrammed model (e.g. a keep-rate warm-up), in (0, 1]. The
    resolved config keeps its target rate; this sets what the next forward uses."""
    state: Optional[_PatchState] = getattr(model, _STATE, None)
    if state is None:
        raise BSRError("model is not reprogrammed by bsr; call bsr.reprogram(model, config) first")
    if not 0.0 < keep_rate <= 1.0:
        raise BSRError(f"keep_rate={keep_rate} is outside (0, 1]")
    for i in state.resolved.drop_blocks:
        model.blocks[i]._bsr_keep_rate = float(keep_rate)


def bsr_state(model: nn.Module) -> Optional[ResolvedBSR]:
    """The resolved BSR configuration of a reprogrammed model, or None."""
    state = getattr(model, _STATE, None)
    return state.resolved if state is not None else None


@contextlib.contextmanager
def record_kept_tokens(model: nn.Module):
    """Collect, per drop block, the indices of the kept tokens of every forward inside the block.

    Yields a dict {block index: list of (B, k) index tensors}; index 0 is the first patch token (after the class and
    register tokens) *in that block's input*
    (compose them through successive drop blocks to map back to image patches, see `kept_patch_indices`). Meant for
    inference: with `recompute` on, a training step's backward records its recomputed forward again.
    """
    state = getattr(model, _STATE, None)
    if state is None:
        raise BSRError("model is not reprogrammed by bsr; call bsr.reprogram(model, config) first")
    records: dict[int, list[Tensor]] = {i: [] for i in state.resolved.drop_blocks}
    try:
        for i in records:
            model.blocks[i]._bsr_recorder = records[i]
        yield records
    finally:
        for i in records:
            model.blocks[i].__dict__.pop("_bsr_recorder", None)


def kept_patch_indices(per_block: list[Tensor], num_patches: int) -> list[Tensor]:
    """Map the kept indices of successive drop blocks back to image patch indices.

    per_block: list over drop blocks of (B, k_j) indices into that block's patch tokens, as recorded by
    `record_kept_tokens` -> list of (B, k_j) patch indices in [0, num_patches); -1 marks a fused token that was kept
    (it stands for no single patch).
    """
    out: list[Tensor] = []
    current: Optional[Tensor] = None  # (B, n): patch index of every patch token entering the block
    for idx in per_block:
        if current is None:
            current = torch.arange(num_patches, device=idx.device).expand(idx.shape[0], -1)
        n_in = current.shape[1]  # an index >= n_in points at the fused token appended after the kept ones
        kept = torch.gather(current, 1, idx.clamp(max=n_in - 1))
        current = torch.where(idx < n_in, kept, torch.full_like(idx, -1))
        out.append(current)
    return out


@dataclass
class Summary:
    """Trainable/total parameters and the tokens each block's attention and MLP see for an input size."""

    trainable_params: int
    total_params: int
    img_size: tuple[int, int]
    tokens: list[tuple[int, int]]
    trainable_blocks: list[int]
    drop_blocks: list[int]
    prefix_tokens: str = "1 class"
    token_score: Optional[str] = None

    def __str__(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        ranked = self.token_score and self.drop_blocks
        score = f", patch tokens ranked by {self.token_score} attention" if ranked else ""
        lines = [f"trainable params: {self.trainable_params:,} / {self.total_params:,} ({pct:.1f}%)",
                 f"input: {self.img_size[0]}x{self.img_size[1]}",
                 f"prefix tokens (never dropped): {self.prefix_tokens}{score}",
                 "block  train  drop  attn tokens  mlp tokens"]
        for i, (a, m) in enumerate(self.tokens):
            lines.append(f"{i:>5}  {'yes' if i in self.trainable_blocks else '':>5}  "
                         f"{'yes' if i in self.drop_blocks else '':>4}  {a:>11}  {m:>10}")
        return "\n".join(lines)


def summary(model: nn.Module, img_size: Optional[int | tuple[int, int]] = None) -> Summary:
    """Parameters and per-block token counts (prefix tokens included) of a reprogrammed or plain timm
    VisionTransformer or Eva for `img_size` (default: the model's)."""
    if not isinstance(model, HOSTS):
        raise BSRError(f"bsr.summary needs a timm VisionTransformer or Eva, got {type(model).__name__}")
    grid = model.patch_embed.grid_size
    if img_size is not None:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch = model.patch_embed.patch_size
        grid = (size[0] // patch[0], size[1] // patch[1])
    size = (grid[0] * model.patch_embed.patch_size[0], grid[1] * model.patch_embed.patch_size[1])
    num_tokens = grid[0] * grid[1] + model.num_prefix_tokens
    resolved = bsr_state(model)
    depth = len(model.blocks)
    if resolved is None:
        drop, keep, fuse, trainable = [], 1.0, False, list(range(depth))
    else:
        drop, keep, fuse, trainable = (resolved.drop_blocks, resolved.keep_rate, resolved.fuse_token,
                                       resolved.trainable_blocks)
    params = list(model.parameters())
    return Summary(trainable_params=sum(p.numel() for p in params if p.requires_grad),
                   total_params=sum(p.numel() for p in params), img_size=size,
                   tokens=token_counts(num_tokens, depth, drop, keep, fuse, model.num_prefix_tokens),
                   trainable_blocks=list(trainable), drop_blocks=list(drop), prefix_tokens=prefix_description(model),
                   token_score=None if resolved is None else resolved.token_score)
