"""What `bsr bench` measures and how: `BenchSpec` (a dataclass, a help string per field, saved with every record), the
benchmarked methods of the BSR paper (Sarkar et al., arXiv 2405.10951, SPEC section 2) and their multi-task
counterparts (SPEC section 5), and the benchmarked model with shapes only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..core.config import BSRConfig, parse_blocks
from ..core.moe import DEFAULT_MOE_BLOCKS
from ..errors import BSRError
from ..train.build import build_model
from ..train.config import TrainConfig

LEAN = "bsr-lean"  # method bsr with BSRConfig.preset("lean"), recorded under its own name
BENCH_METHODS = ("full", "head", "bitfit", "last-k", "lora", "tokendrop", "bsr", LEAN)
# Multi-task methods (`moe=True`): the MoE ViT trained in full (the baseline), with BSR, with lean BSR; a dense
# multi-task ViT trained in full (the default four); the MoE ViT with LoRA or BitFit (asked by name). Each maps to
# (single-task method it applies, whether the backbone has MoE layers).
MOE_METHODS = {"moe-full": ("full", True), "moe-bsr": ("bsr", True), "moe-bsr-lean": ("bsr", True),
               "dense-full": ("full", False), "moe-lora": ("lora", True), "moe-bitfit": ("bitfit", True)}
MOE_DEFAULT = ("moe-full", "moe-bsr", "moe-bsr-lean", "dense-full")
LEAN_METHODS = (LEAN, "moe-bsr-lean")
MOE_TASK = 0  # the task whose batch every measured step trains
OPTIMIZERS = ("sgd", "adamw")
# Suffixes of a method name, each an optimizer option of the same method (`bsr.train.fused`), e.g. moe-bsr+fused+bf16:
FUSED = "+fused"  # the optimizer step fused into backward, each gradient freed once used
BF16_STATE = "+bf16"  # SGD's momentum / Adam's first moment in bf16 between steps (TrainConfig.optimizer_state)
INT8 = "+int8"  # a BSR method with its frozen Linears stored in int8 (BSRConfig.frozen_dtype), e.g. bsr-lean+int8
OPTION_SUFFIXES = (FUSED, BF16_STATE, INT8)
RECORD_PREFIX = "BSR_BENCH_RECORD "  # marks the worker's result line on stdout (libraries may print too)
MIB = 2 ** 20


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a help string (the CLI makes one flag per field from it)."""
    return field(default=default, metadata={"help": help})


# ------------------------------------------------------------------------------------------------- the spec


