"""The fine-tuning methods compared in the BSR paper (Sarkar et al., arXiv 2405.10951, SPEC section 2), one harness.

`apply_method` turns a timm `VisionTransformer` into one of: full, head, bitfit, last-k, lora (through `peft`),
tokendrop (EViT-like: everything trained, BSR's token dropping) and bsr. Trainable parameters are selected by module
structure (the blocks list, the final norm, the head, each module's own `bias`), never by matching parameter names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import BSRConfig
from ..core.moe import moe_layers
from ..core.patch import reprogram
from ..errors import BSRError

METHODS = ("bsr", "full", "head", "bitfit", "last-k", "lora", "tokendrop")


def host(model: nn.Module) -> nn.Module:
    """The timm ViT inside `model` (unwraps a peft model)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def final_modules(vit: nn.Module) -> list[nn.Module]:
    """Final norm, pooled-feature norm, attention pool (SigLIP, Perception Encoder) and head: trained by every
    method."""
    return [m for m in (getattr(vit, name, None) for name in ("norm", "fc_norm", "attn_pool", "head"))
            if isinstance(m, nn.Module)]


def _set_trainable(modules: list[nn.Module], flag: bool = True) -> None:
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(flag)


def check_host(model: nn.Module, what: str) -> None:
    """The one host-model check of training, bench and study: a timm VisionTransformer (a model with `.blocks`);
    `what` names what needs it (the model option, or the method)."""
    if not hasattr(model, "blocks"):
        raise BSRError(f"{what} is a {type(model).__name__}, not a timm VisionTransformer (with .blocks); bsr "
                       f"fine-tunes ViT blocks: use a ViT, DeiT or DINOv2, e.g. vit_small_patch16_224")


def apply_method(model: nn.Module, method: str, *, bsr: BSRConfig | None = None, last_k: int = 3,
                 lora_rank: int = 8, lora_alpha: int = 16, wrap: bool = True) -> nn.Module:
    """Make `model` train with `method`; returns the model to train (a peft wrapper for lora, else `model`).

    `bsr` gives the BSR options (used by `bsr`, and its drop settings by `tokendrop`). `wrap=False`: lora's adapters
    go into `model` itself, no peft wrapper (the backbone of a multi-task model).
    """
    bsr = bsr if bsr is not None else BSRConfig()
    check_host(model, f"method={method!r}")
    if method == "full":
        model.requires_grad_(True)
        return model
    if method == "head":
        return _reprogram(model, BSRConfig(trainable_blocks="none", keep_rate=1.0))
    if method == "last-k":
        if not 1 <= last_k <= len(model.blocks):
            raise BSRError(f"last_k={last_k} is out of range; the model has {len(model.blocks)} blocks")
        return _reprogram(model, BSRConfig(trainable_blocks=f"last:{last_k}", keep_rate=1.0))
    if method == "tokendrop":
        model = _reprogram(model, dataclasses.replace(bsr, trainable_blocks="all"))
        return model.requires_grad_(True)  # EViT-like: embeddings and tokens train too, unlike BSR
    if method == "bsr":
        return _reprogram(model, bsr)
    if method == "bitfit":
        return _bitfit(model)
    if method == "lora":
        return _lora(model, lora_rank, lora_alpha, wrap)
    raise BSRError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}")


def _reprogram(model: nn.Module, config: BSRConfig) -> nn.Module:
    return reprogram(model, config)  # the BSR patch owns freezing, the no-grad prefix and token dropping


def _bitfit(model: nn.Module) -> nn.Module:
    """BitFit (Ben Zaken et al. 2022): every module's own bias (a MoE layer's: its experts' stacked biases), plus the
    final norm and head, and the MoE task gates (see `_train_gates`)."""
    model.requires_grad_(False)
    for module in model.modules():
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            bias.requires_grad_(True)
    for layer in moe_layers(model):
        for bias in (layer.b1, layer.b2):
            if bias is not None:
                bias.requires_grad_(True)
    _set_trainable(final_modules(model))
    _train_gates(model)
    return model


