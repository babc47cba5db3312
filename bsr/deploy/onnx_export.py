"""ONNX export of a BSR model with its token dropping inside the graph, checked with onnxruntime.

BSR (Sarkar et al., arXiv 2405.10951) drops tokens in inference too, so the export must keep the drop: at every drop
block the graph computes the token scores (the class token's row of the attention, B x H x 1 x N, or the attention
each token receives, a q-sized block of queries at a time: `bsr.core.ops`), ranks the tokens with `TopK`, gathers
the kept ones (`GatherElements`) and appends the fused token (a `MatMul` of the dropped tokens with their scores);
every later block runs on the reduced sequence. `onnx_token_counts` measures the sequence length
each block's attention and MLP really see in onnxruntime.

Exporter: torch's TorchScript-based exporter (`torch.onnx.export(dynamo=False)`). The dynamo exporter (torch's
default) needs the `onnxscript` package, which bsr does not depend on; the TorchScript one ships with torch and
handles every op used here. Default opset 17: the first with `LayerNormalization`, run by onnxruntime and by most
edge runtimes. Fused attention (`scaled_dot_product_attention`) is exported as plain MatMul-Softmax-MatMul (opset 17
has no attention op), so inside the graph the attention itself does form its N x N matrix, as any ViT export does.

What cannot be expressed as-is, and how it is handled:
- the stable sort of `bsr.core.ops.select_tokens` (`torch.sort(stable=True)` has no ONNX symbolic): the drop blocks
  of the exported copy rank with `torch.topk`, whose ONNX `TopK` breaks ties towards the lower index, which is the
  stable sort's order; the kept and dropped index sets are put back in ascending order with a second `TopK`;
- `kept_count(N)` needs N as a Python number: the token count is static in the export (the image size is fixed;
  only the batch is dynamic), so it is read as a constant while tracing;
- bf16 frozen Linears (the lean preset): onnxruntime's CPU kernels have no bf16 matmul, so the export holds them as
  float32 Linears with the bf16-rounded weights; the graph then computes in float32 and differs from the PyTorch
  bf16 computation by the rounding of the activations (not of the weights); int8 frozen Linears are stored as int8
  with their scales and a `DequantizeLinear` (`bsr.deploy.onnx_int8`), computing with the very float weights PyTorch
  multiplies;
- training-only features (dropout, drop path, recomputation, score gradients) are absent in eval mode.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..core.ops import token_counts
from ..core.frozen import as_float_linear
from ..core.patch import _STATE, bsr_state, record_kept_tokens
from ..errors import BSRError
from ..files import atomic_write_bytes
from .artifact import host_vit, merged_model, one_line
from .onnx_int8 import MIN_OPSET, int8_layers, quantize_initializers

DEFAULT_OPSET = 17
ONNX_META_KEY = "bsr"  # metadata_props key of the JSON document (class names, mean/std, ...) of an export
_LAYERNORM_NAME = re.compile(r"blocks\.(\d+)/norm([12])/")  # TorchScript exporter node names: /blocks.3/norm2/...


class _Exported(nn.Module):
    """The graph's signature: images -> logits (, kept token indices of every drop block)."""

    def __init__(self, vit: nn.Module, kept_tokens: bool) -> None:
        super().__init__()
        self.vit, self.kept_tokens = vit, kept_tokens

    def forward(self, images: Tensor):
        if not self.kept_tokens:
            return self.vit(images)
        with record_kept_tokens(self.vit) as records:
            logits = self.vit(images)
        return (logits, *[records[i][-1] for i in sorted(records)])


def export_copy(model: nn.Module, train: bool = False) -> nn.Module:
    """A float32 copy of `model` (peft merged) whose drop blocks use ONNX-expressible ops (`_bsr_static`: the same
    result, `bsr.core.ops.drop_tokens(static=True)`): in eval mode and frozen, or with `train` in training mode with
    the trained parameters still requiring gradients. In eval mode the scores carry no gradient; in training mode (the
    on-device training graph, `bsr.deploy.ort_training`) they carry it as `score_grad` says, through the fused
    token's weights, as in PyTorch (off: `bsr.core.ops.scores_without_gradient`)."""
    vit = merged_model(model)
    vit = copy.deepcopy(vit) if vit is model else vit
    for module in vit.modules():
        if as_float_linear(module):  # no bf16 matmul on onnxruntime's CPU: float32 with the stored values
            continue
        if hasattr(module, "_bsr_keep_rate"):  # a drop block
            module._bsr_static = True
    state = getattr(vit, _STATE, None)
    if state is not None and state.resolved.recompute != "none":  # the graph has no torch.utils.checkpoint
        state.resolved = dataclasses.replace(state.resolved, recompute="none")
    vit = vit.float().cpu().train(train)
    return vit if train else vit.requires_grad_(False)