@dataclass
class BenchSpec:
    """What to benchmark and how; saved with every record so a run can be repeated exactly."""

    model: str = _f("vit_base_patch16_224", "timm model name (random weights: sizes and speed do not depend "
                                            "on their values)")
    img_size: Optional[int] = _f(None, "image size in pixels (default: the model's)")
    batch_size: int = _f(32, "images per training step")
    methods: Optional[list[str]] = _f(None, f"comma list of methods to compare, from {','.join(BENCH_METHODS)}; "
                                            f"with --moe from {','.join(MOE_METHODS)} (default: all of them; with "
                                            f"--moe: {','.join(MOE_DEFAULT)}); "
                                            f"METHOD{FUSED}: with the optimizer step fused into backward; "
                                            f"METHOD{BF16_STATE}: with the momentum in bf16 (both: METHOD{FUSED}"
                                            f"{BF16_STATE}); BSR-METHOD{INT8}: frozen weights in int8")
    steps: int = _f(5, "timed round-robin rounds (one training step of every method each); medians over them")
    warmup: int = _f(1, "untimed rounds before the timed ones, and untimed steps before the memory window")
    memory_steps: int = _f(1, "training steps inside the peak-memory window, after warm-up (each has the same "
                              "footprint once the optimizer state exists)")
    optimizer: str = _f("sgd", "sgd (momentum, the paper's ViT-B recipe) or adamw")
    lr: float = _f(1e-3, "learning rate (does not change memory or time)")
    momentum: float = _f(0.9, "SGD momentum")
    num_classes: int = _f(10, "classes of the head (the paper's references use 10)")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    threads: Optional[int] = _f(None, "torch CPU threads (default: torch's)")
    seed: int = _f(0, "seed of the weights and of the random batch")
    last_k: int = _f(3, "blocks trained by last-k")
    lora_rank: int = _f(8, "LoRA rank")
    lora_alpha: int = _f(16, "LoRA alpha")
    matmul_size: int = _f(2048, "side of the square matmul that measures the machine's GFLOP/s")
    mmap_threshold: Optional[int] = _f(1 << 20, "glibc's mmap threshold (bytes) fixed in every process of the run, "
                                                "so freed activations go back to the OS and peak RSS tracks live "
                                                "tensors, as bsr train does; none or --no-release-memory: glibc's "
                                                "dynamic threshold, whose heap keeps freed activations resident "
                                                "(see bsr.allocator)")
    moe: bool = _f(False, "benchmark the multi-task Mixture-of-Experts ViT (SPEC section 5): methods moe-full "
                          "(the baseline of the ratios), moe-bsr, moe-bsr-lean, dense-full; each step trains one "
                          "batch of task 0")
    num_tasks: int = _f(3, "with --moe: tasks, i.e. heads and gates per MoE layer (num_classes classes each)")
    moe_experts: int = _f(16, "with --moe: experts per MoE layer (MoE layers at blocks 3, 7, 11)")
    moe_top_k: int = _f(4, "with --moe: experts per token")
    inference: bool = _f(False, "measure inference instead of training (CPU): latency at batch 1, throughput at "
                                "--batch-size and peak memory of the unpatched model and the BSR model, in PyTorch "
                                "and exported to ONNX under onnxruntime (bsr.measure.inference)")
    fused_step: bool = _f(False, f"also measure every method with the optimizer step fused into backward "
                                 f"(bsr.train.fused: each parameter stepped as soon as its gradient is ready, the "
                                 f"gradient freed at once), as METHOD{FUSED}; its ratios are given both against the "
                                 f"baseline and against the baseline{FUSED}")
    bsr: dict = field(default_factory=dict)  # BSRConfig overrides for bsr, bsr-lean and tokendrop

    def __post_init__(self) -> None:
        if self.methods is None:  # every method of the mode
            self.methods = list(MOE_DEFAULT if self.moe else BENCH_METHODS)
        if self.fused_step:  # idempotent: a saved spec (methods already expanded) loads to the same list
            self.methods = list(self.methods) + [m + FUSED for m in self.methods
                                                 if not is_fused(m) and m + FUSED not in self.methods]

    @property
    def baseline(self) -> str:
        """The method every ratio divides: `moe-full` with `moe`, else `full`."""
        return "moe-full" if self.moe else "full"

    def check(self) -> None:
        """Raise a one-line `BSRError` for anything that would fail later, before any process is started."""
        known = list(MOE_METHODS) if self.moe else list(BENCH_METHODS)
        suffixes = [o for m in self.methods for o in method_options(m) if o not in OPTION_SUFFIXES]
        if suffixes:
            raise BSRError(f"unknown method option {suffixes[0]!r}; a method name takes {', '.join(OPTION_SUFFIXES)}")
        frozen = [m for m in self.methods if INT8 in method_options(m) and "bsr" not in base_method(m)]
        if frozen:
            raise BSRError(f"{frozen[0]!r}: {INT8} stores the frozen blocks of a BSR method in int8; use it on bsr, "
                           f"bsr-lean or moe-bsr")
        unknown = [m for m in self.methods if base_method(m) not in known]
        if unknown or not self.methods:
            other = " (without --moe)" if self.moe else " (or --moe for the multi-task methods)"
            raise BSRError(f"unknown method {unknown[0]!r}; use a comma list of {', '.join(known)}{other}"
                           if unknown else f"no methods given; use a comma list of {', '.join(known)}")
        if len(set(self.methods)) != len(self.methods):
            raise BSRError(f"methods={','.join(self.methods)} names a method twice; list each once")
        for name in ("batch_size", "steps", "memory_steps", "num_classes", "last_k", "lora_rank", "matmul_size",
                     "num_tasks", "moe_experts"):
            if int(getattr(self, name)) < 1:
                raise BSRError(f"{name}={getattr(self, name)} must be at least 1")
        if not 1 <= self.moe_top_k <= self.moe_experts:
            raise BSRError(f"moe_top_k={self.moe_top_k} with {self.moe_experts} experts; use 1 <= moe_top_k <= "
                           f"moe_experts")
        if self.warmup < 0:
            raise BSRError(f"warmup={self.warmup} must be at least 0")
        if self.img_size is not None and self.img_size < 1:
            raise BSRError(f"img_size={self.img_size} must be a positive number of pixels")
        for name in ("threads", "mmap_threshold"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise BSRError(f"{name}={getattr(self, name)} must be at least 1")
        if self.optimizer not in OPTIMIZERS:
            raise BSRError(f"optimizer={self.optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
        depth = len(meta_model(self).blocks)  # bad model names and sizes fail here
        if self.moe:
            parse_blocks(list(DEFAULT_MOE_BLOCKS), depth, "moe_blocks")  # the MoE blocks must exist
        for name in self.methods:
            method_config(self, name)[1].resolve(depth)  # bad BSR overrides, or blocks the model lacks, here
        if "last-k" in self.methods and self.last_k > depth:
            raise BSRError(f"last_k={self.last_k} is more than the model's {depth} blocks; use at most {depth}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "BenchSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(values) - known)
        if extra:
            raise BSRError(f"unknown bench option {extra[0]!r}; known: {', '.join(sorted(known))}")
        return cls(**values)



def base_method(name: str) -> str:
    """A bench method name without its option suffixes (`moe-bsr+fused+bf16` -> `moe-bsr`)."""
    return name.split("+", 1)[0]


def method_options(name: str) -> frozenset[str]:
    """The option suffixes of a bench method name (`moe-bsr+fused+bf16` -> {"+fused", "+bf16"})."""
    return frozenset("+" + o for o in name.split("+")[1:])


def is_fused(name: str) -> bool:
    """Whether bench method `name` steps the optimizer inside backward (`bsr.train.fused`)."""
    return FUSED in method_options(name)


def has_bf16_state(name: str) -> bool:
    """Whether bench method `name` keeps its momentum / first moment in bf16 (`bsr.train.fused`)."""
    return BF16_STATE in method_options(name)


def method_config(spec: BenchSpec, name: str) -> tuple[str, BSRConfig]:
    """(method for `apply_method`, its BSR options) of a bench method name; `bsr-lean` is bsr with the lean preset,
    a multi-task name maps to the single-task method it applies (`MOE_METHODS`); `+int8` stores the frozen weights in
    int8, the other option suffixes change neither."""
    overrides = {**spec.bsr, **({"frozen_dtype": "int8"} if INT8 in method_options(name) else {})}
    name = base_method(name)
    method = MOE_METHODS[name][0] if name in MOE_METHODS else name
    try:
        if name in LEAN_METHODS:
            return "bsr", BSRConfig.preset("lean", **overrides)
        return method, BSRConfig(**overrides)
    except TypeError as e:  # an override that is not a BSRConfig field
        raise BSRError(f"bad BSR option in {sorted(spec.bsr)}: {e}") from None



def bench_config(spec: BenchSpec, name: str) -> TrainConfig:
    """The `TrainConfig` that builds bench method `name` through `bsr.train.build`, as training builds it: random
    weights (seeded by `spec.seed`), no base weights, the method and its BSR options; with `moe`, a multi-task model
    of `num_tasks` heads whose MoE layers (none for `dense-full`) sit at `DEFAULT_MOE_BLOCKS`."""
    method, config = method_config(spec, name)
    values: dict[str, Any] = dict(model=spec.model, img_size=spec.img_size, checkpoint="none", method=method,
                                  bsr=config, last_k=spec.last_k, lora_rank=spec.lora_rank, lora_alpha=spec.lora_alpha,
                                  seed=spec.seed, device=spec.device, threads=spec.threads)
    if spec.moe:
        values.update(tasks=[f"task{i}" for i in range(spec.num_tasks)], moe=MOE_METHODS[base_method(name)][1],
                      moe_blocks=list(DEFAULT_MOE_BLOCKS), moe_experts=spec.moe_experts, moe_top_k=spec.moe_top_k)
    else:
        values["num_classes"] = spec.num_classes
    return TrainConfig(**values)


def meta_model(spec: BenchSpec) -> nn.Module:
    """The benchmarked (single-task) model with shapes only, on the meta device: for the analytic formula and the
    up-front checks (bad model names and sizes fail here; block indices are checked per method by `check`)."""
    cfg = bench_config(dataclasses.replace(spec, moe=False, bsr={}), "full")
    cfg.bsr = BSRConfig(trainable_blocks="none", drop_blocks="none")  # resolves on any depth
    with torch.device("meta"):
        return build_model(cfg, spec.num_classes)