def _train_gates(model: nn.Module) -> None:
    """The task gates of MoE layers train in full under bitfit and lora: like the task heads they are new (zero) and
    task-specific, and a gate trained through its bias alone could only route every token of a task alike."""
    for layer in moe_layers(model):
        layer.gates.requires_grad_(True)


def lora_targets(model: nn.Module) -> list[str]:
    """Qualified names of every block's attention projections (qkv, or q/k/v apart) and output projection, and its MLP
    Linears (fc1 and fc2; SwiGLU's fc1_g and fc1_x in Eva), found by structure."""
    wanted = set()
    children = [("attn", c) for c in ("qkv", "q_proj", "k_proj", "v_proj", "proj")] + \
        [("mlp", c) for c in ("fc1", "fc1_g", "fc1_x", "fc2")]
    for block in model.blocks:
        for parent, child in ((getattr(block, p), c) for p, c in children):
            layer = getattr(parent, child, None)
            if isinstance(layer, nn.Linear):
                wanted.add(id(layer))
    return [name for name, module in model.named_modules() if id(module) in wanted]


def _lora(model: nn.Module, rank: int, alpha: int, wrap: bool = True) -> nn.Module:
    """LoRA (Hu et al. 2022) through `peft` on the blocks' Linear layers; final norm and head trained in full. A MoE
    layer's stacked expert weights get per-expert adapters of their own (`MoEMlp.add_lora`) and its gates train in
    full. `wrap=False`: injected into `model` in place (`peft.inject_adapter_in_model`), no wrapper."""
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model

    if rank < 1:
        raise BSRError(f"lora_rank={rank} must be at least 1")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=lora_targets(model))
    wrapped = get_peft_model(model, config) if wrap else inject_adapter_in_model(config, model)  # freezes the rest
    for layer in moe_layers(model):
        layer.add_lora(rank, alpha)
    _set_trainable(final_modules(host(wrapped)))  # by hand: peft's modules_to_save would match names
    _train_gates(model)
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """`model` with its LoRA adapters folded into the weights: a peft wrapper merged and unloaded, in-place peft
    layers (see `_lora`'s `wrap=False`) merged and replaced by their base Linear, MoE expert adapters merged."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    for name, module in list(model.named_modules()):
        if type(module).__module__.startswith("peft.") and hasattr(module, "get_base_layer"):  # a peft LoRA layer
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    for layer in moe_layers(model):
        layer.merge_lora()
    return model


@dataclass
class ParamCount:
    """Trainable and total parameter counts of a model."""

    trainable: int
    total: int

    def __str__(self) -> str:
        return f"{self.trainable:,} / {self.total:,} ({100 * self.trainable / max(self.total, 1):.1f}%)"


def count_params(model: nn.Module) -> ParamCount:
    """Trainable (requires_grad) and total parameters, each storage counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return ParamCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


@torch.no_grad()
def tokens_per_block(model: nn.Module, images: torch.Tensor) -> list[tuple[int, int]]:
    """Measured (attention, MLP) sequence lengths of each block for `images` (B, 3, H, W)."""
    vit = host(model)
    seen: dict[int, list[int]] = {}
    hooks = []
    for i, block in enumerate(vit.blocks):
        seen[i] = [0, 0]
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: seen[i].__setitem__(0, a[0].shape[1])))
        hooks.append(block.mlp.register_forward_pre_hook(lambda m, a, i=i: seen[i].__setitem__(1, a[0].shape[1])))
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
    return [(a, m) for a, m in seen.values()]


def format_tokens(counts: list[tuple[int, int]]) -> str:
    """Compact token table, runs of equal blocks merged: `0-2: 50/50, 3: 50/26, ...` (attention/MLP)."""
    parts, start = [], 0
    for i in range(1, len(counts) + 1):
        if i == len(counts) or counts[i] != counts[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            parts.append(f"{span}: {counts[start][0]}/{counts[start][1]}")
            start = i
    return ", ".join(parts)
