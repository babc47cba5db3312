"""Fine-tune a timm ViT with one of the methods of the BSR paper (Sarkar et al., arXiv 2405.10951).

One `TrainConfig` (a dataclass, a help string per field) drives everything; it is layered defaults -> `--recipe` ->
YAML `--config` -> command-line flags, and the resolved config is saved with every artifact. The loop in `train`
reads top to bottom: schedule, forward, backward, clip, step, log, evaluate, checkpoint.

Reproducibility: the data order of an epoch is a permutation seeded by (seed, epoch), and each training image's
augmentation is seeded by (seed, epoch, index), so a run resumed mid-epoch from a checkpoint sees exactly the batches
the uninterrupted run would have seen, whatever the number of workers.

Data parallel (`torchrun --nproc-per-node N -m bsr train ...`, see `bsr.distributed`): every process takes its
contiguous slice of each global batch of `batch_size` images, so the union over ranks at step s is the single-process
batch of step s, and DDP's gradient average over equal slices is the single-process mean over the global batch. Only
rank 0 writes files and shows progress; test counts are summed over ranks, each rank evaluating a slice of the test
set. Resume: every rank reads the checkpoint (so the run directory must be on a filesystem all nodes see). With
`workers=0` resumed runs are bitwise those of an uninterrupted run of the same world size, dropout included: loading a
training item reseeds torch's generator by (seed, epoch, index), so the generator state at each forward depends only
on the rank's last item. With `workers>0` every rank restores rank 0's saved generator, so the dropout masks of the
other ranks (none of the shipped methods uses dropout by default) differ from the uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
import types
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from .checkpoint import CHECKPOINT_NAME, atomic_write_bytes, load_trainable, read_checkpoint, save_checkpoint
from .checkpoint import set_rng_state
from .checkpoint import unflatten_optimizer
from . import distributed
from .core.config import BSRConfig
from .distributed import Group
from .errors import BSRError
from .methods import METHODS, apply_method, count_params, format_tokens, host, tokens_per_block
from .recipes import RECIPE_NAMES, recipe_values

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_MODEL = "vit_micro_patch4_28"
EMBEDDED_WEIGHTS = ASSETS / "vit_micro_fashion.safetensors"


def _f(default: Any, help: str, **kw) -> Any:
    """A dataclass field with a help string (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a `bsr train` run depends on. The defaults are the embedded default run."""

    # model
    model: str = _f(EMBEDDED_MODEL, "timm model name (any ViT/DeiT)")
    img_size: Optional[int] = _f(None, "input size in pixels (default: the model's)")
    patch_size: Optional[int] = _f(None, "patch size (default: the model's)")
    num_classes: Optional[int] = _f(None, "classes of the head (default: the dataset's)")
    pretrained: bool = _f(False, "load timm's pretrained weights (downloads them)")
    checkpoint: str = _f("auto", 'base weights: .safetensors, .npz (timm loader) or .pth/.pt (weights only); "auto" '
                                 "= the embedded Fashion-MNIST weights for vit_micro_patch4_28, else none; "
                                 '"none" = random init')
    # data
    dataset: str = _f("digits-embedded", "dataset name (see bsr.data.DATASETS)")
    data_dir: Optional[str] = _f(None, "folder holding the dataset (default: the dataset's own)")
    download: bool = _f(False, "let torchvision download a missing dataset")
    limit: Optional[int] = _f(None, "use only this many images of each split (class-stratified)")
    rrc_scale: Optional[list[float]] = _f(None, "RandomResizedCrop scale range for training, e.g. 0.5,1 (none: resize)")
    hflip: bool = _f(False, "random horizontal flips in training")
    mean: list[float] = _f([0.5, 0.5, 0.5], "per-channel normalisation mean")
    std: list[float] = _f([0.5, 0.5, 0.5], "per-channel normalisation std")
    # method
    method: str = _f("bsr", f"fine-tuning method: {', '.join(METHODS)}")
    bsr: BSRConfig = field(default_factory=BSRConfig, metadata={"help": "BSR options"})
    last_k: int = _f(3, "blocks trained by --method last-k")
    lora_rank: int = _f(8, "LoRA rank (--method lora)")
    lora_alpha: int = _f(16, "LoRA alpha (--method lora)")
    # multi-task (SPEC section 5)
    tasks: Optional[list[str]] = _f(None, "train these datasets together, e.g. fashion-mnist,digits-embedded,"
                                          "sklearn-digits: shared backbone, one head per task, each step one batch "
                                          "(forward, backward, optimizer step) of every task in turn; replaces "
                                          "--dataset")
    moe: bool = _f(True, "multi-task: the MLPs of --moe-blocks become task-routed mixtures of experts (--no-moe: a "
                         "dense multi-task ViT)")
    moe_blocks: Union[str, list[int], None] = _f(None, "multi-task: blocks whose MLP becomes a mixture of experts, "
                                                       "e.g. 3,7,11 (none: the BSR trainable blocks)")
    moe_experts: int = _f(16, "multi-task: experts per MoE layer")
    moe_top_k: int = _f(4, "multi-task: experts each token is routed to")
    moe_aux_loss: float = _f(0.0, "multi-task: weight of the load-balancing loss (0: off)")
    moe_router_noise: float = _f(1.0, "multi-task: std of the noise added to router logits in training")
    # optimisation
    recipe: Optional[str] = _f(None, f"paper recipe whose values replace the defaults: {', '.join(RECIPE_NAMES)}")
    optimizer: str = _f("adamw", "sgd or adamw")
    lr: float = _f(4e-3, "peak learning rate")
    min_lr: float = _f(1e-5, "learning rate at the end of the cosine schedule")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(0.05, "weight decay (none on 1-D params, pos_embed, cls_token)")
    layer_decay: Optional[float] = _f(None, "layer-wise lr decay factor, e.g. 0.75 (none: off)")
    warmup_steps: int = _f(0, "linear warm-up steps (added to --warmup-epochs)")
    warmup_epochs: float = _f(0.3, "linear warm-up epochs")
    schedule: str = _f("cosine", "cosine (to --min-lr) or constant, after warm-up")
    epochs: int = _f(10, "training epochs (ignored if --steps is set)")
    steps: Optional[int] = _f(None, "training steps (overrides --epochs)")
    batch_size: int = _f(32, "training batch size")
    clip_grad: Optional[float] = _f(1.0, "clip the gradient norm to this (none: off)")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy")
    amp: str = _f("off", "mixed precision: off, bf16 or fp16")
    grad_checkpointing: bool = _f(False, "recompute activations in backward (timm's gradient checkpointing)")
    # run
    seed: int = _f(0, "seed of initialisation, data order and augmentation")
    eval_every: int = _f(0, "evaluate and checkpoint every N steps (0: every epoch)")
    log_every: int = _f(10, "write a metrics line every N steps")
    workers: int = _f(0, "data loader worker processes")
    out: Optional[str] = _f(None, "run directory (default: runs/<method>-<dataset>-<time>)")
    device: str = _f("auto", "auto, cpu, cuda, cuda:N or mps")
    threads: Optional[int] = _f(None, "CPU threads of torch; 1 suits small models and shared machines (spinning "
                                      "threads stall when cores are busy); none: torch's default (all cores)")

    def __post_init__(self) -> None:
        if isinstance(self.bsr, dict):
            self.bsr = make_bsr(self.bsr)
        hints = get_type_hints(TrainConfig)
        for f in fields(self):
            if f.name != "bsr":
                setattr(self, f.name, check_type(f.name, getattr(self, f.name), hints[f.name]))
        self._check_values()

    def _check_values(self) -> None:
        choices = {"method": METHODS, "optimizer": ("sgd", "adamw"), "amp": ("off", "bf16", "fp16"),
                   "schedule": ("cosine", "constant")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise BSRError(f"{name}={getattr(self, name)!r} is not valid; use one of {', '.join(allowed)}")
        if self.recipe is not None and self.recipe not in RECIPE_NAMES:
            raise BSRError(f"recipe={self.recipe!r} is unknown; use one of {', '.join(RECIPE_NAMES)}")
        positive = ("batch_size", "epochs", "log_every", "lora_rank", "last_k", "moe_experts", "moe_top_k")
        optional_positive = ("img_size", "patch_size", "num_classes", "limit", "steps", "clip_grad", "layer_decay",
                             "threads")
        for name in positive + optional_positive:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise BSRError(f"{name}={value} must be positive")
        for name in ("lr", "min_lr", "weight_decay", "warmup_steps", "warmup_epochs", "eval_every", "workers",
                     "label_smoothing", "momentum", "moe_aux_loss", "moe_router_noise"):
            if getattr(self, name) < 0:
                raise BSRError(f"{name}={getattr(self, name)} must not be negative")
        if self.rrc_scale is not None and (len(self.rrc_scale) != 2 or not 0 < self.rrc_scale[0] <= self.rrc_scale[1]
                                           <= 1):
            raise BSRError(f"rrc_scale={self.rrc_scale} must be two numbers 0 < low <= high <= 1, e.g. 0.5,1")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise BSRError(f"{name}={getattr(self, name)} must have 3 values (R,G,B)")
        if self.tasks is not None:
            self._check_tasks()

    def _check_tasks(self) -> None:
        if not self.tasks:
            raise BSRError("tasks is empty; name two or more datasets, e.g. --tasks fashion-mnist,sklearn-digits")
        if len(set(self.tasks)) != len(self.tasks):
            raise BSRError(f"tasks={','.join(self.tasks)} names a dataset twice; list each once")
        if self.method == "lora":
            raise BSRError("method=lora is not supported with --tasks (peft does not wrap the multi-task model); "
                           "use bsr, full, head, bitfit, last-k or tokendrop")
        for name in ("num_classes", "layer_decay"):
            if getattr(self, name) is not None:
                raise BSRError(f"{name} does not apply to multi-task runs (--tasks); drop it")
        if self.moe_top_k > self.moe_experts:
            raise BSRError(f"moe_top_k={self.moe_top_k} is more than moe_experts={self.moe_experts}; use "
                           f"1 <= moe_top_k <= moe_experts")

    @property
    def task_names(self) -> list[str]:
        """The datasets trained: `tasks`, or just `dataset` in a single-task run."""
        return list(self.tasks) if self.tasks else [self.dataset]

    def to_dict(self) -> dict:
        return {**asdict(self), "bsr": self.bsr.to_dict()}


# ------------------------------------------------------------------------------------------------- config layering


def type_name(tp: Any) -> str:
    """Human name of a type hint: `int`, `float or none`, `list of float`."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("none" if a is type(None) else type_name(a) for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    return getattr(tp, "__name__", str(tp))


def check_type(key: str, value: Any, tp: Any) -> Any:
    """`value` converted to type hint `tp` (int -> float, tuple -> list), or a `BSRError` naming `key`."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return check_type(key, value, arg)
            except BSRError:
                pass
    elif origin is list and isinstance(value, (list, tuple)):
        return [check_type(key, v, args[0]) for v in value]
    elif tp is bool and isinstance(value, bool):
        return value
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif tp is str and isinstance(value, str):
        return value
    raise BSRError(f"{key}={value!r} has the wrong type; expected {type_name(tp)}")


def make_bsr(values: dict) -> BSRConfig:
    """`BSRConfig` from a dict, refusing unknown keys; a `preset` key names the base the other keys override."""
    if not isinstance(values, dict):
        raise BSRError(f"bsr={values!r} must be a mapping of BSR options")
    values = dict(values)
    preset = values.pop("preset", "paper")
    known = {f.name for f in fields(BSRConfig)}
    for key in values:
        if key not in known:
            raise BSRError(f"unknown config key 'bsr.{key}'; BSR options are: preset, {', '.join(sorted(known))}")
    if not isinstance(preset, str):
        raise BSRError(f"bsr.preset={preset!r} has the wrong type; expected str")
    return BSRConfig.preset(preset, **values)


def make_config(values: dict) -> TrainConfig:
    """`TrainConfig` from a (possibly nested) dict, refusing unknown keys and wrong types."""
    known = {f.name for f in fields(TrainConfig)}
    for key in values:
        if key not in known:
            hint = " (BSR options go under 'bsr:')" if key in {f.name for f in fields(BSRConfig)} else ""
            raise BSRError(f"unknown config key {key!r}{hint}")
    return TrainConfig(**values)


def load_yaml(path: str | Path) -> dict:
    """A YAML mapping from `path`, with one-line errors."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise BSRError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise BSRError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BSRError(f"config file {path} must hold a mapping of options, not {type(data).__name__}")
    return data


def merge_options(*layers: dict) -> dict:
    """Layers of TrainConfig values, later ones winning; the `bsr` sub-mapping merges key by key."""
    merged: dict = {}
    for layer in layers:
        for key, value in layer.items():
            if key == "bsr" and isinstance(value, dict) and isinstance(merged.get("bsr"), dict):
                merged["bsr"] = {**merged["bsr"], **value}
            else:
                merged[key] = value
    return merged


def resolve_config(flags: Optional[dict] = None, config_file: Optional[str | Path] = None) -> TrainConfig:
    """Layer dataclass defaults -> recipe -> YAML file -> flags (`flags` holds only options the user gave)."""
    flags = flags or {}
    file_values = load_yaml(config_file) if config_file else {}
    recipe = flags.get("recipe", file_values.get("recipe"))
    dataset = flags.get("dataset", file_values.get("dataset", TrainConfig.dataset))
    values: dict = {}
    if recipe is not None:
        if not isinstance(recipe, str):
            raise BSRError(f"recipe={recipe!r} has the wrong type; expected str")
        values = recipe_values(recipe, dataset)
    return make_config(merge_options(values, file_values, flags))


# ------------------------------------------------------------------------------------------------- learning rate


def lr_at(step: int, *, lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0,
          schedule: str = "cosine") -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine from `lr` to `min_lr`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------- model


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The timm model of `cfg` with its base weights (pretrained, local checkpoint, embedded or none)."""
    import timm

    from .core import models  # noqa: F401  (registers vit_micro_patch4_28)

    kwargs = {k: v for k, v in (("img_size", cfg.img_size), ("patch_size", cfg.patch_size)) if v is not None}
    if not timm.is_model(cfg.model):
        close = timm.list_models(f"*{cfg.model.split('_')[0]}*")[:5]
        raise BSRError(f"unknown model {cfg.model!r}; try one of {', '.join(close) or 'timm.list_models()'}")
    try:
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes, **kwargs)
    except (RuntimeError, ValueError, TypeError, AssertionError, OSError) as e:
        raise BSRError(f"cannot build model {cfg.model!r} with {kwargs or 'its defaults'}: "
                       f"{' '.join(str(e).split())[:200]}") from None
    cfg.bsr.resolve(len(getattr(model, "blocks", ())))  # bad block indices fail before any weights are read
    weights = base_weights_path(cfg)
    if weights is not None:
        load_base_weights(model, weights)
    return model


def base_weights_path(cfg: TrainConfig) -> Optional[Path]:
    """The local weights file `cfg.checkpoint` points at ("auto": embedded weights for the embedded model)."""
    if cfg.checkpoint == "none":
        return None
    if cfg.checkpoint == "auto":
        if cfg.model == EMBEDDED_MODEL and not cfg.pretrained:
            if not EMBEDDED_WEIGHTS.is_file():
                raise BSRError(f"embedded weights {EMBEDDED_WEIGHTS} are missing; rebuild them "
                               f"(bsr/assets/README.md) or pass --checkpoint none")
            return EMBEDDED_WEIGHTS
        return None
    path = Path(cfg.checkpoint).expanduser()
    if not path.is_file():
        raise BSRError(f"checkpoint={cfg.checkpoint!r}: no such file")
    return path


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or .pth/.pt (weights only, never arbitrary pickles)."""
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        if path.suffix in (".pth", ".pt", ".bin"):
            state = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("model", "state_dict", "model_ema"):
                if isinstance(state, dict) and isinstance(state.get(key), dict):
                    state = state[key]
            return state
    except Exception as e:  # any parse failure of a user file is a user error: report it in one line
        raise BSRError(f"cannot read weights {path}: {type(e).__name__}: {' '.join(str(e).split())[:160]}") from None
    raise BSRError(f"weights {path} have an unknown format; use .safetensors, .npz, .pth or .pt")


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


# ------------------------------------------------------------------------------------------------- data


class EpochBatches(Sampler):
    """Batches of one epoch: a permutation seeded by (seed, epoch), drop_last, starting at batch `skip`.

    Yields lists of `(epoch, index)` keys for `SeededItems`. With `world_size` > 1 it yields this `rank`'s contiguous
    slice of each global batch of `batch_size` (which the world size must divide): the ranks' slices of step s
    together are exactly the single-process batch of step s.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, skip: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.epoch, self.skip = n, batch_size, seed, epoch, skip
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.n // self.batch_size - self.skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        part = self.batch_size // self.world_size
        for b in range(self.skip, self.n // self.batch_size):
            start = b * self.batch_size + self.rank * part
            yield [(self.epoch, i) for i in order[start:start + part]]


class SeededItems(Dataset):
    """Training items whose random augmentation is a pure function of (seed, epoch, index)."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        # torchvision's random transforms draw from torch's default CPU generator.
        torch.default_generator.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
        return self.base[index]


def build_data(cfg: TrainConfig, img_size: int, train: bool = True) -> tuple[Optional[Dataset], Dataset]:
    """(train set or None, test set) of `cfg.dataset` at `img_size`."""
    from .data import build_dataset

    common = dict(img_size=img_size, data_dir=cfg.data_dir, download=cfg.download, mean=tuple(cfg.mean),
                  std=tuple(cfg.std), limit=cfg.limit, seed=cfg.seed)
    train_set = None
    if train:
        scale = tuple(cfg.rrc_scale) if cfg.rrc_scale else None
        train_set = build_dataset(cfg.dataset, "train", train=True, rrc_scale=scale, hflip=cfg.hflip, **common)
    test_set = build_dataset(cfg.dataset, "test", train=False, **common)
    return train_set, test_set


def train_loader(items: SeededItems, cfg: TrainConfig, epoch: int, skip: int, group: Group) -> DataLoader:
    """This rank's slices of the batches of `epoch` from batch `skip` on."""
    sampler = EpochBatches(len(items), cfg.batch_size, cfg.seed, epoch, skip, group.rank, group.world_size)
    return DataLoader(items, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=group.device.type == "cuda")


def test_loader(test_set: Dataset, cfg: TrainConfig, device: torch.device, group: Optional[Group] = None) -> DataLoader:
    """The test set in order; in a group, this rank's contiguous slice of it (every image on exactly one rank)."""
    if group is not None and group.enabled:
        test_set = Subset(test_set, group.shard(len(test_set)))
    return DataLoader(test_set, batch_size=max(cfg.batch_size, 256), shuffle=False, num_workers=cfg.workers,
                      pin_memory=device.type == "cuda")


# ------------------------------------------------------------------------------------------------- helpers


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BSRError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BSRError(f"device={name!r} but CUDA is not available; use --device cpu")
    return device


def autocast(cfg: TrainConfig, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable parameters; no decay on 1-D params/pos_embed/cls_token; layer-wise lr scales."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    vit = host(model)  # timm's helpers read the ViT's own names and group_matcher, not peft's prefixes
    skip = set(vit.no_weight_decay()) if hasattr(vit, "no_weight_decay") else set()
    if cfg.layer_decay is not None:
        groups = param_groups_layer_decay(vit, cfg.weight_decay, skip, layer_decay=cfg.layer_decay)
    else:
        groups = param_groups_weight_decay(vit, cfg.weight_decay, no_weight_decay_list=skip)
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise BSRError(f"method={cfg.method!r} leaves nothing to train")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, cfg: TrainConfig,
             group: Optional[Group] = None, task: Optional[int] = None) -> float:
    """Top-1 accuracy (%) of `model` over `loader`; in a group, over the union of the ranks' loaders. `task`: the
    head of a multi-task model to evaluate."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(cfg, device):
            logits = model(images) if task is None else model(images, task)
        correct += (logits.argmax(-1) == labels).sum().item()
        total += labels.numel()
    model.train(was_training)
    if group is not None:
        correct, total = group.all_reduce_sum([correct, total])  # exact: counts stay far below 2**53
    return 100.0 * correct / max(total, 1)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on GPU, else the process's peak RSS (Linux VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def environment(device: torch.device) -> dict:
    import timm

    from . import __version__

    env = {"versions": {"bsr": __version__, "python": platform.python_version(), "torch": torch.__version__,
                        "timm": timm.__version__},
           "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                       "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}}
    if device.type == "cuda":
        env["machine"]["gpu"] = torch.cuda.get_device_name(device)
    return env


class RunFiles:
    """The run directory: config.yaml, metrics.jsonl, report.json and the checkpoint.

    `write=False` (data-parallel ranks other than 0) checks the directory like rank 0 but writes nothing.
    """

    def __init__(self, out: Path, write: bool = True) -> None:
        self.out, self.write = out, write
        self.metrics = out / "metrics.jsonl"

    def check(self, resuming: bool) -> None:
        """Refuse an out path that is a file, or that holds another run (never overwrite one)."""
        if self.out.exists() and not self.out.is_dir():
            raise BSRError(f"out={str(self.out)!r} exists and is not a directory")
        if not resuming and (self.out / "checkpoint.safetensors").exists():
            raise BSRError(f"out={str(self.out)!r} already holds a run; continue it with --resume {self.out} "
                           f"or pick another --out")
        existing = self.out
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise BSRError(f"out={str(self.out)!r} cannot be created: {existing} is not a directory")
        if not os.access(existing, os.W_OK):
            raise BSRError(f"out={str(self.out)!r} is not writable ({existing}); pick another --out")

    def prepare(self, cfg: TrainConfig) -> None:
        """Create the directory and write the resolved config."""
        if not self.write:
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BSRError(f"cannot create out dir {self.out}: {e.strerror or e}") from None
        atomic_write_bytes(self.out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines a killed run wrote after its last checkpoint (they will be written again)."""
        if not self.write or not self.metrics.exists():
            return
        keep = []
        for line in self.metrics.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                pass  # a line cut short by the kill
        atomic_write_bytes(self.metrics, "".join(ln + "\n" for ln in keep).encode())

    def log(self, record: dict) -> None:
        if not self.write:
            return
        try:
            with self.metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise BSRError(f"cannot write {self.metrics}: {e.strerror or e}") from None

    def report(self, report: dict) -> None:
        if not self.write:
            return
        atomic_write_bytes(self.out / "report.json", (json.dumps(report, indent=2) + "\n").encode())


def default_out(cfg: TrainConfig) -> str:
    return str(Path("runs") / f"{cfg.method}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")


# ------------------------------------------------------------------------------------------------- training


def setup_model(cfg: TrainConfig, device: torch.device, num_classes: Optional[int] = None) -> nn.Module:
    """Build, load base weights, apply the method; seeded so new parameters (head, LoRA) are reproducible.

    With `cfg.tasks`: a `bsr.moe.MultiTaskViT` (see `build_multitask_model`). Otherwise the timm model with a head of
    `num_classes` (default: `cfg.num_classes`, else the dataset's).
    """
    from .data import dataset_info

    torch.manual_seed(cfg.seed)
    if cfg.tasks:
        model = build_multitask_model(cfg)
    else:
        model = build_model(cfg, num_classes or cfg.num_classes or dataset_info(cfg.dataset).num_classes)
        model = apply_method(model, cfg.method, bsr=cfg.bsr, last_k=cfg.last_k, lora_rank=cfg.lora_rank,
                             lora_alpha=cfg.lora_alpha)
    if cfg.grad_checkpointing:
        backbone(model).set_grad_checkpointing(True)
    return model.to(device)


def build_multitask_model(cfg: TrainConfig) -> nn.Module:
    """The multi-task model of `cfg` (SPEC section 5): the base ViT without its head, its MLPs at `moe_blocks` (default
    the BSR trainable blocks) turned into MoE layers with one gate per task (unless `moe` is off), one linear head per
    task, and the method applied to the backbone; the task heads always train."""
    from .data import dataset_info
    from .core.moe import MultiTaskViT, moeify

    vit = build_model(cfg, num_classes=0)
    if cfg.moe:
        blocks = cfg.moe_blocks if cfg.moe_blocks is not None else cfg.bsr.resolve(len(vit.blocks)).trainable_blocks
        moeify(vit, blocks, cfg.moe_experts, cfg.moe_top_k, len(cfg.tasks), cfg.moe_aux_loss, cfg.moe_router_noise)
    model = MultiTaskViT(vit, [dataset_info(name).num_classes for name in cfg.tasks])
    apply_method(model.backbone, cfg.method, bsr=cfg.bsr, last_k=cfg.last_k)
    model.heads.requires_grad_(True)
    return model


def backbone(model: nn.Module) -> nn.Module:
    """The timm ViT inside `model`: a multi-task model's backbone, a peft model's base model, or `model`."""
    from .core.moe import MultiTaskViT

    return model.backbone if isinstance(model, MultiTaskViT) else host(model)


def image_size(model: nn.Module) -> int:
    return int(backbone(model).patch_embed.img_size[0])


def train(cfg: TrainConfig, resume: Optional[str | Path] = None, progress: bool = True) -> dict:
    """Run training as `cfg` says (continuing the checkpoint in `resume` if given); returns the report.

    Under torchrun this process joins the data-parallel group for the run and leaves it at the end.
    """
    with distributed.process_group(pick_device(cfg.device)) as group:
        return train_in_group(cfg, group, resume, progress)


@dataclass
class Task:
    """One dataset of a run: its data, its head (`index` into a multi-task model's heads; None: single-task) and its
    endless training batches (`items` is None when only the test set was built)."""

    name: str
    index: Optional[int]
    items: Optional[SeededItems]
    test_set: Dataset
    steps_per_epoch: int = 0
    batches: Any = None

    def start(self, cfg: TrainConfig, group: Group, step: int) -> None:
        """Batches from global step `step` on: in a multi-task run every step takes one batch of every task, so
        each task has consumed `step` batches of its own seeded epochs."""
        self.batches = iterate_batches(self.items, cfg, group, step, self.steps_per_epoch)


def build_tasks(cfg: TrainConfig, img_size: int, train: bool = True) -> list[Task]:
    """The `Task`s of `cfg`: one per `--tasks` dataset, or the single `--dataset`. With `train`, refuses a training
    set smaller than a batch."""
    multi = bool(cfg.tasks)
    tasks = []
    for index, name in enumerate(cfg.task_names):
        train_set, test_set = build_data(replace(cfg, dataset=name) if multi else cfg, img_size, train=train)
        task = Task(name, index if multi else None, None, test_set)
        if train:
            task.items = SeededItems(train_set, cfg.seed)
            task.steps_per_epoch = len(task.items) // cfg.batch_size
            if task.steps_per_epoch == 0:
                raise BSRError(f"the training set of {name} has {len(task.items)} images, fewer than "
                               f"batch_size={cfg.batch_size}")
        tasks.append(task)
    return tasks


def train_in_group(cfg: TrainConfig, dp: Group, resume: Optional[str | Path] = None, progress: bool = True) -> dict:
    """`train` as one rank of `dp` (a single-process `Group` trains alone); returns the report on every rank.

    A step takes one batch of each task in turn, each with its own forward, backward and optimizer step (one task in a
    single-task run). An epoch is a pass over the largest task's training set; smaller tasks cycle their own
    seeded epochs faster.
    """
    from .core.moe import moe_aux_loss, set_moe_task

    device = dp.device
    if cfg.batch_size % dp.world_size:
        raise BSRError(f"batch_size={cfg.batch_size} is not divisible by the {dp.world_size} processes; each "
                       f"takes an equal slice of every batch")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.out is None:
        cfg.out = dp.broadcast(default_out(cfg))  # named after rank 0's clock: ranks may straddle a second
    files = RunFiles(Path(cfg.out), write=dp.is_main)
    saved = read_checkpoint(resume) if resume is not None else None
    files.check(resuming=saved is not None)

    # Everything that can fail on bad input happens before the first file is written.
    model = setup_model(cfg, device)
    tasks = build_tasks(cfg, image_size(model))
    tests = [test_loader(t.test_set, cfg, device, dp) for t in tasks]
    files.prepare(cfg)
    steps_per_epoch = max(task.steps_per_epoch for task in tasks)
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps + round(cfg.warmup_epochs * steps_per_epoch)
    eval_every = cfg.eval_every or steps_per_epoch
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    params = count_params(model)

    step, best, history = 0, 0.0, {"acc": None, "best_step": 0, "tasks": {}}
    if saved is not None:
        step, best, history = restore_state(saved, model, optimizer, scaler, resume)
        history.setdefault("tasks", {})
        files.truncate_metrics(step)
    test_set = tasks[0].test_set
    probe = torch.stack([test_set[i][0] for i in range(min(2, len(test_set)))])  # a rank's test slice may be empty
    if tasks[0].index is not None:
        set_moe_task(backbone(model), 0)
    tokens = tokens_per_block(backbone(model), probe.to(device))
    # after freezing: DDP all-reduces only the trainable parameters; a multi-task step leaves the other tasks' heads
    # and gates without gradient
    net = distributed.wrap(model, dp, find_unused=len(tasks) > 1)
    for task in tasks:
        task.start(cfg, dp, step)

    model.train()
    step_times: list[float] = []
    bar = tqdm(total=total_steps, initial=step, disable=not (progress and dp.is_main), dynamic_ncols=True,
               desc=cfg.method)
    ckpt_path = None
    while step < total_steps:
        # schedule: lr is a pure function of the step; timm's layer-decay groups carry their own scale
        lr = lr_at(step, lr=cfg.lr, total_steps=total_steps, warmup_steps=warmup, min_lr=cfg.min_lr,
                   schedule=cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        logged = {}
        for task in tasks:
            images, labels = next(task.batches)
            t0 = time.perf_counter()
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

            # forward
            with autocast(cfg, device):
                logits = net(images) if task.index is None else net(images, task.index)
                loss = criterion(logits.float(), labels)
                if task.index is not None and cfg.moe_aux_loss > 0:
                    loss = loss + moe_aux_loss(model)
            # logged values are over the global batch; every rank sees the same loss, so all stop together on NaN
            loss_value, acc = dp.mean([loss.item(), (logits.argmax(-1) == labels).float().mean().item() * 100])
            if not math.isfinite(loss_value):
                bar.close()
                kept = f"last good checkpoint: {ckpt_path}" if ckpt_path else "no checkpoint was written yet"
                where = f" on task {task.name}" if task.index is not None else ""
                raise BSRError(f"loss is {loss_value} at step {step}{where}; stopped ({kept}); lower --lr or set "
                               f"--clip-grad")

            # backward
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()

            # clip (unscale first so the norm is in real units)
            if cfg.clip_grad is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.clip_grad)

            # step
            scaler.step(optimizer)
            scaler.update()
            step_times.append(time.perf_counter() - t0)
            logged[task.name] = (loss_value, acc)
        step += 1

        # log
        loss_value, acc = (statistics.fmean(v) for v in zip(*logged.values()))
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{acc:.1f}",
                        ips=f"{len(labels) * dp.world_size / step_times[-1]:.0f}", refresh=False)
        if step % cfg.log_every == 0:
            record = {"step": step, "epoch": (step - 1) // steps_per_epoch, "lr": lr, "loss": loss_value,
                      "train_acc": acc, "step_time": sum(step_times[-len(tasks):])}
            if cfg.tasks:
                record["tasks"] = {name: {"loss": lv, "train_acc": a} for name, (lv, a) in logged.items()}
            files.log(record)

        # evaluate and checkpoint
        if step % eval_every == 0 or step == total_steps:
            accs = {task.name: evaluate(model, loader, device, cfg, dp, task.index)
                    for task, loader in zip(tasks, tests)}
            test_acc = statistics.fmean(accs.values())
            if test_acc > best:
                best, history["best_step"] = test_acc, step
            history["acc"] = test_acc
            for name, value in accs.items():
                seen = history["tasks"].get(name, {"best": 0.0})
                history["tasks"][name] = {"final": value, "best": max(seen["best"], value)}
            record = {"step": step, "epoch": (step - 1) // steps_per_epoch, "test_acc": test_acc, "best_acc": best}
            if cfg.tasks:
                record["tasks"] = {name: {"test_acc": value} for name, value in accs.items()}
            files.log(record)
            if dp.is_main:  # the other ranks hold the same parameters and optimizer state
                per_task = f" [{', '.join(f'{n} {a:.2f}%' for n, a in accs.items())}]" if cfg.tasks else ""
                bar.write(f"step {step}/{total_steps}: test top-1 {test_acc:.2f}% (best {best:.2f}%){per_task}")
                save_checkpoint(files.out, model, optimizer, {
                    "config": cfg.to_dict(), "step": step, "epoch": step / steps_per_epoch, "best_acc": best,
                    "history": history, "scheduler": {"total_steps": total_steps, "warmup_steps": warmup},
                    "scaler": {k: float(v) if torch.is_tensor(v) else v for k, v in scaler.state_dict().items()}})
            ckpt_path = files.out / CHECKPOINT_NAME
    bar.close()

    report = {
        "accuracy": {"final": history["acc"], "best": best, "best_step": history["best_step"]},
        "dataset": {"name": "+".join(cfg.task_names), "train_images": sum(len(t.items) for t in tasks),
                    "test_images": sum(len(t.test_set) for t in tasks)},
        "method": cfg.method, "model": cfg.model, "steps": total_steps,
        "params": {"trainable": params.trainable, "total": params.total},
        "tokens_per_block": [{"attn": a, "mlp": m} for a, m in tokens],
        "median_step_time_s": statistics.median(step_times) if step_times else None,
        "images_per_s": cfg.batch_size / statistics.median(step_times) if step_times else None,
        "peak_memory_mib": peak_memory_mib(device),
        "data_parallel": data_parallel_record(dp, model),
        "config": cfg.to_dict(), **environment(device),
    }
    if cfg.tasks:
        report["accuracy"]["tasks"] = history["tasks"]
        report["dataset"]["tasks"] = [{"name": t.name, "train_images": len(t.items), "test_images": len(t.test_set)}
                                      for t in tasks]
    files.report(report)
    return report


def iterate_batches(items: SeededItems, cfg: TrainConfig, group: Group, start: int, steps_per_epoch: int):
    """Endless (images, labels) batches (this rank's slices) from global step `start` on; epochs restart the seeded
    order."""
    epoch, skip = divmod(start, steps_per_epoch)
    while True:
        yield from train_loader(items, cfg, epoch, skip, group)
        epoch, skip = epoch + 1, 0


def data_parallel_record(group: Group, model: nn.Module) -> dict:
    """World size, backend and gradient bytes per step: what DDP all-reduces (nothing in a single process)."""
    grad_bytes = distributed.gradient_bytes(model)
    return {"world_size": group.world_size, "backend": group.backend, "gradient_bytes": grad_bytes,
            "allreduce_bytes_per_step": grad_bytes if group.enabled else 0}


def restore_state(saved: tuple[dict, dict], model: nn.Module, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler, source: Any) -> tuple[int, float, dict]:
    """Load a checkpoint's parameters, optimizer, scaler and RNG states; returns (step, best acc, history)."""
    tensors, meta = saved
    load_trainable(model, tensors, source)
    device = next(model.parameters()).device
    try:
        optimizer.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
    except (ValueError, KeyError) as e:
        raise BSRError(f"checkpoint {source}: optimizer state does not fit ({e}); was the config changed?") from None
    for state in optimizer.state.values():  # optimizer tensors were saved on CPU
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                state[key] = value.to(device)
    if meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    set_rng_state(tensors, meta["rng"])
    return int(meta["step"]), float(meta["best_acc"]), meta["history"]


def summary_lines(report: dict) -> list[str]:
    """The short summary printed at the end of `bsr train`."""
    acc, p = report["accuracy"], report["params"]
    tokens = [(t["attn"], t["mlp"]) for t in report["tokens_per_block"]]
    step_time = "no steps taken in this process (the run had finished)"
    if report["median_step_time_s"] is not None:
        step_time = f"{1000 * report['median_step_time_s']:.1f} ms median ({report['images_per_s']:.0f} img/s)"
    lines = [
        f"method {report['method']} on {report['dataset']['name']} ({report['model']}, {report['steps']} steps)",
        f"  test top-1     final {acc['final']:.2f}%  best {acc['best']:.2f}% (step {acc['best_step']})"
        + (" (mean over tasks)" if "tasks" in acc else ""),
        f"  trainable      {p['trainable']:,} / {p['total']:,} params ({100 * p['trainable'] / p['total']:.1f}%)",
        f"  tokens/block   {format_tokens(tokens)}  (attention/MLP)",
        f"  step time      {step_time}",
        f"  peak memory    {report['peak_memory_mib']:.0f} MiB",
        f"  run dir        {report['config']['out']}",
    ]
    lines[2:2] = [f"    {name:<16} final {t['final']:.2f}%  best {t['best']:.2f}%"  # under the mean's line
                  for name, t in acc.get("tasks", {}).items()]
    dp = report["data_parallel"]
    if dp["world_size"] > 1:
        lines.insert(-1, f"  data parallel  {dp['world_size']} processes ({dp['backend']}), "
                         f"{dp['allreduce_bytes_per_step'] / 2**20:.2f} MiB of gradients all-reduced per step")
    return lines


# ------------------------------------------------------------------------------------------------- runs


def config_of_run(run: str | Path) -> tuple[TrainConfig, tuple[dict, dict]]:
    """The resolved config and the checkpoint (tensors, metadata) of a run directory."""
    saved = read_checkpoint(run)
    try:
        cfg = make_config(saved[1]["config"])
    except (KeyError, TypeError) as e:
        raise BSRError(f"checkpoint {run} holds no valid config ({e})") from None
    return cfg, saved


def load_run(run: str | Path, device: torch.device, **overrides) -> tuple[TrainConfig, nn.Module]:
    """Rebuild the trained model of a run: base weights + method + the checkpoint's trained parameters."""
    cfg, (tensors, _) = config_of_run(run)
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    model = setup_model(cfg, device)
    load_trainable(model, tensors, run)
    model.eval()
    return cfg, model


def evaluate_run(run: str | Path, dataset: Optional[str] = None, data_dir: Optional[str] = None,
                 limit: Optional[int] = None, device: str = "auto", batch_size: Optional[int] = None) -> dict:
    """Top-1 of a run's checkpoint on `dataset` (default: the one it was trained on); a multi-task run is evaluated
    on each of its tasks (`top1` is their mean, `tasks` the per-task figures)."""
    from .data import dataset_info

    dev = pick_device(device)
    cfg, model = load_run(run, dev)
    if cfg.tasks and dataset is not None:
        raise BSRError(f"run {run} is multi-task ({','.join(cfg.tasks)}): it is evaluated on its own tasks; drop "
                       f"--dataset")
    for key, value in {"dataset": dataset, "data_dir": data_dir, "limit": limit, "batch_size": batch_size}.items():
        if value is not None:
            setattr(cfg, key, value)
    if not cfg.tasks and dataset_info(cfg.dataset).num_classes != host(model).num_classes:
        raise BSRError(f"dataset {cfg.dataset!r} has {dataset_info(cfg.dataset).num_classes} classes but the "
                       f"model's head has {host(model).num_classes}")
    tasks = build_tasks(cfg, image_size(model), train=False)
    accs = {t.name: evaluate(model, test_loader(t.test_set, cfg, dev), dev, cfg, task=t.index) for t in tasks}
    result = {"top1": statistics.fmean(accs.values()), "dataset": "+".join(accs),
              "images": sum(len(t.test_set) for t in tasks), "method": cfg.method}
    if cfg.tasks:
        result["tasks"] = accs
    return result


def export_weights(run: str | Path, out: str | Path, dtype: str = "fp32") -> dict:
    """Write a run's trained model as a plain timm state dict (patch undone, LoRA merged) to `out` (.safetensors).

    A multi-task run's state dict is the `MultiTaskViT`'s: `backbone.*` (with the MoE keys of `bsr.moe`) and
    `heads.{t}.*`, the task order and names in the metadata."""
    from safetensors.torch import save as st_save

    from .core.patch import bsr_state, restore

    cfg, model = load_run(run, torch.device("cpu"))
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if bsr_state(backbone(model)) is not None:
        restore(backbone(model))
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise BSRError(f"dtype={dtype!r} is not valid; use fp32, fp16 or bf16")
    state = {k: v.detach().to(torch_dtype).contiguous() for k, v in model.state_dict().items()}
    out = Path(out)
    meta = {"source_run": str(run), "dtype": dtype, **({"tasks": ",".join(cfg.tasks)} if cfg.tasks else {})}
    atomic_write_bytes(out, st_save(state, metadata=meta))
    return {"path": str(out), "tensors": len(state), "bytes": out.stat().st_size}
