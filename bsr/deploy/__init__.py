"""Deploying a BSR model (SPEC section 9): files that keep the token dropping the model was evaluated with.

`artifact`: a safetensors model file with the BSR configuration in its metadata (`save_model`, `load` /
`load_model`), and a delta of what training changed, checked against its base by sha256 (`save_delta`,
`apply_delta`, `state_sha256`). `onnx_export`: an ONNX graph with the token dropping inside it (`export_onnx`),
checked against PyTorch with onnxruntime (`verify_onnx`, `onnx_token_counts`). Depends on `bsr.core`, `bsr.errors`,
`bsr.files`, timm, torch and safetensors; ONNX needs the `onnx` package, verification `onnxruntime`.
"""

from .artifact import (DELTA_FORMAT, FORMAT, apply_delta, inference_state, load_model, read_metadata, save_delta,
                       save_model, state_sha256)
from .onnx_export import (expected_token_counts, export_onnx, onnx_session, onnx_token_counts, read_onnx_metadata,
                          verify_onnx)

load = load_model

__all__ = ["DELTA_FORMAT", "FORMAT", "apply_delta", "expected_token_counts", "export_onnx", "inference_state",
           "load", "load_model", "onnx_session", "onnx_token_counts", "read_metadata", "read_onnx_metadata",
           "save_delta", "save_model", "state_sha256", "verify_onnx"]
