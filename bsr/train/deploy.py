"""A run's model as deployable files (`export_run`), and predictions from a run or an exported file (`predict`).

BSR (Sarkar et al., arXiv 2405.10951) drops tokens in inference too, so the default export keeps the patch:
- "safetensors": a bsr model file (`bsr.deploy.save_model`) with the BSR config, class names, mean/std and image
  size; `bsr.load(path)` rebuilds the run's model, giving its eval logits exactly. With `delta`, only what training
  changed (`bsr.deploy.save_delta`), against the base weights the run started from (`base_state`, named by sha256).
- "onnx": the model with token dropping inside the graph (`bsr.deploy.export_onnx`), checked against PyTorch under
  onnxruntime on the first test images of the run's dataset right after export.
- "timm": a plain timm state dict with the patch undone (`export_weights`), for tools that know only timm.
Multi-task runs export only as "timm": their `MultiTaskViT` (task heads, MoE layers) is not a timm model, which the
bsr file and the ONNX export rebuild.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..data import dataset_info
from ..deploy import export_onnx, save_delta, save_model, verify_onnx
from ..deploy.predict import Predictor, file_predictor, predict as predict_files, torch_predictor
from ..errors import BSRError
from .batches import build_data
from .build import backbone, image_size, pick_device, setup_model
from .config import TrainConfig
from .runs import config_of_run, export_weights, load_run, refuse_run_file

EXPORT_FORMATS = ("safetensors", "onnx", "timm")
SUFFIXES = {"safetensors": ".safetensors", "onnx": ".onnx", "timm": ".safetensors"}  # what each format writes
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
VERIFY_IMAGES = 8  # test images the ONNX export is checked on


def export_format(out: str | Path, fmt: Optional[str]) -> str:
    """The format of an export to `out`: `fmt` when given, else picked by the file's extension; a name whose extension
    does not match what the format writes (`w.pth` holding safetensors bytes) is refused in one line."""
    suffix = Path(out).suffix.lower()
    if fmt is None:
        fmt = {".safetensors": "safetensors", ".onnx": "onnx"}.get(suffix)
        if fmt is None:
            raise BSRError(f"OUT={out} has no export extension; name it .safetensors (bsr model file) or .onnx (ONNX), "
                           f"or pass --format")
    if fmt in SUFFIXES and suffix != SUFFIXES[fmt]:
        raise BSRError(f"--format {fmt} writes a {SUFFIXES[fmt]} file, but OUT={out} ends in {suffix or 'nothing'}; "
                       f"name it {Path(out).with_suffix(SUFFIXES[fmt]).name}")
    return fmt


def _quiet(_: str) -> None:
    pass


def base_state(run: str | Path | TrainConfig) -> dict[str, torch.Tensor]:
    """The weights a run (its directory, or its config) started from: its timm model as `bsr.train.build` builds it
    (base weights loaded, before the method), without the head (a fresh head is trained by every run, so a delta
    always holds it). `bsr.deploy.apply_delta(delta, base_state(run))` rebuilds the trained model."""
    cfg = run if isinstance(run, TrainConfig) else config_of_run(run)[0]
    model = setup_model(cfg, torch.device("cpu"), apply=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("head.")}


def run_class_names(cfg: TrainConfig, num_classes: int) -> Optional[list[str]]:
    """The run's class names (kept in its config for folder/CSV datasets), else the dataset's, when they fit the head
    (a run may have trained a wider head)."""
    try:
        names = list(cfg.class_names or dataset_info(cfg.dataset).classes)
    except BSRError:
        return None
    return names if len(names) == num_classes else None


def _model_kwargs(cfg: TrainConfig, vit: nn.Module) -> dict:
    """The `timm.create_model` keyword arguments that rebuild the run's model (as `bsr.train.build` made it)."""
    kwargs = {"num_classes": int(vit.num_classes)}
    kwargs.update({k: v for k, v in (("img_size", cfg.img_size), ("patch_size", cfg.patch_size)) if v is not None})
    return kwargs


