"""The BSR authors' analytic training-memory formula, re-derived from a timm ViT's shapes, for comparison only.

Sarkar et al., "Block Selective Reprogramming for On-device Training of Vision Transformers" (arXiv 2405.10951)
report memory from a TinyTL-style counter (Cai et al., NeurIPS 2020; also used by Back Razor): forward hooks on the
leaf modules of a batch-1 forward add up the bytes each layer would keep for backward, and the reported figure is

    total = batch_size * peak_activation_bytes(one sample, 32 bit) + 4 * trainable_params + 1 * frozen_params

where the per-sample peak is taken, at every leaf layer in execution order, over

    (bytes kept so far) + (that layer's temporary input + output) + (attention residual, inside an attention).

Gradients and optimizer state are not part of it. Our measured figures (`bsr.measure`) are the real thing; this module
only lets a report put the paper's number next to them. Reproduces the paper's reference values at batch 128,
10 classes, 224 px within 0.01%: ViT-B/16 full 17,388 MiB, BSR 2,938 MiB; DeiT-S/16 full 8,650 MiB, BSR 1,433 MiB.

Assumptions needed for that reproduction (each is what the authors' counter does):
- MiB = 2**20 bytes; activations fp32 (4 bytes), trainable parameters 4 bytes, frozen parameters 1 byte (8 bit).
- Trainable parameters: the trainable blocks, the final norm (and `fc_norm`) and the head. Patch embedding, CLS token
  and position embedding are frozen unless everything is trained.
- What a layer keeps: a Linear, Conv or LayerNorm its input if its weight is trainable (else nothing); a GELU its
  input; an attention `heads * N^2` (softmax) + `3 * C * N` (q, k, v) values; the attention's own Linear layers
  (qkv, proj) are counted as Linears on top. GELU and attention keep nothing before the first trainable block.
- Token counts: attention sees the tokens before a drop block's dropping, the MLP the tokens after it.
- The head reads one C-wide token per sample (CLS pooling); the patch embedding is a conv with `groups=1`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Optional, Sequence

from torch import nn

from ..core import ops
from ..core.config import BSRConfig
from ..errors import BSRError

ACT_BYTES = 4  # activations counted at 32 bit
TRAINABLE_PARAM_BYTES = 4  # trainable weights at 32 bit
FROZEN_PARAM_BYTES = 1  # frozen weights at 8 bit (the authors assume a quantised frozen backbone)
MIB = 2 ** 20

METHODS = ("full", "head", "tokendrop", "bsr")


@dataclass(frozen=True)
class AnalyticMemory:
    """The authors' memory estimate for one training step, in bytes.

    `activation` = batch_size * `peak_activation_per_sample` (the figure that enters the total);
    `kept_per_sample` is what the formula says backward keeps for one sample (without the peak's temporaries).
    """

    batch_size: int
    peak_activation_per_sample: int
    kept_per_sample: int
    activation: int
    trainable_params: int
    frozen_params: int

    @property
    def params(self) -> int:
        """Bytes of weights: trainable at 32 bit plus frozen at 8 bit."""
        return self.trainable_params + self.frozen_params

    @property
    def total(self) -> int:
        """Activations plus weights (bytes); gradients and optimizer state are not part of the authors' figure."""
        return self.activation + self.params

    @property
    def total_mib(self) -> float:
        return self.total / MIB


@dataclass(frozen=True)
class _Layer:
    """One leaf layer of the per-sample forward: bytes it needs while running, bytes it keeps for backward."""

    temp: int  # its input + output, alive while it runs
    keep: int  # added to the kept bytes after it runs


@dataclass(frozen=True)
class _ViTShape:
    """The shapes of a timm ViT the formula needs (per sample)."""

    in_pixels: int  # in_chans * H * W
    num_patches: int
    depth: int
    width: int  # C
    heads: list[int]
    qkv_width: list[int]  # q + k + v widths per block (3 * C in a standard ViT)
    mlp_hidden: list[int]
    num_classes: int
    norm_on_tokens: bool  # final norm applied to all tokens (CLS pooling) rather than to the pooled vector


def _vit_shape(model: nn.Module) -> _ViTShape:
    """Read the shapes from a timm `VisionTransformer` (works on the `meta` device)."""
    try:
        embed, blocks = model.patch_embed, list(model.blocks)
        proj = embed.proj
        height, width = embed.img_size
        shape = _ViTShape(
            in_pixels=proj.in_channels * height * width,
            num_patches=embed.num_patches,
            depth=len(blocks),
            width=model.embed_dim,
            heads=[b.attn.num_heads for b in blocks],
            qkv_width=[b.attn.qkv.out_features for b in blocks],
            mlp_hidden=[b.mlp.fc1.out_features for b in blocks],
            num_classes=getattr(model, "num_classes", 0),
            norm_on_tokens=isinstance(model.norm, nn.LayerNorm),
        )
    except AttributeError as e:
        raise BSRError(f"analytic memory needs a timm VisionTransformer with standard blocks ({e}); "
                       f"pass one such as timm.create_model('vit_base_patch16_224')") from None
    return shape


def _layers(shape: _ViTShape, trainable: set[int], counts: Sequence[tuple[int, int]],
            everything: bool) -> Iterator[tuple[_Layer, int]]:
    """The leaf layers of one sample's forward in execution order, with the attention residual alive during each.

    Yields (layer, residual bytes). Attention's kept bytes arrive as a zero-temp pseudo-layer at its start, which is
    when the authors' attention hook adds them.
    """
    a, c = ACT_BYTES, shape.width
    first = 0 if everything else min(trainable, default=shape.depth)

    # Patch embedding conv: temp = image + patch grid; keeps the image only if its weight trains.
    yield _Layer(temp=(shape.in_pixels + c * shape.num_patches) * a,
                 keep=shape.in_pixels * a if everything else 0), 0
    for i in range(shape.depth):
        trains, keeps_nonlinear = everything or i in trainable, i >= first
        n_attn, n_mlp = counts[i]
        hidden, qkv = shape.mlp_hidden[i], shape.qkv_width[i]
        # norm1: a trainable LayerNorm keeps its input.
        yield _Layer(n_attn * c * a, n_attn * c * a if trains else 0), 0
        # Attention: while it runs its input stays alive (the residual); it keeps softmax (H N^2) and q, k, v
        # (3 C N) unless no gradient has to flow through it (before the first trainable block).
        residual = n_attn * c * a
        yield _Layer(0, (shape.heads[i] * n_attn ** 2 + qkv * n_attn) * a if keeps_nonlinear else 0), residual
        yield _Layer((n_attn * c + n_attn * qkv) * a, n_attn * c * a if trains else 0), residual  # qkv Linear
        yield _Layer(2 * n_attn * c * a, n_attn * c * a if trains else 0), residual  # proj Linear
        # MLP on the (possibly reduced) tokens: norm2, fc1, GELU (keeps its input wherever gradients flow), fc2.
        yield _Layer(n_mlp * c * a, n_mlp * c * a if trains else 0), 0
        yield _Layer((n_mlp * c + n_mlp * hidden) * a, n_mlp * c * a if trains else 0), 0
        yield _Layer(n_mlp * hidden * a, n_mlp * hidden * a if keeps_nonlinear else 0), 0
        yield _Layer((n_mlp * hidden + n_mlp * c) * a, n_mlp * hidden * a if trains else 0), 0
    # Final norm (always trained) on all remaining tokens, or on the pooled vector; then the head on one vector.
    n_norm = counts[-1][1] if shape.norm_on_tokens else 1
    yield _Layer(n_norm * c * a, n_norm * c * a), 0
    yield _Layer((c + shape.num_classes) * a, c * a), 0


def _activation_bytes(layers: Iterator[tuple[_Layer, int]]) -> tuple[int, int]:
    """(peak, kept) bytes per sample: the peak of kept-so-far + a layer's temporaries + residual, as the authors."""
    kept = peak = 0
    for layer, residual in layers:
        peak = max(peak, kept + layer.temp + residual)
        kept += layer.keep
    return peak, kept


def _param_bytes(model: nn.Module, trainable: set[int], everything: bool) -> tuple[int, int]:
    """(trainable, frozen) weight bytes: trainable blocks, final norm(s) and head at 32 bit, the rest at 8 bit."""
    trained_modules = [model.blocks[i] for i in sorted(trainable)]
    trained_modules += [m for m in (getattr(model, "norm", None), getattr(model, "fc_norm", None),
                                    getattr(model, "head", None)) if m is not None]
    trained = {id(p) for m in trained_modules for p in m.parameters()}
    n_trained = n_frozen = 0
    for p in model.parameters():
        if everything or id(p) in trained:
            n_trained += p.numel()
        else:
            n_frozen += p.numel()
    return n_trained * TRAINABLE_PARAM_BYTES, n_frozen * FROZEN_PARAM_BYTES


def analytic_memory_bytes(model: nn.Module, *, batch_size: int, trainable_blocks: Sequence[int],
                          token_counts: Optional[Sequence[tuple[int, int]]] = None,
                          train_everything: bool = False) -> AnalyticMemory:
    """The authors' training-memory estimate for a timm ViT (see the module docstring for every assumption).

    `trainable_blocks`: block indices trained in full (the final norm and head always train); `train_everything`
    trains all parameters including the patch embedding (then `trainable_blocks` is ignored). `token_counts`: per
    block `(attention tokens, MLP tokens)` as `bsr.core.ops.token_counts` gives; None means no dropping. Only shapes are
    read, so a model built on the `meta` device is fine.
    """
    if batch_size < 1:
        raise BSRError(f"batch_size={batch_size} must be at least 1")
    shape = _vit_shape(model)
    trainable = set(range(shape.depth)) if train_everything else set(trainable_blocks)
    if any(not 0 <= i < shape.depth for i in trainable):
        raise BSRError(f"trainable_blocks={sorted(trainable)} has an index outside 0..{shape.depth - 1}")
    tokens = shape.num_patches + getattr(model, "num_prefix_tokens", 1)
    counts = list(token_counts) if token_counts is not None else [(tokens, tokens)] * shape.depth
    if len(counts) != shape.depth:
        raise BSRError(f"token_counts has {len(counts)} entries but the model has {shape.depth} blocks")
    peak, kept = _activation_bytes(_layers(shape, trainable, counts, train_everything))
    trained, frozen = _param_bytes(model, trainable, train_everything)
    return AnalyticMemory(batch_size=batch_size, peak_activation_per_sample=peak, kept_per_sample=kept,
                          activation=batch_size * peak, trainable_params=trained, frozen_params=frozen)


def method_memory_bytes(model: nn.Module, method: str, *, batch_size: int,
                        config: Optional[BSRConfig] = None) -> AnalyticMemory:
    """The authors' estimate for a named method.

    "full": everything trains, all tokens. "head": only the final norm and head train. "tokendrop": everything
    trains, tokens dropped as `config` says. "bsr": `config`'s trainable blocks and token dropping. `config`
    defaults to `BSRConfig()` (blocks [3, 7, 11], drops at [3, 6, 9], keep 0.5, fused token).
    """
    if method not in METHODS:
        raise BSRError(f"unknown method {method!r} for the analytic memory; use one of {', '.join(METHODS)}")
    if method == "full":
        return analytic_memory_bytes(model, batch_size=batch_size, trainable_blocks=[], train_everything=True)
    if method == "head":
        return analytic_memory_bytes(model, batch_size=batch_size, trainable_blocks=[])
    depth, config = len(model.blocks), config or BSRConfig()
    if method == "tokendrop":  # every block trains, so `config.trainable_blocks` must not matter
        config = replace(config, trainable_blocks="all")
    resolved = config.resolve(depth)
    tokens = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
    dropped = ops.token_counts(tokens, depth, resolved.drop_blocks, resolved.keep_rate, resolved.fuse_token)
    if method == "tokendrop":
        return analytic_memory_bytes(model, batch_size=batch_size, trainable_blocks=[], token_counts=dropped,
                                     train_everything=True)
    return analytic_memory_bytes(model, batch_size=batch_size, trainable_blocks=resolved.trainable_blocks,
                                 token_counts=dropped)
