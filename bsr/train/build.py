"""The one model builder of `bsr`, used by training, `bsr bench` and `bsr study`: a timm ViT with its base weights,
the fine-tuning method applied (`bsr.train.methods`), or the multi-task model of SPEC section 5 (`bsr.core.moe`).

Base weights: timm's pretrained ones (`pretrained`), a local file (`checkpoint`: .safetensors, .npz or weights-only
.pth/.pt), converted weights named in `bsr.weights` (`checkpoint: dinov2-s`; `auto` picks them for their
architecture, e.g. `vit_small_patch14_dinov2`, converting them on first use), the embedded Fashion-MNIST weights of
the micro model, or none (random init).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import timm
import torch
from torch import nn

from ..core import models  # noqa: F401  (registers vit_micro_patch4_28)
from ..core.frozen import float_storage
from ..core.moe import moeify
from ..core.multitask import MultiTaskViT
from ..data import dataset_info
from ..errors import BSRError
from .config import DEVICES, MICRO_MODEL, TrainConfig, check_device_name
from .methods import apply_method, check_host, host

EMBEDDED_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "vit_micro_fashion.safetensors"


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The timm model of `cfg` with its base weights (pretrained, local checkpoint, embedded or none)."""
    kwargs = {k: v for k, v in (("img_size", cfg.img_size), ("patch_size", cfg.patch_size)) if v is not None}
    if not timm.is_model(cfg.model):
        close = timm.list_models(f"*{cfg.model.split('_')[0]}*")[:5]
        raise BSRError(f"unknown model {cfg.model!r}; try one of {', '.join(close) or 'timm.list_models()'}")
    try:
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes, **kwargs)
    except (RuntimeError, ValueError, TypeError, AssertionError, OSError) as e:
        raise BSRError(f"cannot build model {cfg.model!r} with {kwargs or 'its defaults'}: "
                       f"{' '.join(str(e).split())[:200]}") from None
    check_host(model, f"model {cfg.model!r}")
    cfg.bsr.resolve(len(model.blocks))  # bad block indices fail before any weights are read
    for name in ("mean", "std"):  # unset: the model's own normalisation, recorded in the resolved config
        if getattr(cfg, name) is None:
            setattr(cfg, name, [float(v) for v in model.pretrained_cfg.get(name, (0.5, 0.5, 0.5))])
    weights = base_weights_path(cfg)
    if weights is not None:
        load_base_weights(model, weights)
    return model


def base_weights_path(cfg: TrainConfig) -> Optional[Path]:
    """The local weights file `cfg.checkpoint` points at: "auto" gives the embedded weights of the micro model and
    the converted weights of an architecture `bsr.weights` knows (unless `pretrained`), a name of `bsr.weights.NAMES`
    those weights (converted on first use)."""
    from .. import weights

    if cfg.checkpoint == "none":
        return None
    if cfg.checkpoint == "auto":
        if cfg.pretrained:
            return None
        if cfg.model == MICRO_MODEL:
            if not EMBEDDED_WEIGHTS.is_file():
                raise BSRError(f"embedded weights {EMBEDDED_WEIGHTS} are missing; rebuild them "
                               f"(bsr/assets/README.md) or pass --checkpoint none")
            return EMBEDDED_WEIGHTS
        converted = weights.for_model(cfg.model)
        return weights.fetch(converted.name, log=_log) if converted is not None else None
    if cfg.checkpoint in weights.NAMES:
        return weights.fetch(cfg.checkpoint, log=_log)
    path = Path(cfg.checkpoint).expanduser()
    if not path.is_file():
        raise BSRError(f"checkpoint={cfg.checkpoint!r}: no such file")
    return path


def _log(message: str) -> None:
    print(f"bsr: {message}", file=sys.stderr, flush=True)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or .pth/.pt (weights only, never arbitrary pickles); a bsr model file's int8
    frozen weights (frozen_dtype int8) come back as float, exactly; int8 weights without bsr's scales are refused."""
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            state = float_storage(load_file(str(path)))
            int8 = next((k for k, v in state.items() if v.dtype == torch.int8), None)
            if int8 is not None:
                raise BSRError(f"weights {path} hold int8 tensors without bsr's per-channel scales (e.g. {int8!r}); "
                               f"give base weights in float (a bsr model file or `bsr export --format timm`)")
            return state
        if path.suffix in (".pth", ".pt", ".bin"):
            state = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("model", "state_dict", "model_ema"):
                if isinstance(state, dict) and isinstance(state.get(key), dict):
                    state = state[key]
            return state
    except BSRError:
        raise
    except Exception as e:  # any parse failure of a user file is a user error: report it in one line
        raise BSRError(f"cannot read weights {path}: {type(e).__name__}: {' '.join(str(e).split())[:160]}") from None
    raise BSRError(f"weights {path} have an unknown format; use .safetensors, .npz, .pth or .pt")


def _resample_as_trained(state: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    """Resample the position table of converted weights the way their source model did (`pos_embed_resample` in the
    file's metadata), before timm's own resampling (which antialiases) would see a size mismatch."""
    from safetensors import safe_open

    from ..weights.dinov2_onnx import resample_pos_embed

    if path.suffix != ".safetensors" or "pos_embed" not in state or not hasattr(model, "pos_embed"):
        return
    with safe_open(str(path), framework="pt") as f:
        how = (f.metadata() or {}).get("pos_embed_resample")
    if how == "bicubic-no-antialias" and state["pos_embed"].shape != model.pos_embed.shape:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], model.patch_embed.grid_size,
                                                model.num_prefix_tokens)


