"""`bsr bench`: memory, FLOPs and time of every fine-tuning method, side by side, measured on one machine.

Sarkar et al. (arXiv 2405.10951) compare Block Selective Reprogramming against full fine-tuning and other
memory-saving methods by training memory, FLOPs and time. This module measures those figures as SPEC section 6
defines them and returns them as records (one dict per method); `bsr.bench_report` renders tables, JSON and the plot
from the records, and the CLI only parses and calls.

Protocol, and why:
- Memory comes from a fresh process per method (`bsr.bench_worker`): a CPU process's peak RSS cannot be reset below
  what an earlier method left in the heap, and a fresh process starts every method from the same state. Inside it,
  first the inference peak of the unpatched model, then (after freeing it back to the OS) the training peak.
- Time comes from one process stepping every method in turn (round-robin, rotated start, medians): this machine's
  speed drifts by about 20% within minutes, so methods timed minutes apart are not comparable. The dense matmul speed
  is sampled every round in the same process, so achieved GFLOP/s can be read against it.
- Inputs are the same seeded random batch for every method, weights random: memory, FLOPs and time do not depend on
  their values (and this machine has no pretrained weights offline).

`moe=True` benchmarks the multi-task Mixture-of-Experts ViT of SPEC section 5 instead (`bsr.moe`): the step is one
task's batch (task 0's head, cross-entropy, backward, optimizer step) with the router noise on, as in training, and
the methods are `MOE_METHODS`; ratios are then against `moe-full`, the MoE model trained in full without dropping.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import allocator, measure
from .core.config import BSRConfig
from .errors import BSRError
from .train.methods import apply_method, count_params, host, tokens_per_block
from .core.moe import moe_layers

LEAN = "bsr-lean"  # method bsr with BSRConfig.preset("lean"), recorded under its own name
BENCH_METHODS = ("full", "head", "bitfit", "last-k", "lora", "tokendrop", "bsr", LEAN)
# Multi-task methods (`moe=True`): the MoE ViT trained in full (the baseline), with BSR, with lean BSR; a dense
# multi-task ViT trained in full. Each maps to (single-task method it applies, whether the backbone has MoE layers).
MOE_METHODS = {"moe-full": ("full", True), "moe-bsr": ("bsr", True), "moe-bsr-lean": ("bsr", True),
               "dense-full": ("full", False)}
LEAN_METHODS = (LEAN, "moe-bsr-lean")
MOE_TASK = 0  # the task whose batch every measured step trains
OPTIMIZERS = ("sgd", "adamw")
RECORD_PREFIX = "BSR_BENCH_RECORD "  # marks the worker's result line on stdout (libraries may print too)
MIB = 2 ** 20

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


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
                                            f"with --moe from {','.join(MOE_METHODS)} (default: all of them)")
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
    mmap_threshold: Optional[int] = _f(None, "fix glibc's mmap threshold (bytes, e.g. 1048576) in every process "
                                             "of the run, so freed activations go back to the OS and peak RSS "
                                             "tracks live tensors (default: glibc's dynamic threshold, whose heap "
                                             "keeps freed activations resident); see bsr.allocator")
    moe: bool = _f(False, "benchmark the multi-task Mixture-of-Experts ViT (SPEC section 5): methods moe-full "
                          "(the baseline of the ratios), moe-bsr, moe-bsr-lean, dense-full; each step trains one "
                          "batch of task 0")
    num_tasks: int = _f(3, "with --moe: tasks, i.e. heads and gates per MoE layer (num_classes classes each)")
    moe_experts: int = _f(16, "with --moe: experts per MoE layer (MoE layers at blocks 3, 7, 11)")
    moe_top_k: int = _f(4, "with --moe: experts per token")
    bsr: dict = field(default_factory=dict)  # BSRConfig overrides for bsr, bsr-lean and tokendrop

    def __post_init__(self) -> None:
        if self.methods is None:  # every method of the mode
            self.methods = list(MOE_METHODS if self.moe else BENCH_METHODS)

    @property
    def baseline(self) -> str:
        """The method every ratio divides: `moe-full` with `moe`, else `full`."""
        return "moe-full" if self.moe else "full"

    def check(self) -> None:
        """Raise a one-line `BSRError` for anything that would fail later, before any process is started."""
        known = list(MOE_METHODS) if self.moe else list(BENCH_METHODS)
        unknown = [m for m in self.methods if m not in known]
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
            from .core.config import parse_blocks
            from .core.moe import DEFAULT_MOE_BLOCKS

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


def method_config(spec: BenchSpec, name: str) -> tuple[str, BSRConfig]:
    """(method for `apply_method`, its BSR options) of a bench method name; `bsr-lean` is bsr with the lean preset,
    a multi-task name maps to the single-task method it applies (`MOE_METHODS`)."""
    method = MOE_METHODS[name][0] if name in MOE_METHODS else name
    try:
        if name in LEAN_METHODS:
            return "bsr", BSRConfig.preset("lean", **spec.bsr)
        return method, BSRConfig(**spec.bsr)
    except TypeError as e:  # an override that is not a BSRConfig field
        raise BSRError(f"bad BSR option in {sorted(spec.bsr)}: {e}") from None


def _model_kwargs(spec: BenchSpec) -> dict:
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": spec.num_classes}
    if spec.img_size is not None:
        kwargs["img_size"] = spec.img_size
    return kwargs


def meta_model(spec: BenchSpec) -> nn.Module:
    """The benchmarked model with shapes only (for the analytic formula and up-front checks)."""
    import timm

    from .core import models  # noqa: F401  (registers vit_micro_patch4_28)

    if not timm.is_model(spec.model):
        close = timm.list_models(f"*{spec.model.split('_')[0]}*")[:5]
        raise BSRError(f"unknown model {spec.model!r}; try one of {', '.join(close) or 'timm.list_models()'}")
    try:
        with torch.device("meta"):
            return timm.create_model(spec.model, **_model_kwargs(spec))
    except (RuntimeError, ValueError, TypeError, AssertionError) as e:
        raise BSRError(f"cannot build model {spec.model!r} at img_size={spec.img_size}: "
                       f"{' '.join(str(e).split())[:200]}") from None


# ------------------------------------------------------------------------------------------------- one method


def resolve_device(spec: BenchSpec) -> torch.device:
    """The torch device `spec.device` names ("auto": CUDA if present)."""
    from .train import pick_device

    return pick_device(spec.device)


class TaskStep(nn.Module):
    """A `MultiTaskViT` seen as a single-task classifier: `forward(images)` is `mt(images, task)`, so the training
    step, FLOP counter and forward-GMAC count run it like any benchmarked model. images: (B, 3, H, W) -> logits."""

    def __init__(self, mt: nn.Module, task: int = MOE_TASK):
        super().__init__()
        self.mt, self.task = mt, task

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.mt(images, self.task)


def bench_host(model: nn.Module) -> nn.Module:
    """The timm ViT inside a benchmarked model: the backbone of a `TaskStep`, else `methods.host`."""
    return model.mt.backbone if isinstance(model, TaskStep) else host(model)


def _unpatched(spec: BenchSpec, name: str) -> nn.Module:
    """Method `name`'s model before the method is applied: the timm model, or with `moe` the multi-task ViT (a
    `TaskStep` on task 0) with MoE layers (`moe-*`) or dense (`dense-full`). Random weights, seeded."""
    import timm

    from .core import models  # noqa: F401  (registers vit_micro_patch4_28)
    from .core.moe import build_multitask

    torch.manual_seed(spec.seed)  # every method starts from the same weights
    if not spec.moe:
        return timm.create_model(spec.model, **_model_kwargs(spec))
    mt = build_multitask(spec.model, [spec.num_classes] * spec.num_tasks, moe=MOE_METHODS[name][1],
                         num_experts=spec.moe_experts, top_k=spec.moe_top_k, **_model_kwargs(spec))
    return TaskStep(mt)


def build(spec: BenchSpec, name: str, device: torch.device) -> nn.Module:
    """The model of bench method `name`: random-init model (seeded), method applied, on `device`, train mode.

    With `moe`: full trains every parameter; bsr is `reprogram_multitask` (the MoE blocks are the trainable blocks,
    all task heads train). The router noise stays on (train mode), as in training.
    """
    from .core.moe import reprogram_multitask

    method, config = method_config(spec, name)
    model = _unpatched(spec, name)
    if isinstance(model, TaskStep):
        if method == "bsr":
            reprogram_multitask(model.mt, config)
        else:
            model.requires_grad_(True)
    else:
        model = apply_method(model, method, bsr=config, last_k=spec.last_k, lora_rank=spec.lora_rank,
                             lora_alpha=spec.lora_alpha)
    return model.to(device).train()


def make_batch(spec: BenchSpec, img_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded random batch every method sees: images (B, 3, S, S), labels (B,)."""
    gen = torch.Generator().manual_seed(spec.seed)
    images = torch.randn(spec.batch_size, 3, img_size, img_size, generator=gen)
    labels = torch.randint(0, spec.num_classes, (spec.batch_size,), generator=gen)
    return images.to(device), labels.to(device)


