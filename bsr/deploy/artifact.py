"""Deployable model files: a BSR-reprogrammed timm ViT in safetensors, with the BSR configuration in its metadata.

A full file (`save_model` / `load_model`) holds the model's inference weights in float32 under timm's own
`state_dict` keys, plus JSON metadata (format tag `bsr-model-1`): the timm model name and keyword arguments, the
`BSRConfig`, class names, normalisation and versions. Loading rebuilds the model with `timm.create_model`, loads the
weights strictly and re-applies `bsr.core.patch.reprogram`, so the token dropping the model was evaluated with comes
back with it (Sarkar et al., arXiv 2405.10951: dropping applies in inference too).

A delta file (`save_delta` / `apply_delta`, format tag `bsr-delta-1`) holds only the tensors that differ from the base
weights the run started from, like a PEFT adapter, and names that base by `state_sha256`; applying it onto another
base is refused. A peft LoRA model is merged (on a copy) before either is written.
"""

from __future__ import annotations

import copy
import hashlib
import json
from itertools import chain
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import timm
import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..core.config import BSRConfig
from ..core.frozen import float_storage, int8_storage
from ..core.patch import bsr_state, reprogram, resolve_for
from ..errors import BSRError
from ..tensorfile import save_tensors
from ..version import __version__

FORMAT = "bsr-model-1"
DELTA_FORMAT = "bsr-delta-1"
_META_KEY = "bsr"  # safetensors metadata key holding the JSON document
_EVAL_EQUIVALENT = ("Dropout", "DropPath", "Identity")  # modules that do nothing in eval mode


# --- helpers shared with the ONNX export ------------------------------------------------------------------------------

def one_line(text: object) -> str:
    """`text` on one line (error messages from third-party libraries may span several)."""
    return " ".join(str(text).split())