def expected_token_counts(model: nn.Module, img_size: int | tuple[int, int]) -> list[tuple[int, int]]:
    """Tokens each block's attention and MLP see in eval mode, per the BSR configuration (no config: all tokens)."""
    vit = host_vit(model)
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    patch, prefix = vit.patch_embed.patch_size, vit.num_prefix_tokens
    tokens = (size[0] // patch[0]) * (size[1] // patch[1]) + prefix
    resolved = bsr_state(vit)
    if resolved is None or not resolved.drop_in_eval:
        return token_counts(tokens, len(vit.blocks), [], 1.0, False, prefix)
    return token_counts(tokens, len(vit.blocks), resolved.drop_blocks, resolved.keep_rate, resolved.fuse_token,
                        prefix)


def export_onnx(model: nn.Module, path: str | Path, *, img_size: Optional[int | tuple[int, int]] = None,
                opset: int = DEFAULT_OPSET, kept_tokens: bool = False,
                metadata: Optional[Mapping[str, Any]] = None) -> dict:
    """Write `model` (a reprogrammed timm ViT, plain ViT or peft model) as ONNX with dynamic batch, atomically.

    Input `images` (batch, 3, H, W) float32 at `img_size` (default: the model's); output `logits` (batch, classes),
    and with `kept_tokens` one int64 output `kept_{block}` (batch, k) per drop block, indexing that block's non-CLS
    input tokens as `bsr.core.record_kept_tokens` does. The model itself is left unchanged. `metadata` (JSON values:
    class names, mean/std, ...) is stored in the file's `metadata_props` under "bsr", with the image size and the
    resolved BSR config added; `read_onnx_metadata` reads it back.
    Returns {path, bytes, opset, exporter, img_size, outputs, tokens}.
    """
    vit = export_copy(model)
    size = vit.patch_embed.img_size if img_size is None else img_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    resolved = bsr_state(vit)
    drops = resolved.drop_blocks if resolved is not None and resolved.drop_in_eval else []
    if kept_tokens and not drops:
        raise BSRError("kept_tokens=True needs a model that drops tokens in eval; reprogram it with drop blocks, "
                       "keep_rate < 1 and drop_in_eval on, or export without kept_tokens")
    outputs = ["logits"] + ([f"kept_{i}" for i in drops] if kept_tokens else [])
    dummy = torch.zeros(2, 3, *size)  # batch 2: nothing may specialise on a batch of 1
    buf = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings for the static token counts, the exporter's notices
            torch.onnx.export(_Exported(vit, kept_tokens), (dummy,), buf, dynamo=False, opset_version=opset,
                              input_names=["images"], output_names=outputs, do_constant_folding=True,
                              dynamic_axes={name: {0: "batch"} for name in ["images", *outputs]})
    except Exception as e:  # the exporter raises many types; the message says which op or setting failed
        raise BSRError(f"ONNX export failed at opset {opset} ({one_line(e)[:300]}); try opset {DEFAULT_OPSET} or "
                       f"the model's own img_size") from None
    path = Path(path)
    data, int8 = buf.getvalue(), int8_layers(vit)
    if int8 and opset >= MIN_OPSET:  # int8 frozen weights stay int8 in the file (DequantizeLinear)
        data, _ = quantize_initializers(data, int8)
    if metadata is not None:
        data = _with_metadata(data, {**metadata, "img_size": list(size), "outputs": outputs,
                                     "bsr": None if resolved is None else dataclasses.asdict(resolved)})
    atomic_write_bytes(path, data)
    return {"path": str(path), "bytes": path.stat().st_size, "opset": opset, "exporter": "torchscript",
            "img_size": list(size), "outputs": outputs, "tokens": expected_token_counts(vit, size)}


def _with_metadata(data: bytes, doc: Mapping[str, Any]) -> bytes:
    """The serialized ONNX model `data` with `doc` as JSON in its metadata_props under `ONNX_META_KEY`."""
    import onnx

    try:
        text = json.dumps(doc, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise BSRError(f"ONNX metadata is not JSON ({one_line(e)}); pass plain numbers, strings and lists") from None
    graph_model = onnx.load_from_string(data)
    entry = graph_model.metadata_props.add()
    entry.key, entry.value = ONNX_META_KEY, text
    return graph_model.SerializeToString()


def read_onnx_metadata(path: str | Path, session=None) -> dict:
    """The "bsr" metadata document of an ONNX export (written by `export_onnx(metadata=...)`); {} if it has none."""
    meta = (session or _session(path)).get_modelmeta().custom_metadata_map
    try:
        doc = json.loads(meta[ONNX_META_KEY]) if ONNX_META_KEY in meta else {}
    except ValueError:
        raise BSRError(f"{path} has unreadable bsr metadata; export it again") from None
    return doc if isinstance(doc, dict) else {}


def _session(path: str | Path, model_bytes: Optional[bytes] = None, threads: Optional[int] = None):
    """An onnxruntime CPU session for a file (or serialized model), `threads` intra-op threads (default:
    onnxruntime's); one-line errors."""
    from bsr_device.runtime import import_onnxruntime

    ort = import_onnxruntime()
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads, options.inter_op_num_threads = int(threads), 1
    try:
        return ort.InferenceSession(model_bytes if model_bytes is not None else str(path), sess_options=options,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        raise BSRError(f"onnxruntime cannot load {path} ({one_line(e)[:300]}); export it again") from None


onnx_session = _session  # the public name: `onnx_session(path, threads=None)`


def verify_onnx(model: nn.Module, path: str | Path, images: Tensor) -> dict:
    """Run the export under onnxruntime and `model` in PyTorch (eval mode) on `images` (B, 3, H, W); compare.

    Returns {batch, max_abs_diff, top1_agreement} and, if the export has `kept_*` outputs, `kept_agreement`: the
    fraction of (image, drop block) pairs whose kept token indices are identical.
    """
    session = _session(path)
    names = [o.name for o in session.get_outputs()]
    outs = session.run(None, {"images": images.detach().float().cpu().numpy()})
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if len(names) > 1:
                with record_kept_tokens(host_vit(model)) as records:
                    ref = model(images.to(device))
                kept_ref = [records[int(n.split("_")[1])][-1].cpu().numpy() for n in names[1:]]
            else:
                ref = model(images.to(device))
    finally:
        model.train(was_training)
    ref = ref.float().cpu().numpy()
    result = {"batch": int(images.shape[0]), "max_abs_diff": float(np.abs(outs[0] - ref).max()),
              "top1_agreement": float((outs[0].argmax(1) == ref.argmax(1)).mean())}
    if len(names) > 1:
        same = np.stack([(o == r).all(axis=1) for o, r in zip(outs[1:], kept_ref)])  # (blocks, B)
        result["kept_agreement"] = float(same.mean())
    return result


def onnx_token_counts(path: str | Path, images: Tensor) -> list[tuple[int, int]]:
    """Tokens each block's attention and MLP see when onnxruntime runs the export on `images`: list of (attn, mlp).

    Measured, not inferred: the inputs of every block's `norm1` and `norm2` LayerNormalization become extra graph
    outputs of an in-memory copy, and their sequence lengths are read from one run. Needs an export at opset >= 17
    (below it the exporter splits LayerNorm into elementary ops).
    """
    import onnx

    graph_model = onnx.load(str(path))
    taps: dict[tuple[int, int], str] = {}
    for node in graph_model.graph.node:
        found = _LAYERNORM_NAME.search(node.name) if node.op_type == "LayerNormalization" else None
        if found:
            taps[(int(found[1]), int(found[2]))] = node.input[0]
    blocks = sorted({b for b, _ in taps})
    if not blocks or any((b, j) not in taps for b in blocks for j in (1, 2)):
        raise BSRError(f"{path} has no per-block LayerNormalization nodes named like '/blocks.3/norm1/...'; it was "
                       f"not written by bsr.deploy.export_onnx")
    names = [taps[(b, j)] for b in blocks for j in (1, 2)]
    existing = {o.name for o in graph_model.graph.output}
    graph_model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in existing)
    session = _session(path, graph_model.SerializeToString())
    values = dict(zip(names, session.run(names, {"images": images.detach().float().cpu().numpy()})))
    return [(int(values[taps[(b, 1)]].shape[1]), int(values[taps[(b, 2)]].shape[1])) for b in blocks]
