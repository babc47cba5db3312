"""FLOPs and machine speed: torch's own `FlopCounterMode` (plus the CPU fused-attention formulas it lacks), forward
GMACs per image, and the dense matmul throughput that step times are read against.

The BSR paper (Sarkar et al., arXiv 2405.10951) reports training FLOPs and forward GMACs (SPEC section 6); both are
counted here over what really runs, not derived from shapes.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ..errors import BSRError

Device = Union[str, torch.device]


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of `aten._scaled_dot_product_flash_attention_for_cpu`: the two matmuls Q K^T and P V (B, H, N, D)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    """FLOPs of the CPU fused-attention backward: recomputed scores plus the four gradient matmuls."""
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _extra_flop_formulas() -> dict:
    """Formulas torch lacks, passed per counter (`custom_mapping`) so torch's global registry stays untouched.

    torch counts the CUDA fused-attention kernels but not the CPU one, so on CPU a ViT's attention matmuls would
    silently count as zero.
    """
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flop
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flop
    return mapping


def flop_counter(depth: Optional[int] = None) -> FlopCounterMode:
    """A silent `FlopCounterMode` that also counts CPU fused attention; use it for per-module breakdowns."""
    return FlopCounterMode(display=False, depth=depth, custom_mapping=_extra_flop_formulas())


def count_flops(run: Callable[[], Any]) -> int:
    """FLOPs (multiply and add each count 1, so a MAC is 2 FLOPs) of everything `run()` executes, backward included.

    Only ops with a formula count: matmuls, convolutions and attention; element-wise ops, norms and softmax do not.
    """
    counter = flop_counter()
    with counter:
        run()
    return counter.get_total_flops()


def _image_size(model: nn.Module, img_size: Union[int, tuple[int, int], None]) -> tuple[int, int]:
    if img_size is None:
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is None:
            raise BSRError("the model does not say its image size; pass img_size=<pixels>")
    return (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)


def fwd_gmacs_per_image(model: nn.Module, img_size: Union[int, tuple[int, int], None] = None,
                        device: Device = "cpu", in_chans: Optional[int] = None) -> float:
    """Forward GMACs (FLOPs / 2 / 1e9) of `model` on one random image, counted without building a graph.

    `img_size` defaults to the model's `patch_embed.img_size`, `in_chans` to its patch-embedding conv's input
    channels (else 3). The model runs in whatever train/eval mode it is in.
    """
    height, width = _image_size(model, img_size)
    if in_chans is None:
        proj = getattr(getattr(model, "patch_embed", None), "proj", None)
        in_chans = getattr(proj, "in_channels", 3)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = torch.randn(1, in_chans, height, width, device=device, dtype=dtype)
    # No gradients anyway; flags off too, because a view of a parameter made under no_grad still "requires grad"
    # without a grad_fn, which the flop counter's module tracker rejects (timm's attention pool: latent.expand).
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.no_grad():
            flops = count_flops(lambda: model(x))
    finally:
        for p in params:
            p.requires_grad_(True)
    return flops / 2 / 1e9



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: Device = "cpu", dtype: torch.dtype = torch.float32, size: int = 2048,
                  repeats: int = 5) -> float:
    """This machine's dense matmul throughput right now, in GFLOP/s: median over `repeats` `size`^3 matmuls.

    One untimed warm-up first (thread pools, cuBLAS handles). Speed drifts, so measure next to what it normalises.
    """
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    _sync(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(seconds) / 1e9