def _check_options(cfg: TrainConfig, run: Path, fmt: str, delta: bool, dtype: str) -> None:
    if fmt not in EXPORT_FORMATS:
        raise BSRError(f"format={fmt!r} is unknown; use one of {', '.join(EXPORT_FORMATS)}")
    if dtype not in DTYPES:
        raise BSRError(f"dtype={dtype!r} is not valid; use fp32, fp16 or bf16")
    if delta and fmt != "safetensors":
        raise BSRError(f"--delta writes a bsr safetensors file; drop --delta for --format {fmt}")
    if fmt == "onnx" and dtype != "fp32":
        raise BSRError("the ONNX export is float32 (onnxruntime's CPU kernels have no bf16 matmul); drop --dtype")
    if cfg.tasks and fmt != "timm":
        raise BSRError(f"run {run} is multi-task ({','.join(cfg.tasks)}): its model (task heads, MoE layers) is not a "
                       f"timm model, which --format {fmt} rebuilds; export it with --format timm")


def verify_images(cfg: TrainConfig, img_size: int, count: int = VERIFY_IMAGES) -> tuple[torch.Tensor, str]:
    """The first `count` test images of the run's dataset, preprocessed as in evaluation, and where they came from;
    seeded random images (said so) when the dataset cannot be read here."""
    try:
        test_set = build_data(cfg, img_size, train=False)[2]
        n = min(count, len(test_set))
        return torch.stack([test_set[i][0] for i in range(n)]), f"{n} test images of {cfg.dataset}"
    except BSRError as e:
        gen = torch.Generator().manual_seed(0)
        return torch.randn(count, 3, img_size, img_size, generator=gen), f"{count} random images ({e})"


def export_run(run: str | Path, out: str | Path, fmt: Optional[str] = None, delta: bool = False,
               dtype: str = "fp32", log: Callable[[str], None] = _quiet) -> dict:
    """Write run `run`'s trained model to `out` in format `fmt` (default: by `out`'s extension; see the module
    docstring); returns a record: {path, format, bytes, tensors?, base_id?, verify?}. `out` may not be one of the
    run's own files, and its extension must be the format's."""
    run = Path(run)
    refuse_run_file(run, out)
    fmt = export_format(out, fmt)
    if fmt == "timm":
        if delta:
            raise BSRError("--delta writes a bsr safetensors file; drop --delta for --format timm")
        return {**export_weights(run, out, dtype), "format": "timm"}
    cfg, model = load_run(run, torch.device("cpu"))
    _check_options(cfg, run, fmt, delta, dtype)
    vit = backbone(model)
    info = dict(class_names=run_class_names(cfg, int(vit.num_classes)), mean=list(cfg.mean), std=list(cfg.std))
    extra = {"source_run": str(run), "method": cfg.method, "dataset": cfg.dataset}
    if fmt == "onnx":
        record = export_onnx(model, out, metadata={**info, "model_name": cfg.model, **extra})
        images, where = verify_images(cfg, image_size(model))
        log(f"verifying {out} against PyTorch on {where}")
        return {**record, "format": "onnx", "verify": {**verify_onnx(model, out, images), "images": where}}
    common = dict(model_name=cfg.model, model_kwargs=_model_kwargs(cfg, vit), extra=extra, dtype=DTYPES[dtype], **info)
    if delta:
        log("rebuilding the run's base model to name the base weights by sha256")
        return {**save_delta(model, out, base_state=base_state(cfg), **common), "format": "delta"}
    return {**save_model(model, out, **common), "format": "safetensors"}


def run_predictor(run: str | Path, device: str = "cpu") -> Predictor:
    """A `Predictor` of a run's trained model in PyTorch: its eval transform (image size, mean/std) and class names."""
    cfg, model = load_run(run, pick_device(device))
    if cfg.tasks:
        raise BSRError(f"run {run} is multi-task ({','.join(cfg.tasks)}): bsr predict runs single-task models; "
                       f"evaluate it with bsr eval")
    vit = backbone(model)
    return torch_predictor(model, img_size=image_size(model), mean=cfg.mean, std=cfg.std,
                           class_names=run_class_names(cfg, int(vit.num_classes)))


def predict(target: str | Path, images: Sequence[str | Path], k: int = 5, device: str = "cpu",
            threads: Optional[int] = None) -> tuple[Predictor, list[dict]]:
    """Top-`k` classes of each image file by `target`: a run directory, or a file written by `bsr export`
    (.safetensors bsr model or .onnx). Returns (the predictor used, [{image, top: [(class, probability)]}])."""
    target = Path(target)
    if target.is_dir():
        predictor = run_predictor(target, device)
    elif target.exists():
        predictor = file_predictor(target, device, threads)
    else:
        raise BSRError(f"{target} does not exist; give a run directory or a file written by bsr export")
    return predictor, predict_files(predictor, images, k)
