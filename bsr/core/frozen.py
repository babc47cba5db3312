"""Frozen Linear layers stored below float32: bfloat16/float16 (`frozen_dtype`, the lean preset) and int8 with
per-output-channel scales (`frozen_dtype="int8"`), with an input gradient only, never a weight gradient.

Why bsr's own int8 module rather than a quantization library: what is needed is weight-only int8 storage, a matmul
that dequantizes one layer's weight at a time, and the input gradient through it (the frozen blocks sit between
trained ones). torchao's int8 weight-only tensors target inference (no guaranteed backward) and its wheels pin torch
versions; on this project's CPU (AVX2, no VNNI/AMX) its kernel family, `torch.ops.aten._weight_int8pack_mm`, runs
40x slower in float32 and 2x slower in bfloat16 than dequantizing the layer's weight and calling the float matmul
(measured for a ViT-B MLP Linear at 3,200 tokens). Dequantizing per matmul is exact to the stored grid and keeps the
fast float kernels of every device; the transient is one layer's float weight.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INT8_MAX = 127


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output channel (row): (int8 weight, float32 scale per row) with weight ~= q * scale[:, None];
    each row's largest magnitude maps to +-127 (a zero row gets scale 1). weight: (out, in)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float weight of an int8 one: q * scale[:, None] in `dtype` (computed in float32)."""
    return (q.float() * scale.float()[:, None]).to(dtype)


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


class _Int8LinearFn(torch.autograd.Function):
    """y = x (q * s)^T + b in x's dtype, the float weight made for this matmul only; saves q and s (resident)."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(q, scale)
        return F.linear(x, dequantize_rows(q, scale, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, scale = ctx.saved_tensors
        return grad_out @ dequantize_rows(q, scale, grad_out.dtype), None, None, None


class FrozenInt8Linear(nn.Linear):
    """A frozen `nn.Linear` whose weight is stored in int8 with a float32 scale per output channel (`weight_scale`).

    Changes against the host: the weight's storage (int8 parameter, scales in a buffer not in the state dict); the
    matmul dequantizes the weight for each call and runs in the input's dtype (under autocast: autocast's dtype); no
    gradient for weight or bias. `state_dict()` gives the float weight (q * scale, exact) under timm's key, so every
    export and hash sees an ordinary float model; `load_state_dict` quantizes a float weight it is given (a weight
    already on the grid comes back as the same int8 values and scale).
    """

    weight_scale: Tensor

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        with torch.autocast(x.device.type, enabled=False):
            return _Int8LinearFn.apply(x, self.weight, self.weight_scale, self.bias)

    def float_weight(self) -> Tensor:
        return dequantize_rows(self.weight, self.weight_scale)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.float_weight()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        key = prefix + "weight"
        if key in state_dict and state_dict[key].is_floating_point():
            q, scale = quantize_rows(state_dict[key])
            self.weight_scale.copy_(scale)
            state_dict = {**state_dict, key: q}
        super()._load_from_state_dict(state_dict, prefix, *args)


def _to_int8(module: nn.Linear) -> None:
    q, scale = quantize_rows(module.weight)
    module.weight.data = q
    module.register_buffer("weight_scale", scale.to(q.device), persistent=False)
    module.__class__ = FrozenInt8Linear


def store_frozen_linears(model: nn.Module, trainable_blocks, frozen_dtype: str) -> dict[str, torch.dtype]:
    """Store the weights of the frozen blocks' Linears in `frozen_dtype` (bfloat16, float16, int8) and compute them
    on the fly; returns {qualified name: original dtype} for `restore_frozen_linears`."""
    trainable, changed = set(trainable_blocks), {}
    for i, blk in enumerate(model.blocks):
        if i in trainable:
            continue
        for name, module in blk.named_modules():
            if type(module) is nn.Linear:
                changed[f"blocks.{i}.{name}"] = module.weight.dtype
                if frozen_dtype == "int8":
                    _to_int8(module)
                else:
                    module.weight.data = module.weight.data.to(getattr(torch, frozen_dtype))
                    module.__class__ = FrozenLowPrecisionLinear
    return changed


def restore_frozen_linears(model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Undo `store_frozen_linears`: plain `nn.Linear`s with float weights of their original dtype (rounded to the
    stored precision; int8: exactly q * scale)."""
    for name, dtype in dtypes.items():
        module = model.get_submodule(name)
        if isinstance(module, FrozenInt8Linear):
            weight = module.float_weight().to(dtype)
            del module._buffers["weight_scale"]
            module.weight.data = weight
        else:
            module.weight.data = module.weight.data.to(dtype)
        module.__class__ = nn.Linear


SCALE_SUFFIX = ".weight_scale"


def int8_storage(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` (float, timm's keys) with every int8 frozen Linear's weight as its int8 values plus `<name>.weight_scale`
    (float32): what a bsr model file stores (a quarter of the float bytes)."""
    out = dict(state)
    for name, module in model.named_modules():
        if isinstance(module, FrozenInt8Linear) and f"{name}.weight" in out:
            out[f"{name}.weight"] = module.weight.detach().to("cpu", copy=True)
            out[name + SCALE_SUFFIX] = module.weight_scale.detach().to("cpu", torch.float32, copy=True)
    return out


def float_storage(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `int8_storage`: every int8 weight with its scale back to float32 (exactly q * scale)."""
    out = dict(state)
    for key in [k for k in out if k.endswith(SCALE_SUFFIX)]:
        weight_key = key[: -len(SCALE_SUFFIX)] + ".weight"
        scale = out.pop(key)
        if weight_key in out and out[weight_key].dtype == torch.int8:
            out[weight_key] = dequantize_rows(out[weight_key], scale)
    return out


def as_float_linear(module: nn.Module) -> bool:
    """Turn a frozen bf16/fp16/int8 Linear into a float32 `nn.Linear` with the same (rounded) weight values, in
    place (exports: ONNX Runtime's CPU kernels have no bf16 matmul); False if `module` is not one."""
    if isinstance(module, FrozenInt8Linear):
        weight = module.float_weight()
        module._bsr_int8 = (module.weight.data, module._buffers.pop("weight_scale"))  # for an int8 ONNX file
    elif isinstance(module, FrozenLowPrecisionLinear):
        weight = module.weight.data.float()
    else:
        return False
    module.weight.data = weight
    module.__class__ = nn.Linear
    return True
