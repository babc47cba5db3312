"""Predictions of a deployed BSR model on image files: the model's own preprocessing, token dropping as trained.

A `Predictor` is what prediction needs of a model: a function from a normalised batch (B, 3, S, S) to logits, the
image size S, mean/std and class names. `file_predictor` makes one from a file written by `bsr export` (a bsr
safetensors model, rebuilt with its patch by `load_model`, or an ONNX export run by onnxruntime, its metadata giving
the preprocessing); `torch_predictor` from a model in memory (`bsr.train` makes one from a run directory).
Preprocessing is the evaluation transform of training (`bsr.data.ImageTransform(train=False)`: `Resize((S, S))`,
scale to [0, 1], normalise), on images decoded by `bsr.data.images.open_image`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from bsr_device.images import open_image

from ..data import ImageTransform
from ..errors import BSRError
from .artifact import DELTA_FORMAT, FORMAT, load_model, read_metadata
from .onnx_export import _session, read_onnx_metadata

CHUNK = 32  # images per forward


@dataclass
class Predictor:
    """A model ready to predict: `logits` maps a normalised float32 batch (B, 3, S, S) to logits (B, C)."""

    logits: Callable[[Tensor], Tensor]
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: Optional[list[str]]
    source: str  # what runs it: "pytorch" or "onnxruntime"


def _square(size: Sequence[int] | int, where: str) -> int:
    size = [int(size)] * 2 if isinstance(size, int) else [int(s) for s in size]
    if size[0] != size[-1]:
        raise BSRError(f"{where} takes {size[0]}x{size[-1]} images; bsr predict resizes to square inputs only")
    return size[0]


def torch_predictor(model: nn.Module, *, img_size: int, mean: Sequence[float], std: Sequence[float],
                    class_names: Optional[Sequence[str]] = None) -> Predictor:
    """A `Predictor` of a PyTorch model (eval mode, no gradients, on the model's device; logits back on the CPU)."""
    device = next(model.parameters()).device
    model.eval()

    @torch.no_grad()
    def logits(batch: Tensor) -> Tensor:
        return model(batch.to(device)).float().cpu()

    return Predictor(logits, int(img_size), tuple(mean), tuple(std), list(class_names) if class_names else None,
                     "pytorch")


def file_predictor(path: str | Path, device: str | torch.device = "cpu", threads: Optional[int] = None) -> Predictor:
    """A `Predictor` of an exported file: a bsr model file (.safetensors) or an ONNX export (.onnx)."""
    path = Path(path)
    if not path.is_file():
        raise BSRError(f"{path} does not exist; give a run directory or a file written by bsr export")
    if path.suffix.lower() == ".onnx":
        return _onnx_predictor(path, threads)
    doc = read_metadata(path)
    if doc["format"] == DELTA_FORMAT:
        raise BSRError(f"{path} is a delta (only what training changed); predict with the run, or a full export "
                       f"(bsr export RUN OUT.safetensors without --delta)")
    assert doc["format"] == FORMAT
    model = load_model(path, device)
    cfg = model.pretrained_cfg
    mean, std = cfg.get("mean"), cfg.get("std")
    if not mean or not std:
        raise BSRError(f"{path} records no mean/std; export it again with bsr export")
    return torch_predictor(model, img_size=_square(model.patch_embed.img_size, str(path)), mean=mean, std=std,
                           class_names=cfg.get("label_names"))


def _onnx_predictor(path: Path, threads: Optional[int]) -> Predictor:
    session = _session(path, threads=threads)
    doc = read_onnx_metadata(path, session)
    missing = [k for k in ("img_size", "mean", "std") if not doc.get(k)]
    if missing:
        raise BSRError(f"{path} has no bsr metadata ({', '.join(missing)} missing): it was not written by bsr export; "
                       f"export the run again with --format onnx")

    def logits(batch: Tensor) -> Tensor:
        return torch.from_numpy(session.run(["logits"], {"images": batch.float().cpu().numpy()})[0])

    return Predictor(logits, _square(doc["img_size"], str(path)), tuple(doc["mean"]), tuple(doc["std"]),
                     doc.get("class_names") or None, "onnxruntime")


def load_images(paths: Sequence[str | Path], img_size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Image files as one normalised batch (B, 3, S, S), by the evaluation transform of training."""
    transform = ImageTransform(int(img_size), train=False, mean=mean, std=std)
    return torch.stack([transform(open_image(p)) for p in paths])


def top_k(logits: Tensor, k: int, class_names: Optional[Sequence[str]] = None) -> list[list[tuple[str, float]]]:
    """Per row of logits (B, C): the `k` most probable classes (name, or index as text) with their softmax
    probability, most probable first."""
    probs = torch.softmax(logits.double(), dim=-1)
    values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    label = (lambda i: class_names[i]) if class_names else str  # noqa: E731
    return [[(label(int(i)), float(v)) for v, i in zip(vs, ix)] for vs, ix in zip(values, indices)]


def predict(predictor: Predictor, images: Sequence[str | Path], k: int = 5) -> list[dict]:
    """Top-`k` classes of every image file: [{image, top: [(class, probability), ...]}, ...], in input order."""
    if isinstance(k, bool) or int(k) < 1:
        raise BSRError(f"top_k={k} must be at least 1")
    if not images:
        raise BSRError("no images given; pass one or more image files")
    results = []
    for start in range(0, len(images), CHUNK):
        chunk = list(images[start:start + CHUNK])
        batch = load_images(chunk, predictor.img_size, predictor.mean, predictor.std)
        logits = predictor.logits(batch)
        results += [{"image": str(p), "top": top} for p, top in zip(chunk, top_k(logits, int(k),
                                                                                    predictor.class_names))]
    return results


def format_predictions(results: list[dict]) -> list[str]:
    """Lines for the terminal: the image, then one indented `class  probability` line per class."""
    lines = []
    for r in results:
        lines.append(r["image"])
        lines += [f"  {name:<24} {100 * p:6.2f}%" for name, p in r["top"]]
    return lines
