"""Optimisation: the learning-rate schedule (a pure function of the step), the optimizer, mixed precision.

The paper's recipes (Sarkar et al., arXiv 2405.10951, SPEC section 3): SGD with momentum or AdamW, no weight decay on
1-D parameters, the position embedding and the CLS token, optional layer-wise lr decay, linear warm-up then cosine.
`lr_at` lives in the torch-free `bsr_device.schedule` (the device trainer steps the same schedule); re-exported here.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from bsr_device.schedule import lr_at  # noqa: F401  (re-exported: bsr.train.optim.lr_at)

from ..errors import BSRError
from .config import TrainConfig
from .fused import AdamWBf16State, FusedOptimizer, SGDBf16State
from .methods import host


def keep_rate_at(step: int, keep_rate: float, warmup_steps: int) -> float:
    """Keep rate of step `step` under EViT's warm-up (Liang et al., ICLR 2022): cosine from 1 down to `keep_rate` over
    `warmup_steps` steps, then `keep_rate`."""
    if step >= warmup_steps:
        return keep_rate
    return keep_rate + (1.0 - keep_rate) * 0.5 * (1.0 + math.cos(math.pi * step / warmup_steps))


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer | FusedOptimizer:
    """SGD or AdamW over the trainable parameters; no decay on 1-D params/pos_embed/cls_token; layer-wise lr scales.
    With `cfg.fused_step`, one such optimizer per parameter, stepped inside backward (`bsr.train.fused`); with
    `cfg.optimizer_state` bf16, one per parameter too, whose momentum / first moment is bf16 between steps."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    vit = host(model)  # timm's helpers read the ViT's own names and group_matcher, not peft's prefixes
    skip = set(vit.no_weight_decay()) if hasattr(vit, "no_weight_decay") else set()
    if cfg.layer_decay is not None:
        groups = param_groups_layer_decay(vit, cfg.weight_decay, skip, layer_decay=cfg.layer_decay)
    else:
        groups = param_groups_weight_decay(vit, cfg.weight_decay, no_weight_decay_list=skip)
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise BSRError(f"method={cfg.method!r} leaves nothing to train")
    bf16 = cfg.optimizer_state == "bf16"
    if cfg.optimizer == "sgd":
        make = partial(SGDBf16State if bf16 else torch.optim.SGD, lr=cfg.lr, momentum=cfg.momentum)
    else:
        make = partial(AdamWBf16State if bf16 else torch.optim.AdamW, lr=cfg.lr)
    if cfg.fused_step or bf16:  # one optimizer per parameter: stepped inside backward, or one after the other
        return FusedOptimizer(groups, make, in_backward=cfg.fused_step)
    return make(groups)


def autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    """The autocast context of `cfg.amp` (bf16 or fp16) on `device`; disabled for "off"."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
