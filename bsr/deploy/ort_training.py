"""On-device training artifacts: a BSR model as ONNX Runtime training graphs (SPEC section 10).

ONNX Runtime's on-device training API (the runtime phones and boards train with, from C, C++, Java/Kotlin,
Objective-C/Swift or Python) trains four artifacts: a training graph (forward, loss and the gradient graph of the
trained parameters), an eval graph, an optimizer graph and a checkpoint of the parameters. `export_ort_training`
writes them for a BSR model (Sarkar et al., arXiv 2405.10951), so that block selection and token dropping hold on the
device with PyTorch's gradients:
- the forward is the model in training mode with the drop blocks of `bsr.deploy.onnx_export` (`TopK` +
  `GatherElements`; the CLS scores carry their gradient through the fused token as `score_grad` says) and the loss of
  `bsr train` (cross-entropy with its label smoothing); TorchScript exporter, opset 17, dynamic batch;
- only the trained parameters get gradients (ORT builds no backward for the frozen prefix);
- every `LayerNormalization` node gets its optional `Mean` and `InvStdDev` outputs, which ORT's gradient builder
  needs (without them `generate_artifacts` fails with `GradientBuilderBase::O ... i < OutputDefs().size()`);
- the optimizer graph is bsr's own (`bsr.deploy.ort_optim`): PyTorch's AdamW or SGD with momentum, gradient clipping
  and per-parameter weight decay as `bsr train` applies them; the host loop sets the learning rate of every step from
  `bsr_device.schedule.lr_at`, the same function `bsr train` uses;
- the graphs are also written in ORT format (`.ort`, what minimal mobile builds load) with the list of operators
  such a build must include (`required_operators.config`).
ORT's training packages stop at 1.19.2 (onnxruntime-training-cpu on PyPI, -android on Maven, -c/-objc on CocoaPods),
which reads ONNX IR up to 10: every artifact is written at IR 10.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bsr_device.artifacts import EVAL_MODEL, IR_VERSION, OPTIMIZER_MODEL, TRAINING_MODEL, write_metadata

from ..errors import BSRError
from .onnx_int8 import dequantize_initializers, dequantize_node
from .artifact import one_line
from .onnx_export import DEFAULT_OPSET, ONNX_META_KEY, export_copy
from .ort_optim import OptimizerSpec, optimizer_graph


class _TrainStep(nn.Module):
    """The training graph's forward: (images (B, 3, H, W), labels (B,)) -> (loss (), logits (B, classes))."""

    def __init__(self, vit: nn.Module, label_smoothing: float) -> None:
        super().__init__()
        self.vit, self.label_smoothing = vit, float(label_smoothing)

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.vit(images)
        if self.label_smoothing == 0:
            return F.cross_entropy(logits, labels), logits
        # F.cross_entropy's label smoothing has no ONNX symbolic: the same loss from log-softmax
        logp = F.log_softmax(logits, dim=-1)
        nll = -logp.gather(1, labels.unsqueeze(1)).squeeze(1)
        smooth = -logp.mean(dim=-1)
        return ((1 - self.label_smoothing) * nll + self.label_smoothing * smooth).mean(), logits


def training_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """(trained, frozen) parameter names of `model` (a timm ViT, BSR-patched or not), in `named_parameters` order.
    Frozen weights stored in int8 are not among them: they stay in the graphs as constants (`int8_weights`)."""
    constants = set(int8_weights(model))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and n not in constants]
    return trained, frozen


def int8_weights(model: nn.Module) -> dict[str, tuple]:
    """{parameter name: (q, scale)} of the frozen Linears `model` stores in int8 (frozen_dtype int8)."""
    from ..core.frozen import FrozenInt8Linear

    return {f"{name}.weight": (m.weight.detach().cpu().numpy(), m.weight_scale.detach().float().cpu().numpy())
            for name, m in model.named_modules() if isinstance(m, FrozenInt8Linear)}


