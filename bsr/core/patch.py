"""Block Selective Reprogramming as an in-place, reversible patch on timm's `VisionTransformer`.

Sarkar, Kundu, Zheng, Beerel, "Block Selective Reprogramming for On-device Training of Vision Transformers"
(arXiv 2405.10951). `reprogram(model, config)` freezes every parameter except those of the trainable blocks, the
final norm and the head, and makes the drop blocks keep only the tokens their CLS attention ranks highest. The patch
swaps the `__class__` of the model and of the drop blocks for subclasses (like ToMe's timm patch), so `state_dict`
keys, parameters and hooks stay exactly as they were; `restore(model)` swaps them back.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import BSRError
from .config import BSRConfig, ResolvedBSR
from .ops import cls_attention_scores, drop_tokens, token_counts

_STATE = "_bsr_state"


@dataclass
class _PatchState:
    """What `reprogram` changed, so that `restore` can undo it exactly."""

    resolved: ResolvedBSR
    model_class: type
    block_classes: dict[int, type]
    requires_grad: dict[str, bool]
    linear_dtypes: dict[str, torch.dtype]  # frozen Linears whose weight now lives in `frozen_dtype`


def _refuse_masks(attn_mask: Optional[Tensor], is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise BSRError("attention masks / causal attention are not supported by BSR token dropping; "
                       "call bsr.restore(model) to run the host model with a mask")


def attention_with_cls_scores(attn: Attention, x: Tensor, score_grad: bool = True) -> tuple[Tensor, Tensor]:
    """timm `Attention.forward`, also returning the CLS attention scores of the same attention.

    The output takes the host's path (fused `scaled_dot_product_attention` when `attn.fused_attn`); the scores are
    computed from the CLS query row only (`cls_attention_scores`), so no N x N matrix is materialised on the fused path.
    x: (B, N, C) -> (out (B, N, C_out), scores (B, N - 1)).
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, H, N, D) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    scores = cls_attention_scores(q, k, attn.scale) if score_grad else cls_attention_scores(
        q.detach(), k.detach(), attn.scale)

    if attn.fused_attn:
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = attn.attn_drop(probs) @ v
    x = x.transpose(1, 2).reshape(B, N, attn.attn_dim)
    x = attn.norm(x)
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x)), scores


class BSRBlock(Block):
    """A timm `Block` that drops tokens between its attention and its MLP.

    Changes against the host: after `x + attn(norm1(x))`, only CLS, the `ceil(keep_rate * (N - 1))` tokens with the
    highest head-averaged CLS attention and (with `fuse_token`) one token fusing the rest reach the MLP and the later
    blocks. Dropping is skipped in eval mode when `drop_in_eval` is off. Attention masks are refused.
    """

    _bsr_keep_rate: float
    _bsr_fuse: bool
    _bsr_drop_in_eval: bool
    _bsr_score_grad: bool

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        _refuse_masks(attn_mask, is_causal)
        return mlp_residual(self, attn_residual(self, x))

    def dropping(self) -> bool:
        return self.training or self._bsr_drop_in_eval


def attn_residual(blk: Block, x: Tensor) -> Tensor:
    """First half of a timm `Block`: `x + attn(norm1(x))`, then token dropping if `blk` is a dropping `BSRBlock`.

    x: (B, N, C) -> (B, N, C), or (B, 1 + k [+ 1], C) after dropping.
    """
    if not (isinstance(blk, BSRBlock) and blk.dropping()):
        return x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
    a, scores = attention_with_cls_scores(blk.attn, blk.norm1(x), blk._bsr_score_grad)
    x = x + blk.drop_path1(blk.ls1(a))
    x, keep_idx = drop_tokens(x, scores, blk._bsr_keep_rate, blk._bsr_fuse)
    recorder = getattr(blk, "_bsr_recorder", None)
    if recorder is not None:
        recorder.append(keep_idx.detach())
    return x


def mlp_residual(blk: Block, x: Tensor) -> Tensor:
    """Second half of a timm `Block`: `x + mlp(norm2(x))`. x: (B, N, C) -> (B, N, C)."""
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


