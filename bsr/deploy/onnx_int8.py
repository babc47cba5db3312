"""int8 frozen weights in an ONNX export: each one stored as int8 with its per-row scales and a `DequantizeLinear`
(opset >= 13, per-axis) in front of its use, instead of a float32 initializer: the file holds a quarter of those
bytes and onnxruntime computes with exactly the float weights PyTorch multiplies (q * scale in float32).

The TorchScript exporter may transpose a weight while folding constants (MatMul takes W^T), so each int8 layer's
initializer is found by value: the float32 array equal to q * scale or to its transpose.
"""

from __future__ import annotations

import numpy as np
from torch import nn

MIN_OPSET = 13  # per-axis DequantizeLinear


def int8_layers(model: nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
    """(q (out, in) int8, scale (out,) float32) of every Linear an export copy made float from int8 storage
    (`bsr.core.frozen.as_float_linear` leaves them on the module as `_bsr_int8`)."""
    found = []
    for module in model.modules():
        stored = getattr(module, "_bsr_int8", None)
        if stored is not None:
            q, scale = stored
            found.append((q.cpu().numpy(), scale.float().cpu().numpy()))
    return found


def dequantize_initializers(name: str, q: np.ndarray, scale: np.ndarray) -> list:
    """The initializers behind the int8 weight `name`: its int8 values, float32 scales and int8 zero points (zero;
    explicit, so that onnxruntime's Q/DQ passes derive int8, not uint8, tensors from it)."""
    from onnx import numpy_helper

    return [numpy_helper.from_array(q, f"{name}_int8"),
            numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
            numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_zero")]


def dequantize_node(name: str, axis: int):
    """`name` = DequantizeLinear(name_int8, name_scale, name_zero) along `axis` (the weight's output channels)."""
    from onnx import helper

    return helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero"], [name],
                            name=f"{name}_dequantize", axis=axis)


def quantize_initializers(data: bytes, layers: list[tuple[np.ndarray, np.ndarray]]) -> tuple[bytes, int]:
    """The serialized ONNX model `data` with the float initializers of `layers` replaced by int8 + DequantizeLinear;
    returns (new bytes, number of weights replaced). A layer whose initializer is not found is left float."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(data)
    graph = model.graph
    by_shape: dict[tuple, list] = {}
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 2:
            by_shape.setdefault(tuple(init.dims), []).append(init)
    nodes, replaced = [], 0
    for q, scale in layers:
        weight = q.astype(np.float32) * scale[:, None]
        for axis, (array, qa) in enumerate(((weight, q), (weight.T, q.T))):
            match = next((init for init in by_shape.get(array.shape, [])
                          if np.array_equal(numpy_helper.to_array(init), array)), None)
            if match is None:
                continue
            name = match.name
            graph.initializer.remove(match)
            by_shape[array.shape].remove(match)
            graph.initializer.extend(dequantize_initializers(name, np.ascontiguousarray(qa), scale))
            nodes.append(dequantize_node(name, axis))
            replaced += 1
            break
    if replaced:
        existing = list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes + existing)  # before every use: the graph stays topologically sorted
    return model.SerializeToString(), replaced