def make_optimizer(spec: BenchSpec, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's ViT-B recipe) or AdamW over the trainable parameters, no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor) -> None:
    """One forward, backward and optimizer step; gradients set to None after it, as torch does by default."""
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def apply_mmap_threshold(spec: BenchSpec) -> None:
    """Fix glibc's mmap threshold if `spec` asks (see `bsr.allocator`): in the memory processes and in the timing
    process alike, so that its cost in page faults is part of every method's step time."""
    if spec.mmap_threshold is not None and not allocator.release_freed_memory(spec.mmap_threshold):
        raise BSRError("mmap_threshold needs glibc (Linux); drop the option here")


def release_memory() -> None:
    """Free what Python dropped and hand glibc's free heap back to the OS, so the next RSS baseline is honest."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    allocator.trim()  # a no-op off glibc, where RSS may stay higher; the baseline taken next says so


def image_size(model: nn.Module) -> int:
    return int(bench_host(model).patch_embed.img_size[0])


def inference_peak(spec: BenchSpec, device: torch.device, name: Optional[str] = None) -> int:
    """Peak memory (bytes) of building the unpatched model of method `name` (`_unpatched`; the same for every
    single-task method) and running one batch under `inference_mode`, above the memory in use just before building
    it. The model is freed again before returning."""
    size = spec.img_size or int(meta_model(spec).patch_embed.img_size[0])
    images, _ = make_batch(spec, size, device)
    release_memory()
    with measure.track_peak(device) as window:
        model = _unpatched(spec, name or spec.baseline).to(device).eval()
        with torch.inference_mode():
            model(images)
    del model
    release_memory()
    return window.increase


def training_memory(spec: BenchSpec, name: str, device: torch.device) -> dict:
    """Build method `name`, warm up, then the peak over `memory_steps` steps above the pre-build baseline; plus the
    exact sizes of parameters, gradients and optimizer state, saved-for-backward bytes and FLOPs of one step.

    Runs in whatever process calls it; `bsr.bench_worker` calls it in a fresh one.
    """
    release_memory()
    baseline = measure.current_bytes(device)
    model = build(spec, name, device)
    size = image_size(model)
    images, labels = make_batch(spec, size, device)
    optimizer = make_optimizer(spec, model)
    for _ in range(spec.warmup):
        train_step(model, optimizer, images, labels)
    _sync(device)
    resettable = measure.reset_peak(device)
    resident = measure.current_bytes(device) - baseline
    for _ in range(spec.memory_steps):
        train_step(model, optimizer, images, labels)
    _sync(device)
    peak = measure.peak_bytes(device) - baseline

    # Exact counts, after the peak was read so they cannot disturb it.
    vit = bench_host(model)
    saved = measure.saved_tensor_bytes(lambda: F.cross_entropy(model(images), labels), model=vit,
                                       exclude=[*model.parameters(), *model.buffers()])
    flops = measure.count_flops(lambda: train_step(model, optimizer, images, labels))
    counts = count_params(model)
    return {
        "train_peak_bytes": peak, "train_resident_bytes": resident, "peak_resettable": resettable,
        "saved_activation_bytes": saved.total, "saved_by_block": saved.by_block,
        "param_bytes": measure.param_bytes(model), "grad_bytes": measure.grad_bytes(model),
        "optimizer_bytes": measure.optimizer_state_bytes(optimizer),
        "trainable_params": counts.trainable, "total_params": counts.total,
        "train_flops_per_step": flops,
        "fwd_gmacs_per_image": measure.fwd_gmacs_per_image(model, size, device=device, in_chans=3),
        "tokens": [list(t) for t in tokens_per_block(vit if isinstance(model, TaskStep) else model, images[:1])],
        "img_size": size,
        "moe_params": sum(p.numel() for layer in moe_layers(vit) for p in layer.parameters()),
    }


def memory_record(spec: BenchSpec, name: str) -> dict:
    """The fresh-process half of a record: inference peak, then training memory, sizes and FLOPs of `name`."""
    device = resolve_device(spec)
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    apply_mmap_threshold(spec)
    if method_config(spec, name)[0] == "lora":
        import peft  # noqa: F401  (imported here, not inside the window: its ~80 MB of modules are not training)
    infer = inference_peak(spec, device, name)
    return {"method": name, "infer_peak_bytes": infer, **training_memory(spec, name, device)}


def memory_record_isolated(spec: BenchSpec, name: str, timeout: Optional[float] = None) -> dict:
    """`memory_record` in a fresh `python -m bsr.bench_worker` process; its one JSON record read back."""
    request = json.dumps({"spec": spec.to_dict(), "method": name})
    proc = subprocess.run([sys.executable, "-m", "bsr.bench_worker"], input=request, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [ln[len(RECORD_PREFIX):] for ln in proc.stdout.splitlines() if ln.startswith(RECORD_PREFIX)]
    if proc.returncode != 0 or not lines:
        reply = json.loads(lines[-1]) if lines else {}
        stderr_tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BSRError(f"memory worker for {name} failed (exit {proc.returncode}): "
                       f"{reply.get('error') or stderr_tail}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------- time


def round_robin_times(spec: BenchSpec, names: list[str], device: torch.device,
                      log: Log = _quiet) -> tuple[dict[str, list[float]], list[float]]:
    """Step every method once per round, `warmup` untimed rounds then `steps` timed ones, all in this process.

    The start of each round rotates so that no method always follows the same neighbour (cache and allocator state
    left by a big step). Returns ({method: step seconds per timed round}, matmul GFLOP/s sampled once per round).
    """
    runs = {}
    for name in names:
        model = build(spec, name, device)
        images, labels = make_batch(spec, image_size(model), device)
        runs[name] = (model, make_optimizer(spec, model), images, labels)
    times: dict[str, list[float]] = {name: [] for name in names}
    gflops: list[float] = []
    for r in range(spec.warmup + spec.steps):
        timed = r >= spec.warmup
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            model, optimizer, images, labels = runs[name]
            _sync(device)
            start = time.perf_counter()
            train_step(model, optimizer, images, labels)
            _sync(device)
            if timed:
                times[name].append(time.perf_counter() - start)
        if timed:
            gflops.append(measure.matmul_gflops(device, size=spec.matmul_size))
        log(f"time: round {r + 1}/{spec.warmup + spec.steps} {'timed' if timed else 'warm-up'}"
            + (f", matmul {gflops[-1]:.0f} GFLOP/s" if timed else ""))
    return times, gflops


# ------------------------------------------------------------------------------------------------- the run


def analytic_fields(spec: BenchSpec, name: str, tokens: list) -> dict:
    """The authors' formula (`bsr.analytic`) for method `name`, where it has a counterpart; else None fields.

    last-k is BSR without dropping on the last k blocks; bsr-lean gets bsr's formula, which knows nothing of the lean
    options (it already assumes 8-bit frozen weights). `softmax_bytes` is the part of the kept activations that is
    the attention matrices (heads * N^2 per block wherever attention keeps anything), which timm's fused attention
    never stores; `tokens` are the measured (attention, MLP) tokens per block.
    """
    from .analytic import ACT_BYTES, analytic_memory_bytes, method_memory_bytes

    method, config = method_config(spec, name)
    if spec.moe:  # the formula knows dense ViTs only
        return {"analytic_memory_bytes": None, "analytic": None}
    model = meta_model(spec)
    depth = len(model.blocks)
    if method in ("full", "tokendrop"):
        first = 0
    elif method == "head":
        first = depth
    elif method == "last-k":
        first = depth - spec.last_k
    elif method == "bsr":
        first = config.resolve(depth).first_trainable
    else:
        return {"analytic_memory_bytes": None, "analytic": None}
    if method == "last-k":
        memory = analytic_memory_bytes(model, batch_size=spec.batch_size, trainable_blocks=list(range(first, depth)))
    else:
        memory = method_memory_bytes(model, method, batch_size=spec.batch_size, config=config)
    softmax = sum(model.blocks[i].attn.num_heads * tokens[i][0] ** 2 for i in range(first, depth))
    return {"analytic_memory_bytes": memory.total,
            "analytic": {"activation_bytes": memory.activation,
                         "kept_bytes": memory.kept_per_sample * spec.batch_size,
                         "softmax_bytes": softmax * ACT_BYTES * spec.batch_size,
                         "param_bytes": memory.params}}


def machine(device: torch.device) -> dict:
    """CPU model, cores, torch threads and device (GPU name on CUDA)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
            "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def source_commit() -> Optional[str]:
    """The git commit the `bsr` package runs from (`+dirty` if it has uncommitted changes), or None outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "bsr"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def versions() -> dict:
    import timm

    from .version import __version__

    return {"bsr": __version__, "commit": source_commit(), "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def add_ratios(records: list[dict], baseline: str = "full") -> None:
    """Ratios baseline/method of memory, time and FLOPs (`ratio_vs_baseline`, and the `baseline` method's name), from
    the baseline record of the same run (None without one): `full`, or `moe-full` for the multi-task run."""
    base = next((r for r in records if r["method"] == baseline), None)
    keys = {"train_peak": "train_peak_bytes", "saved_activation": "saved_activation_bytes",
            "step_time": "step_time_median_s", "flops": "train_flops_per_step"}
    for r in records:
        r["baseline"] = baseline
        r["ratio_vs_baseline"] = {k: (base[key] / r[key] if base is not None and r[key] else None)
                                  for k, key in keys.items()}
        r["train_over_infer_peak"] = r["train_peak_bytes"] / r["infer_peak_bytes"] if r["infer_peak_bytes"] else None


@dataclass
class BenchResult:
    """Records (one dict per method, in the order asked) and what holds for the whole run."""

    records: list[dict]
    meta: dict

    def to_dict(self) -> dict:
        return {"meta": self.meta, "records": self.records}

    @classmethod
    def from_dict(cls, data: dict) -> "BenchResult":
        return cls(records=data["records"], meta=data["meta"])


def run_bench(spec: BenchSpec, *, command: Optional[str] = None, isolate: bool = True,
              log: Log = _quiet) -> BenchResult:
    """Benchmark every method of `spec`: memory per method in a fresh process (`isolate`; in this process
    otherwise, for debugging only), then time round-robin in this process. Returns the merged records."""
    spec.check()
    device = resolve_device(spec)
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    apply_mmap_threshold(spec)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    env = {"versions": versions(), "machine": machine(device)}

    records = []
    for name in spec.methods:
        t0 = time.perf_counter()
        record = memory_record_isolated(spec, name) if isolate else memory_record(spec, name)
        log(f"memory: {name}: train peak {record['train_peak_bytes'] / MIB:,.0f} MiB, infer peak "
            f"{record['infer_peak_bytes'] / MIB:,.0f} MiB, saved {record['saved_activation_bytes'] / MIB:,.0f} MiB "
            f"({time.perf_counter() - t0:.0f} s)")
        method, config = method_config(spec, name)
        uses_bsr = method in ("bsr", "tokendrop")
        moe = {"tasks": spec.num_tasks, "task": MOE_TASK, "experts": spec.moe_experts, "top_k": spec.moe_top_k,
               "has_moe_layers": MOE_METHODS[name][1]} if spec.moe else None
        records.append({"method": name, "model": spec.model, "batch_size": spec.batch_size,
                        "optimizer": spec.optimizer, "multitask": moe, **record,
                        "bsr_config": config.to_dict() if uses_bsr else None,
                        **analytic_fields(spec, name, record["tokens"])})

    times, gflops = round_robin_times(spec, list(spec.methods), device, log)
    matmul = statistics.median(gflops)
    for r in records:
        r["step_times_s"] = times[r["method"]]
        r["step_time_median_s"] = statistics.median(times[r["method"]])
        r["achieved_gflops"] = r["train_flops_per_step"] / r["step_time_median_s"] / 1e9
        r["matmul_gflops"] = matmul
        r.update(env)
    add_ratios(records, spec.baseline)
    meta = {"baseline": spec.baseline, "spec": spec.to_dict(), "command": command, "started": started,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "matmul_gflops": matmul, "matmul_gflops_per_round": gflops, **env}
    return BenchResult(records=records, meta=meta)