def _check_model(model: nn.Module) -> None:
    if callable(getattr(model, "merge_and_unload", None)) or any(hasattr(m, "base_layer") for m in model.modules()):
        raise BSRError("the on-device export takes a timm ViT without peft adapters; use --method bsr, full, head, "
                       "bitfit, last-k or tokendrop (LoRA adapters are not exported for on-device training)")
    if not any(p.requires_grad for p in model.parameters()):
        raise BSRError("the model has no trained parameters; apply a method (bsr.reprogram) before exporting it "
                       "for on-device training")


def _torch_export(model: nn.Module, img_size: tuple[int, int], label_smoothing: float, opset: int) -> bytes:
    """The forward + loss of `model` in training mode as ONNX bytes (parameters under their `named_parameters`
    names, prefixed `vit.`)."""
    import io

    step = _TrainStep(export_copy(model, train=True), label_smoothing)
    images, labels = torch.zeros(2, 3, *img_size), torch.zeros(2, dtype=torch.long)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings for the static token counts, the exporter's notices
            torch.onnx.export(step, (images, labels), buf, dynamo=False, opset_version=opset,
                              training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                              input_names=["images", "labels"], output_names=["loss", "logits"],
                              dynamic_axes={"images": {0: "batch"}, "labels": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as e:  # the exporter raises many types; the message says which op failed
        raise BSRError(f"on-device training export failed ({one_line(e)[:300]}); export with the model's own "
                       f"img_size, or report the model") from None
    return buf.getvalue()


def _prepare_graph(data: bytes, trained: list[str], doc: Mapping[str, Any], int8: Optional[Mapping[str, tuple]] = None):
    """The exported graph ready for ORT's gradient builder: parameter names without the `vit.` prefix, IR 10, every
    `LayerNormalization` with its `Mean` and `InvStdDev` outputs, `doc` as the "bsr" metadata document that the
    eval graph and the device's inference export keep (`bsr predict` reads its size, mean/std and classes), and the
    int8 frozen weights (`int8`: name -> (q, scale)) as int8 constants behind a `DequantizeLinear`, out of the
    checkpoint."""
    import json

    import onnx

    graph_model = onnx.load_from_string(data)
    graph = graph_model.graph
    rename = {i.name: i.name[len("vit."):] for i in graph.initializer if i.name.startswith("vit.")}
    for init in graph.initializer:
        init.name = rename.get(init.name, init.name)
    for node in graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            node.output.extend([f"{node.output[0]}_mean", f"{node.output[0]}_invstd"])
    if int8:
        _int8_constants(graph, int8)
    missing = sorted(set(trained) - {i.name for i in graph.initializer})
    if missing:
        raise BSRError(f"the exported graph lost trained parameter {missing[0]} (folded into a constant); report the "
                       f"model: its trained parameters must stay graph initializers")
    graph_model.ir_version = IR_VERSION
    entry = graph_model.metadata_props.add()
    entry.key, entry.value = ONNX_META_KEY, json.dumps(doc, allow_nan=False)
    return graph_model


def _int8_constants(graph, int8: Mapping[str, tuple]) -> None:
    """Replace the float initializers named in `int8` by int8 ones, their scales and a `DequantizeLinear` each."""
    nodes = []
    for init in [i for i in graph.initializer if i.name in int8]:
        q, scale = int8[init.name]
        graph.initializer.remove(init)
        graph.initializer.extend(dequantize_initializers(init.name, q, scale))
        nodes.append(dequantize_node(init.name, axis=0))
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)


@contextlib.contextmanager
def _silenced():
    """Send this process's stdout and stderr file descriptors to /dev/null (ORT's converter logs every graph
    transformation from C++ at info level, past Python's streams)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def _ort_format(directory: Path, names: list[str]) -> None:
    """Write `.ort` copies of the ONNX graphs `names` in `directory` and `required_operators.config` (the operators a
    minimal build needs to train them)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    staging = directory / "ort-staging"
    staging.mkdir()
    for name in names:
        shutil.copy2(directory / name, staging / name)
    with _silenced():
        convert_onnx_models_to_ort(staging, output_dir=staging, optimization_styles=[OptimizationStyle.Fixed],
                                   enable_type_reduction=False)
    for path in staging.iterdir():
        if path.suffix == ".ort" or path.name.startswith("required_operators"):
            os.replace(path, directory / path.name.replace(".with_runtime_opt", ""))
    shutil.rmtree(staging)


def export_ort_training(model: nn.Module, out: str | Path, *, optimizer: OptimizerSpec, metadata: Mapping[str, Any],
                        img_size: Optional[tuple[int, int]] = None, label_smoothing: float = 0.0,
                        opset: int = DEFAULT_OPSET, ort_format: bool = True, log=None) -> dict:
    """Write the on-device training artifacts of `model` (a BSR-patched or plain timm ViT whose trained parameters
    require gradients) into the new directory `out`: training/eval/optimizer graphs and checkpoint (ORT's file names),
    their `.ort` copies with `required_operators.config` (`ort_format`), and `bsr-device.json` (`metadata` plus the
    trained parameter names and the optimizer). The directory appears whole or not at all.

    Returns {path, seconds, files: {name: bytes}, trained, frozen}.
    """
    import logging

    from bsr_device.runtime import import_onnxruntime

    onnxruntime = import_onnxruntime()
    from onnxruntime.training import artifacts

    _check_model(model)
    onnxruntime.set_default_logger_severity(3)  # errors only: it warns about every unused initializer
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BSRError(f"{out} exists and is not an empty folder; pick a new output folder for the artifacts")
    start = time.perf_counter()
    size = tuple(img_size or model.patch_embed.img_size)
    trained, frozen = training_names(model)
    int8 = int8_weights(model)  # int8 values, scales and zero points: frozen parameters (the checkpoint holds int8)
    frozen += [f"{name}_{part}" for name in int8 for part in ("int8", "scale", "zero")]
    inference = {k: metadata.get(k) for k in ("class_names", "mean", "std", "bsr")}
    graph_model = _prepare_graph(_torch_export(model, size, label_smoothing, opset), trained,
                                 {**inference, "img_size": list(size), "outputs": ["logits"]}, int8)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        try:
            with warnings.catch_warnings(), _silenced():  # ORT logs its gradient graph's passes at info level
                warnings.simplefilter("ignore")
                artifacts.generate_artifacts(graph_model, requires_grad=trained, frozen_params=frozen, loss=None,
                                             optimizer=None, artifact_directory=work)
        except Exception as e:  # ORT's gradient builder raises RuntimeError/Fail with C++ messages
            raise BSRError(f"onnxruntime cannot build the training graph ({one_line(e)[:300]}); report the "
                           f"model") from None
        _set_ir_version(work / TRAINING_MODEL, work / EVAL_MODEL)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        (work / OPTIMIZER_MODEL).write_bytes(optimizer_graph(optimizer, params).SerializeToString())
        if log:
            log(f"training graphs written ({len(trained)} trained tensors, {len(frozen)} frozen)")
        if ort_format:
            _ort_format(work, [TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL])
        write_metadata(work, {**metadata, "img_size": list(size), "trained": trained,
                              "optimizer": optimizer.to_dict(), "label_smoothing": float(label_smoothing)})
        if out.exists():
            out.rmdir()
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    files = {p.name: (p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*")))
             for p in sorted(out.iterdir())}
    return {"path": str(out), "seconds": time.perf_counter() - start, "files": files, "trained": len(trained),
            "frozen": len(frozen)}


def _set_ir_version(*paths: Path) -> None:
    """Write the graphs at `paths` back at IR `IR_VERSION` (onnx >= 1.18 stamps newer IRs that ORT 1.19 refuses)."""
    import onnx

    for path in paths:
        graph_model = onnx.load(str(path))
        if graph_model.ir_version != IR_VERSION:
            graph_model.ir_version = IR_VERSION
            onnx.save(graph_model, str(path))