def host_vit(model: nn.Module) -> nn.Module:
    """The timm ViT inside `model` (unwraps a peft wrapper without merging)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def merged_model(model: nn.Module) -> nn.Module:
    """The timm ViT to deploy: `model` itself, or for a peft model a merged copy (`model` is left unchanged)."""
    if callable(getattr(model, "merge_and_unload", None)):
        model = copy.deepcopy(model).merge_and_unload()  # W + (alpha / r) B A, adapters gone
    if any(hasattr(m, "base_layer") for m in model.modules()):
        raise BSRError("model still holds peft adapter layers; pass the PeftModel itself (it is merged on a copy) "
                       "or call merge_and_unload() first")
    return model


def state_sha256(state: Mapping[str, Tensor]) -> str:
    """Deterministic hex sha256 of a state dict: sorted keys, each key, dtype, shape and raw bytes.

    Floating tensors are hashed as float32, so a base held in bf16/fp16 and its float32 upcast (equal values) hash
    alike, as do a base's CPU and GPU copies.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu")
        if t.is_floating_point():
            t = t.float()
        t = t.contiguous().reshape(-1)
        digest.update(f"{key}\0{str(t.dtype)}\0{tuple(state[key].shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# --- metadata ---------------------------------------------------------------------------------------------------------

def _bsr_config(vit: nn.Module, bsr: Optional[BSRConfig]) -> Optional[BSRConfig]:
    """The BSR config to save: `bsr` if given (checked against the model's patch), else the model's own, else None."""
    resolved = bsr_state(vit)
    if bsr is not None:
        if resolved is not None and resolve_for(vit, bsr) != resolved:
            raise BSRError("the bsr config passed to save differs from the one the model is reprogrammed with; "
                           "pass bsr=None to save the model's own configuration")
        return bsr
    if resolved is None:
        return None
    return BSRConfig(trainable_blocks=list(resolved.trainable_blocks), drop_blocks=list(resolved.drop_blocks),
                     keep_rate=resolved.keep_rate, fuse_token=resolved.fuse_token, drop_in_eval=resolved.drop_in_eval,
                     score_grad=resolved.score_grad, frozen_dtype=resolved.frozen_dtype, recompute=resolved.recompute,
                     token_score=resolved.token_score)


def _usual_kwargs(vit: nn.Module) -> dict:
    """The `timm.create_model` overrides fine-tuned ViTs usually carry, read from the model itself."""
    square = lambda size: size[0] if size[0] == size[1] else list(size)  # noqa: E731
    try:
        return {"img_size": square(vit.patch_embed.img_size), "patch_size": square(vit.patch_embed.patch_size),
                "embed_dim": vit.embed_dim, "depth": len(vit.blocks), "num_heads": vit.blocks[0].attn.num_heads,
                "num_classes": vit.num_classes}
    except (AttributeError, IndexError, TypeError):
        return {}


def _metadata_doc(vit: nn.Module, kind: str, model_name: Optional[str], model_kwargs: Optional[Mapping[str, Any]],
                  bsr: Optional[BSRConfig], class_names: Optional[Sequence[str]], mean: Optional[Sequence[float]],
                  std: Optional[Sequence[float]], extra: Optional[Mapping[str, Any]]) -> dict:
    """The JSON document stored in a model or delta file."""
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    model_name = model_name or cfg.get("architecture")
    if not model_name:
        raise BSRError("model_name is required: the model was not built by timm.create_model; pass the timm name "
                       "(e.g. model_name='vit_tiny_patch16_224') and model_kwargs that rebuild it")
    num_classes = getattr(vit, "num_classes", None)
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise BSRError(f"{len(class_names)} class names given for a model with {num_classes} classes; "
                       f"pass one name per class")
    config = _bsr_config(vit, bsr)
    doc = {"format": DELTA_FORMAT if kind == "delta" else FORMAT, "model_name": model_name,
           "model_kwargs": dict(model_kwargs if model_kwargs is not None else _usual_kwargs(vit)),
           "bsr": config.to_dict() if config is not None else None,
           "class_names": list(class_names) if class_names is not None else None,
           "mean": list(mean if mean is not None else cfg.get("mean", ())) or None,
           "std": list(std if std is not None else cfg.get("std", ())) or None,
           "versions": {"bsr": __version__, "timm": timm.__version__, "torch": torch.__version__.split("+")[0]},
           "extra": dict(extra or {})}
    try:
        json.dumps(doc, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise BSRError(f"model metadata is not JSON ({one_line(e)}); pass model_kwargs/extra as plain numbers, "
                       f"strings and lists (timm also takes layer names as strings, e.g. act_layer='gelu')") from None
    return doc


def read_metadata(path: str | Path) -> dict:
    """The metadata document of a bsr model or delta file (refuses any other file in one line)."""
    return _read(Path(path), want=None, tensors=False)[0]


def _read(path: Path, want: Optional[str], tensors: bool = True) -> tuple[dict, dict[str, Tensor]]:
    """Metadata and (optionally) tensors of a bsr file, checked: format tag, kind, weights hash."""
    if not path.is_file():
        raise BSRError(f"{path} does not exist; give the path of a file written by bsr.deploy.save_model")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as e:  # safetensors raises its own error type for a bad header or a short file
        raise BSRError(f"{path} is not a readable safetensors file ({one_line(e)}); it is corrupt or truncated, "
                       f"export it again") from None
    try:
        doc = json.loads(raw[_META_KEY])
        fmt = doc["format"]
    except (KeyError, TypeError, ValueError):
        raise BSRError(f"{path} is a safetensors file but not a bsr model file (no '{_META_KEY}' metadata); "
                       f"write it with bsr.deploy.save_model, or load plain weights with timm") from None
    if fmt not in (FORMAT, DELTA_FORMAT):
        raise BSRError(f"{path} has format {fmt!r}, which this bsr does not read ({FORMAT}, {DELTA_FORMAT}); "
                       f"upgrade bsr or export it again")
    missing = [k for k in ("model_name", "model_kwargs", "bsr", "weights_sha256") if k not in doc]
    if missing or not isinstance(doc["model_kwargs"], dict):
        raise BSRError(f"{path} has incomplete bsr metadata (missing {missing or ['model_kwargs as a dict']}); "
                       f"export it again")
    if want is not None and fmt != want:
        hint = "use bsr.deploy.apply_delta(path, base_state)" if fmt == DELTA_FORMAT else "use bsr.deploy.load(path)"
        raise BSRError(f"{path} is a {fmt} file, not {want}; {hint}")
    if tensors and state_sha256(state) != doc.get("weights_sha256"):
        raise BSRError(f"{path} is corrupt: its weights do not match the sha256 recorded at export; export it again")
    return doc, state


def _write(path: Path, state: dict[str, Tensor], doc: dict) -> dict:
    """Write tensors + metadata atomically; returns a small record of what was written."""
    doc = {**doc, "weights_sha256": state_sha256(state)}
    save_tensors(path, state, metadata={"format": "pt", _META_KEY: json.dumps(doc)})
    return {"path": str(path), "format": doc["format"], "tensors": len(state), "bytes": path.stat().st_size}


# --- rebuilding -------------------------------------------------------------------------------------------------------

def _create(doc: dict, device: str = "meta") -> nn.Module:
    """`timm.create_model(name, pretrained=False, **kwargs)` from a metadata document, one-line errors."""
    name, kwargs = doc["model_name"], doc["model_kwargs"]
    if not timm.is_model(name):
        raise BSRError(f"timm has no model named {name!r} (timm {timm.__version__}); install the timm version that "
                       f"made the file ({doc.get('versions', {}).get('timm', '?')}) or register the model first")
    try:
        with torch.device(device):
            return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise BSRError(f"timm cannot build {name!r} with model_kwargs {kwargs}: {one_line(e)}; "
                       f"fix the model name or kwargs") from None


def _host_type(module: nn.Module) -> str:
    """Name of the first class in `module`'s MRO that bsr did not define (BSRBlock -> Block, ...)."""
    return next(c.__name__ for c in type(module).__mro__ if not c.__module__.startswith("bsr."))


def _structure(model: nn.Module) -> dict[str, str]:
    """Per module: host class and `extra_repr` (widths, eps, activation...); eval no-ops are left out."""
    return {name: f"{_host_type(m)}({m.extra_repr()})" for name, m in model.named_modules()
            if _host_type(m) not in _EVAL_EQUIVALENT}


def _mismatch(expected: Mapping[str, tuple], got: Mapping[str, tuple]) -> Optional[str]:
    """First difference between two {key: shape} maps, worded for an error message, or None."""
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing:
        return f"{len(missing)} missing keys (e.g. {missing[0]!r})"
    if unexpected:
        return f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]!r})"
    for key in sorted(expected):
        if tuple(expected[key]) != tuple(got[key]):
            return f"{key!r} has shape {tuple(got[key])}, the model needs {tuple(expected[key])}"
    return None