class _FrozenLinearFn(torch.autograd.Function):
    """y = x W^T + b computed and returned in the dtype of a frozen, low-precision W (bfloat16/float16).

    Saves only W itself (a parameter, already resident) for the input gradient: a plain `F.linear(x, W.float())`
    would keep an fp32 copy of W alive until backward. Computing in W's dtype uses the fast low-precision matmul
    kernels (AVX512-BF16 / AMX on CPUs, tensor cores on GPUs), and the ops after it (attention, GELU) then run and
    save their inputs in that dtype too, as under autocast; the residual stream stays in its own dtype.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.out_dtype = x.dtype
        bias = None if bias is None else bias.to(weight.dtype)
        return F.linear(x.to(weight.dtype), weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (weight,) = ctx.saved_tensors
        return (grad_out.to(weight.dtype) @ weight).to(ctx.out_dtype), None, None


class FrozenLowPrecisionLinear(nn.Linear):
    """A frozen timm/torch `nn.Linear` whose weight is stored, and whose matmul runs, in bfloat16/float16.

    Changes against the host: the weight's dtype; the matmul's input and output dtype (the weight's); no gradient for
    weight or bias (they must be frozen).
    """

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the function picks its own dtypes
            return _FrozenLinearFn.apply(x, self.weight, self.bias)


class BSRVisionTransformer(VisionTransformer):
    """A timm `VisionTransformer` whose frozen prefix runs without autograd, optionally recomputing the rest.

    Changes against the host `forward_features`: the patch embedding and the blocks before the first trainable block
    run under `torch.no_grad()` while none of their parameters needs a gradient; the remaining blocks run as in timm
    (`checkpoint_seq` when timm's gradient checkpointing is on), or each under `torch.utils.checkpoint` per the
    `recompute` option. Attention masks are refused.
    """

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        _refuse_masks(attn_mask, is_causal)
        resolved = getattr(self, _STATE).resolved
        first = resolved.first_trainable
        prefix = [self.patch_embed, self.norm_pre, *self.blocks[:first]]
        prefix_frozen = not any(p.requires_grad for m in prefix for p in m.parameters()) and not any(
            p is not None and p.requires_grad for p in (self.cls_token, self.pos_embed, self.reg_token))
        with torch.no_grad() if prefix_frozen else contextlib.nullcontext():  # frozen prefix: keep no activations
            x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
            for blk in self.blocks[:first]:
                x = blk(x)
        rest = self.blocks[first:]
        recompute = {"none": 0, "first": 1, "all": len(rest)}[resolved.recompute] if torch.is_grad_enabled() else 0
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


def _check_host_type(model: nn.Module) -> None:
    """Refuse anything but an unpatched timm VisionTransformer."""
    if hasattr(model, _STATE):
        raise BSRError("model is already reprogrammed; call bsr.restore(model) before reprogramming it again")
    if not isinstance(model, VisionTransformer):
        raise BSRError(f"bsr needs a timm VisionTransformer (ViT/DeiT/DeiT-III/DINOv2 family), got "
                       f"{type(model).__name__}; build the model with timm.create_model('vit_...')")


def _check_host_features(model: VisionTransformer, resolved: ResolvedBSR) -> None:
    """Refuse host features the patch does not handle, naming the option."""
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            raise BSRError(f"block {i} is a {type(blk).__name__}; bsr supports timm's standard pre-norm Block only "
                           f"(block_fn=Block)")
        if type(blk.attn) is not Attention:
            raise BSRError(f"block {i} uses {type(blk.attn).__name__}; bsr supports timm's standard Attention only "
                           f"(attn_layer='attn')")
    if not model.has_class_token:
        raise BSRError("model has no class token (class_token=False); BSR scores tokens by CLS attention, "
                       "use a model with a class token")
    if resolved.drop_blocks:
        if model.num_reg_tokens:
            raise BSRError(f"model has {model.num_reg_tokens} register tokens (reg_tokens), which token dropping "
                           f"does not handle; use a model without registers or keep_rate=1")
        if model.global_pool != "token" or model.attn_pool is not None:
            raise BSRError(f"model pools with global_pool={model.global_pool!r}; token dropping needs the CLS token "
                           f"head (global_pool='token') or keep_rate=1")


def _trainable_modules(model: VisionTransformer, resolved: ResolvedBSR) -> list[nn.Module]:
    """The modules BSR trains: the trainable blocks, the final norms and the head (chosen by structure)."""
    modules = [model.blocks[i] for i in resolved.trainable_blocks]
    return modules + [m for m in (model.norm, model.fc_norm, model.attn_pool, model.head) if m is not None]


def resolve_for(model: VisionTransformer, config: BSRConfig) -> ResolvedBSR:
    """`config` resolved for `model`: explicit block lists, and `recompute="auto"` made concrete: `first` when the
    first trainable block's MLP is a mixture of experts (`bsr.core.moe.MoEMlp`, recognised by its `num_experts`), whose
    top-k experts keep k times a dense MLP's activations, else `none`."""
    resolved = config.resolve(len(model.blocks))
    if resolved.recompute == "auto":
        first = resolved.first_trainable
        mixture = first < resolved.depth and hasattr(model.blocks[first].mlp, "num_experts")
        resolved = replace(resolved, recompute="first" if mixture else "none")
    return resolved


def reprogram(model: nn.Module, config: Optional[BSRConfig] = None) -> VisionTransformer:
    """Patch a timm `VisionTransformer` in place for BSR and return it.

    Freezes everything except the trainable blocks, the final norm(s) and the head (and with `train_patch_embed` the
    patch embedding, position embedding and CLS token); installs token dropping at the
    drop blocks; runs the frozen prefix without autograd. `state_dict` keys are unchanged. With `keep_rate=1` and
    `trainable_blocks="all"` the model keeps the host's exact forward. Undo with `restore(model)`.
    """
    config = config or BSRConfig()
    _check_host_type(model)
    resolved = resolve_for(model, config)
    _check_host_features(model, resolved)

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
        for p in [*model.patch_embed.parameters(), model.cls_token, model.pos_embed]:
            if p is not None:
                p.requires_grad_(True)

    for i in resolved.drop_blocks:
        blk = model.blocks[i]
        state.block_classes[i] = type(blk)
        blk.__class__ = BSRBlock
        blk._bsr_keep_rate, blk._bsr_fuse = resolved.keep_rate, resolved.fuse_token
        blk._bsr_drop_in_eval, blk._bsr_score_grad = resolved.drop_in_eval, resolved.score_grad
    if resolved.frozen_dtype != "float32":
        _store_frozen_linears(model, resolved, state)
    if resolved.first_trainable > 0 or resolved.recompute != "none":
        model.__class__ = BSRVisionTransformer
    setattr(model, _STATE, state)
    return model


def _store_frozen_linears(model: VisionTransformer, resolved: ResolvedBSR, state: _PatchState) -> None:
    """Move the weights of the frozen blocks' Linears to `frozen_dtype` and compute them on the fly."""
    dtype = getattr(torch, resolved.frozen_dtype)
    trainable = set(resolved.trainable_blocks)
    for i, blk in enumerate(model.blocks):
        if i in trainable:
            continue
        for name, module in blk.named_modules():
            if type(module) is nn.Linear:
                state.linear_dtypes[f"blocks.{i}.{name}"] = module.weight.dtype
                module.weight.data = module.weight.data.to(dtype)
                module.__class__ = FrozenLowPrecisionLinear


def restore(model: nn.Module) -> nn.Module:
    """Undo `reprogram`: original classes, `requires_grad` flags and weight dtypes. Parameters (trained or not) are
    kept; weights stored in a lower `frozen_dtype` come back rounded to it."""
    state: Optional[_PatchState] = getattr(model, _STATE, None)
    if state is None:
        raise BSRError("model is not reprogrammed by bsr; nothing to restore")
    for i, cls in state.block_classes.items():
        blk = model.blocks[i]
        blk.__class__ = cls
        for name in ("_bsr_keep_rate", "_bsr_fuse", "_bsr_drop_in_eval", "_bsr_score_grad", "_bsr_recorder"):
            blk.__dict__.pop(name, None)
    for name, dtype in state.linear_dtypes.items():
        module = model.get_submodule(name)
        module.__class__ = nn.Linear
        module.weight.data = module.weight.data.to(dtype)
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

    Yields a dict {block index: list of (B, k) index tensors}; index 0 is the token after CLS *in that block's input*
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

    per_block: list over drop blocks of (B, k_j) indices into that block's non-CLS input tokens, as recorded by
    `record_kept_tokens` -> list of (B, k_j) patch indices in [0, num_patches); -1 marks a fused token that was kept
    (it stands for no single patch).
    """
    out: list[Tensor] = []
    current: Optional[Tensor] = None  # (B, n): patch index of every non-CLS token entering the block
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

    def __str__(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        lines = [f"trainable params: {self.trainable_params:,} / {self.total_params:,} ({pct:.1f}%)",
                 f"input: {self.img_size[0]}x{self.img_size[1]}",
                 "block  train  drop  attn tokens  mlp tokens"]
        for i, (a, m) in enumerate(self.tokens):
            lines.append(f"{i:>5}  {'yes' if i in self.trainable_blocks else '':>5}  "
                         f"{'yes' if i in self.drop_blocks else '':>4}  {a:>11}  {m:>10}")
        return "\n".join(lines)


def summary(model: nn.Module, img_size: Optional[int | tuple[int, int]] = None) -> Summary:
    """Parameters and per-block token counts of a (reprogrammed or plain) timm ViT for `img_size` (default: model's)."""
    if not isinstance(model, VisionTransformer):
        raise BSRError(f"bsr.summary needs a timm VisionTransformer, got {type(model).__name__}")
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
                   tokens=token_counts(num_tokens, depth, drop, keep, fuse),
                   trainable_blocks=list(trainable), drop_blocks=list(drop))
