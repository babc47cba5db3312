"""The multi-task ViT of SPEC section 5: a shared timm ViT backbone (optionally with task-routed MoE layers,
`bsr.core.moe`), one linear head per task, and BSR on it (`reprogram_multitask`)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import timm
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ..errors import BSRError
from .config import BSRConfig, BlockSpec
from .moe import DEFAULT_MOE_BLOCKS, MoEMlp, moe_layers, moeify, set_moe_task
from .patch import reprogram


class MultiTaskViT(nn.Module):
    """A shared timm ViT backbone (no head: `num_classes=0`) and one linear head per task.

    `forward(images, task)` sets the task on the backbone's MoE layers (if any), runs the backbone to its pooled
    features (B, num_features) and returns the logits of that task's head (B, num_classes_per_task[task]).
    """

    def __init__(self, backbone: VisionTransformer, num_classes_per_task: Sequence[int]):
        super().__init__()
        if not num_classes_per_task or any(int(n) < 1 for n in num_classes_per_task):
            raise BSRError(f"num_classes_per_task={list(num_classes_per_task)}; give one class count >= 1 per task")
        if backbone.num_classes != 0:
            backbone.reset_classifier(0)  # the backbone returns pooled features; heads live here
        gate_tasks = {layer.num_tasks for layer in moe_layers(backbone)}
        if gate_tasks - {1, len(num_classes_per_task)}:
            raise BSRError(f"the backbone's MoE layers have {sorted(gate_tasks)} task gates but "
                           f"{len(num_classes_per_task)} tasks are given; moeify with num_tasks="
                           f"{len(num_classes_per_task)}")
        self.backbone = backbone
        ref = next(backbone.parameters())
        self.heads = nn.ModuleList(nn.Linear(backbone.num_features, int(n), device=ref.device, dtype=ref.dtype)
                                   for n in num_classes_per_task)

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def no_weight_decay(self) -> set[str]:
        """Parameter names weight decay must skip (timm's convention): the backbone's (pos_embed, cls_token, ...)
        and the experts' stacked biases, which are 2-D and would otherwise look like weights."""
        names = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        for name, module in self.backbone.named_modules():
            if isinstance(module, MoEMlp):
                names |= {f"backbone.{name}.{b}" for b in ("b1", "b2") if getattr(module, b) is not None}
        return names

    def forward(self, images: Tensor, task: int) -> Tensor:
        """images: (B, 3, H, W) -> logits (B, num_classes_per_task[task])."""
        if not 0 <= task < self.num_tasks:
            raise BSRError(f"task {task} is out of range; this model has tasks 0..{self.num_tasks - 1}")
        set_moe_task(self.backbone, task)
        return self.heads[task](self.backbone(images))


def build_multitask(model_name_or_model: Union[str, VisionTransformer], num_classes_per_task: Sequence[int],
                    moe: bool = True, moe_blocks: BlockSpec = DEFAULT_MOE_BLOCKS, num_experts: int = 16,
                    top_k: int = 4, aux_loss_coef: float = 0.0, router_noise: float = 1.0,
                    **timm_kwargs) -> MultiTaskViT:
    """A `MultiTaskViT` from a timm model name (built with `num_classes=0` and `timm_kwargs`) or a ViT (used in place,
    its head dropped). With `moe`, the MLPs of `moe_blocks` become MoE layers with one gate per task (`moeify`)."""
    if isinstance(model_name_or_model, str):
        backbone = timm.create_model(model_name_or_model, **{**timm_kwargs, "num_classes": 0})
    elif timm_kwargs:
        raise BSRError(f"timm options {sorted(timm_kwargs)} apply to a model name only; the model is already built")
    else:
        backbone = model_name_or_model
    if not isinstance(backbone, VisionTransformer):
        raise BSRError(f"build_multitask needs a timm VisionTransformer, got {type(backbone).__name__}")
    if moe:
        moeify(backbone, moe_blocks, num_experts, top_k, len(num_classes_per_task), aux_loss_coef, router_noise)
    return MultiTaskViT(backbone, num_classes_per_task)


def reprogram_multitask(mt: MultiTaskViT, config: Optional[BSRConfig] = None) -> MultiTaskViT:
    """BSR on a multi-task model: `bsr.reprogram(mt.backbone, config)`, then every task head trainable.

    `reprogram` trains the backbone's trainable blocks (with the defaults, the MoE blocks 3, 7, 11: experts and all
    task gates) and final norm; the backbone's own head is an `Identity`, so the task heads, which live outside the
    backbone, are switched on here. Undo with `bsr.restore(mt.backbone)` (the heads stay trainable).
    """
    reprogram(mt.backbone, config)
    for p in mt.heads.parameters():
        p.requires_grad_(True)
    return mt