def _check_rebuilds(vit: nn.Module, state: Mapping[str, Tensor], doc: dict) -> None:
    """Refuse to save a file whose metadata would rebuild a different architecture (checked on the meta device)."""
    rebuilt = _create(doc)
    problem = _mismatch({k: v.shape for k, v in rebuilt.state_dict().items()}, {k: v.shape for k, v in state.items()})
    if problem is None:
        ours, theirs = _structure(vit), _structure(rebuilt)
        diff = next((n for n in sorted(set(ours) | set(theirs)) if ours.get(n) != theirs.get(n)), None)
        attrs = ("global_pool", "num_prefix_tokens", "no_embed_class", "dynamic_img_size")
        diff = diff or next((a for a in attrs if getattr(vit, a, None) != getattr(rebuilt, a, None)), None)
        problem = None if diff is None else f"{diff!r} differs"
    if problem:
        raise BSRError(f"timm.create_model({doc['model_name']!r}, **{doc['model_kwargs']}) does not rebuild this "
                       f"model: {problem}; pass the model_kwargs the model was built with")


def _build(doc: dict, state: dict[str, Tensor], path: Path, device: str | torch.device) -> nn.Module:
    """Rebuild the model from metadata, load `state` strictly, re-apply the BSR patch, eval mode."""
    state = float_storage(state)  # int8 frozen weights with their scales (frozen_dtype int8) back to float
    state = {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in state.items()}
    model = _create(doc)
    problem = _mismatch({k: v.shape for k, v in model.state_dict().items()}, {k: v.shape for k, v in state.items()})
    if problem:
        raise BSRError(f"{path} does not fit timm model {doc['model_name']!r}: {problem}; the file was written for "
                       f"another architecture or timm version")
    model.load_state_dict(state, strict=True, assign=True)  # meta parameters take the file's tensors
    if any(t.is_meta for t in chain(model.parameters(), model.buffers())):  # a non-persistent buffer: build for real
        model = _create(doc, device="cpu")
        model.load_state_dict(state, strict=True)
    if doc["bsr"] is not None:
        try:
            config = BSRConfig(**doc["bsr"])
        except TypeError as e:
            raise BSRError(f"{path} has a BSR config this bsr does not know ({one_line(e)}); upgrade bsr") from None
        reprogram(model, config)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})  # what timm's resolve_data_config reads
    cfg.update(num_classes=getattr(model, "num_classes", cfg.get("num_classes")),
               input_size=(3, *model.patch_embed.img_size) if hasattr(model, "patch_embed") else cfg.get("input_size"))
    cfg.update({k: tuple(doc[k]) for k in ("mean", "std") if doc.get(k)})
    if doc.get("class_names"):
        cfg["label_names"] = list(doc["class_names"])
    model.pretrained_cfg = cfg
    return model.to(device).eval()