def load_base_weights(model: nn.Module, path: Path) -> None:
    """Load `path` into `model`: timm adapts pos_embed/patch size, a head of another size is left at init."""
    if path.suffix == ".npz":
        try:
            model.load_pretrained(str(path))  # timm's own loader for the big_vision/JAX checkpoints
        except Exception as e:
            raise BSRError(f"cannot load npz weights {path}: {type(e).__name__}: {str(e)[:160]}") from None
        return
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = read_weights(path)
    _resample_as_trained(state, model, path)
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e)[:160]}"
        raise BSRError(f"weights {path} do not fit {type(model).__name__}: {reason}") from None
    own = model.state_dict()
    # A head trained for another number of classes is dropped: fine-tuning starts with a fresh head.
    state = {k: v for k, v in state.items() if not (k in own and own[k].shape != v.shape and k.startswith("head."))}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.startswith("head.")]
    if mismatched or missing:
        key = (mismatched or missing)[0]
        raise BSRError(f"weights {path} do not fit model: {'shape of' if mismatched else 'missing'} {key!r}; "
                       f"check --model, --img-size and --patch-size")
    model.load_state_dict(state, strict=False)



def pick_device(name: str) -> torch.device:
    """The torch device `name` says ("auto": CUDA if present, else CPU): auto, cpu, cuda or cuda:N of a GPU that is
    there; anything else (mps, meta, xpu, a missing GPU) is a one-line error. Every command picks its device here."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BSRError(f"device={name!r} but CUDA is not available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BSRError(f"device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                           f"use {DEVICES} with N below that")
    return device


def setup_model(cfg: TrainConfig, device: torch.device, num_classes: Optional[int] = None,
                task_classes: Optional[Sequence[int]] = None, apply: bool = True) -> nn.Module:
    """Build, load base weights, apply the method; seeded so new parameters (head, LoRA) are reproducible.

    With `cfg.tasks`: a `bsr.core.multitask.MultiTaskViT` (see `build_multitask_model`) with heads of `task_classes`
    classes (default: each task dataset's). Otherwise the timm model with a head of `num_classes` (default:
    `cfg.num_classes`, else the dataset's). `apply=False` leaves the method out (the host model as built, e.g. for an
    inference baseline).
    """
    torch.manual_seed(cfg.seed)
    if cfg.tasks:
        classes = task_classes or [dataset_info(name).num_classes for name in cfg.tasks]
        model = build_multitask_model(cfg, classes, apply)
    else:
        model = build_model(cfg, num_classes or cfg.num_classes or dataset_info(cfg.dataset).num_classes)
        if apply:
            model = apply_method(model, cfg.method, bsr=cfg.bsr, last_k=cfg.last_k, lora_rank=cfg.lora_rank,
                                 lora_alpha=cfg.lora_alpha)
    if cfg.grad_checkpointing:
        backbone(model).set_grad_checkpointing(True)
    return model.to(device)


def check_num_classes(num_classes: int, dataset: str) -> None:
    """Refuse a head with fewer outputs than the dataset has classes (its labels would fall outside the head)."""
    classes = dataset_info(dataset).num_classes
    if num_classes < classes:
        raise BSRError(f"num_classes={num_classes} is fewer than the {classes} classes of {dataset}; drop "
                       f"--num-classes (default: the dataset's) or give at least {classes}")


def build_multitask_model(cfg: TrainConfig, task_classes: Sequence[int], apply: bool = True) -> MultiTaskViT:
    """The multi-task model of `cfg` (SPEC section 5): the base ViT without its head, its MLPs at `moe_blocks` (default
    the BSR trainable blocks) turned into MoE layers with one gate per task (unless `moe` is off), one linear head per
    task (`task_classes` classes each), and (if `apply`) the method applied to the backbone; the task heads always
    train."""
    vit = build_model(cfg, num_classes=0)
    if cfg.moe:
        blocks = cfg.moe_blocks if cfg.moe_blocks is not None else cfg.bsr.resolve(len(vit.blocks)).trainable_blocks
        moeify(vit, blocks, cfg.moe_experts, cfg.moe_top_k, len(task_classes), cfg.moe_aux_loss, cfg.moe_router_noise)
    model = MultiTaskViT(vit, list(task_classes))
    if apply:
        apply_method(model.backbone, cfg.method, bsr=cfg.bsr, last_k=cfg.last_k, lora_rank=cfg.lora_rank,
                     lora_alpha=cfg.lora_alpha, wrap=False)  # lora: adapters inside the backbone, no peft wrapper
        model.heads.requires_grad_(True)
    return model


def backbone(model: nn.Module) -> nn.Module:
    """The timm ViT inside `model`: a multi-task model's backbone, a peft model's base model, or `model`."""
    return model.backbone if isinstance(model, MultiTaskViT) else host(model)


def image_size(model: nn.Module) -> int:
    """Input side length in pixels of `model`'s ViT."""
    return int(backbone(model).patch_embed.img_size[0])