# --- public API -------------------------------------------------------------------------------------------------------

def _cpu32(t: Tensor) -> Tensor:
    """A CPU, contiguous copy of `t` (never a view: a rebuilt model must not share the caller's tensors), floating
    tensors in float32."""
    return t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype, copy=True).contiguous()


def inference_state(model: nn.Module) -> dict[str, Tensor]:
    """The deployable weights of `model` (a reprogrammed timm ViT or a peft model): float32, CPU, timm's keys."""
    return {k: _cpu32(v) for k, v in merged_model(model).state_dict().items()}


STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _stored(state: dict[str, Tensor], dtype: Optional[str]) -> dict[str, Tensor]:
    """`state` with its floating tensors in the storage `dtype` (None / float32: unchanged); loading upcasts."""
    if dtype is None or STORAGE_DTYPES.get(dtype) is torch.float32:
        return state
    if dtype not in STORAGE_DTYPES:
        raise BSRError(f"dtype={dtype!r} is not a storage dtype; use one of float32, float16, bfloat16")
    return {k: v.to(STORAGE_DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}


def save_model(model: nn.Module, path: str | Path, *, model_name: Optional[str] = None,
               model_kwargs: Optional[Mapping[str, Any]] = None, bsr: Optional[BSRConfig] = None,
               class_names: Optional[Sequence[str]] = None, mean: Optional[Sequence[float]] = None,
               std: Optional[Sequence[float]] = None, extra: Optional[Mapping[str, Any]] = None,
               dtype: Optional[str] = None) -> dict:
    """Write `model`'s inference weights (float32) and its BSR configuration to a safetensors file, atomically.

    `model_name` + `model_kwargs` must rebuild the model with `timm.create_model` (checked before writing): the name
    defaults to the model's timm architecture, the kwargs to the model's image and patch size, width, depth, heads
    and classes; pass them when the model needs others. `bsr` defaults to the configuration the model is
    reprogrammed with, `mean`/`std` to the model's `pretrained_cfg`. `dtype` ("float16", "bfloat16") stores the
    floating weights at that precision (half the file; loading computes in float32 from the rounded weights).
    Returns {path, format, tensors, bytes}.
    """
    vit = merged_model(model)
    state = inference_state(vit)
    doc = _metadata_doc(vit, "full", model_name, model_kwargs, bsr, class_names, mean, std, extra)
    _check_rebuilds(vit, state, doc)
    return _write(Path(path), int8_storage(vit, _stored(state, dtype)), doc)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved by `save_model`: timm model, weights loaded strictly, BSR patch re-applied, eval mode.

    The normalisation, class names and input size go into `model.pretrained_cfg` (as timm's data config reads them).
    """
    path = Path(path)
    doc, state = _read(path, want=FORMAT)
    return _build(doc, state, path, device)


def save_delta(model: nn.Module, path: str | Path, *, base_state: Mapping[str, Tensor], base_id: Optional[str] = None,
               model_name: Optional[str] = None, model_kwargs: Optional[Mapping[str, Any]] = None,
               bsr: Optional[BSRConfig] = None, class_names: Optional[Sequence[str]] = None,
               mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
               extra: Optional[Mapping[str, Any]] = None, dtype: Optional[str] = None) -> dict:
    """Write only the tensors of `model` that differ from `base_state` (the weights the run started from).

    Trained blocks, norm and head (for LoRA: the merged weights of the adapted layers) are kept; a frozen weight the
    lean preset stores in bf16 counts as unchanged when it is the base rounded to bf16 (loading rounds it again).
    `base_id` (sha256 by `state_sha256`) is computed from `base_state` when not given, and checked when given.
    `dtype` stores the delta's floating tensors at that precision, as in `save_model`. Returns {path, format, tensors, bytes, base_id}.
    """
    vit = merged_model(model)
    live = {k: v.detach() for k, v in vit.state_dict().items()}
    extra_base = sorted(set(base_state) - set(live))
    if extra_base:
        raise BSRError(f"base_state has {len(extra_base)} keys the model lacks (e.g. {extra_base[0]!r}); pass the "
                       f"state dict of the timm model the run started from")
    actual = state_sha256(base_state)
    if base_id is not None and base_id != actual:
        raise BSRError(f"base_id {base_id[:12]}... does not match base_state (sha256 {actual[:12]}...); pass the id "
                       f"computed by bsr.deploy.state_sha256(base_state)")

    def unchanged(key: str) -> bool:
        base = base_state.get(key)
        return base is not None and base.shape == live[key].shape and torch.equal(
            live[key].cpu(), base.detach().to("cpu", live[key].dtype))

    delta = {k: _cpu32(v) for k, v in live.items() if not unchanged(k)}
    full = {**{k: _cpu32(v) for k, v in base_state.items()}, **delta}
    doc = _metadata_doc(vit, "delta", model_name, model_kwargs, bsr, class_names, mean, std, extra)
    doc.update(base_id=actual, base_tensors=len(base_state))
    _check_rebuilds(vit, full, doc)
    return {**_write(Path(path), _stored(delta, dtype), doc), "base_id": actual}


def apply_delta(delta_path: str | Path, base_state: Mapping[str, Tensor],
                device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the trained model from a delta file and the base weights it was made against (checked by sha256)."""
    path = Path(delta_path)
    doc, delta = _read(path, want=DELTA_FORMAT)
    actual = state_sha256(base_state)
    if actual != doc["base_id"]:
        raise BSRError(f"{path} was made for base weights sha256 {doc['base_id'][:12]}... but the given base hashes "
                       f"to {actual[:12]}...; pass the base the run started from")
    state = {**{k: _cpu32(v) for k, v in base_state.items()}, **delta}
    return _build(doc, state, path, device)

