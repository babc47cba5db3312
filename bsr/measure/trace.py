"""The memory of a training step without running it: the step of a `TrainConfig` replayed on fake tensors.

`trace_config` builds the configuration's model with shapes only (meta device, then PyTorch's `FakeTensorMode`: every
op runs its shape function and allocates nothing), and steps it as `bsr train` does (`training_step`: gradients
cleared, `accumulate` micro-batches each forward and backward, clipping, the optimizer step), then evaluates a batch.
A `LiveBytes` dispatch mode follows every tensor storage the step creates, by weak reference, so it knows the bytes
alive after every op: their maximum is the step's peak of tensor memory, transients included (attention scores, the
MLP's hidden activations, gradients of activations, recomputed blocks, optimizer temporaries). It also counts the
bytes saved for backward per block (exact, as `bsr.measure.memory.saved_tensor_bytes` counts them on real tensors)
and the FLOPs of the step (`bsr.measure.flops`). A ViT-B/16 step at batch 128 takes a second or two here.

What it cannot see is memory outside tensors (the allocator's rounding and retained blocks, kernel workspaces,
libraries); `bsr.measure.plan` adds that as an overhead measured once per machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Optional

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..errors import BSRError
from ..train import build_optimizer, setup_model
from ..train.build import backbone, image_size
from ..train.config import TrainConfig, with_values
from ..train.fused import FusedOptimizer
from ..train.optim import autocast
from .flops import count_flops
from .memory import OUTSIDE, ROOT, _module_stack, rollup_name

_EXPIRED = torch.Storage._expired  # is the storage behind a weak reference's cdata freed?


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive after every op run inside it (storages followed by weak reference, each
    counted once, rounded up to `granule` bytes), kept apart as large and small (below `small_below` bytes: on CPU
    these come from glibc's heap, which keeps freed chunks, rather than from their own mappings). `timeline` holds
    (large, small) after every op since `reset`; `peak_at(k)` is the most of large + k * small over it."""

    def __init__(self, granule: int = 1, small_below: int = 0) -> None:
        super().__init__()
        self.granule, self.small_below = granule, small_below
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.large = self.small = 0
        self.timeline: list[tuple[int, int]] = []

    def _add(self, size: int, sign: int) -> None:
        if size < self.small_below:
            self.small += sign * size
        else:
            self.large += sign * size

    def hold(self, tensors: Iterable[Any]) -> None:
        """Follow `tensors` (made before tracing: parameters, optimizer state, the batch)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live:
                    size = -(-storage.nbytes() // self.granule) * self.granule
                    self.live[ref.cdata] = (ref, size)
                    self._add(size, 1)
        self.timeline.append((self.large, self.small))

    def reset(self) -> None:
        self._sweep()
        self.timeline = [(self.large, self.small)]

    def peak_at(self, heap_factor: float = 1.0) -> int:
        return int(max(large + heap_factor * small for large, small in self.timeline))

    def _sweep(self) -> None:
        expired = _EXPIRED  # StorageWeakRef.expired without its two Python lookups: this runs after every op
        for key in [k for k in self.live if expired(k)]:
            self._add(self.live.pop(key)[1], -1)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.hold(tree_flatten(out)[0])  # the op's outputs while its inputs still live
        self._sweep()
        return out


class TraceAdamW(torch.optim.Optimizer):
    """AdamW with torch's CPU arithmetic, state and temporaries (`torch.optim.AdamW`'s per-parameter path: moments
    updated in place, the denominator built from two temporaries), but its step count a Python number: torch's own
    reads the count with `.item()`, which fake tensors cannot answer."""

    def __init__(self, groups: list[dict], **defaults) -> None:
        super().__init__(groups, {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, **defaults})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if not state:
                    state.update(count=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["count"] += 1
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                correction = (1 - beta2 ** state["count"]) ** 0.5
                denom = (state["exp_avg_sq"].sqrt() / correction).add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** state["count"]))


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, images: torch.Tensor,
                  labels: torch.Tensor, cfg: TrainConfig, micro_steps: Optional[int] = None) -> None:
    """One optimizer step of `cfg` as `bsr.train.loop` takes it: gradients cleared, `cfg.accumulate` micro-batches
    (forward under autocast, loss scaled 1/N, backward), gradient clipping, the step. images: (N*B, 3, S, S).
    `micro_steps`: run only the first micro-batches (from the second on, every micro-batch's memory is the same)."""
    optimizer.zero_grad(set_to_none=True)
    parts = list(zip(images.chunk(cfg.accumulate), labels.chunk(cfg.accumulate)))[:micro_steps]
    for x, y in parts:
        with autocast(cfg, images.device):
            loss = criterion(model(x).float(), y)
        (loss / len(parts) if len(parts) > 1 else loss).backward()
    if cfg.clip_grad is not None:
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.clip_grad)
    optimizer.step()


@dataclass
class StepTrace:
    """Bytes of one traced training step of a configuration (see `trace_config`)."""

    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    batch_bytes: int
    saved_bytes: int
    step_peak_bytes: int  # all tensors alive at the step's worst moment (parameters and optimizer state included)
    eval_peak_bytes: int  # the same for evaluating one batch of `eval_batch` images after the step
    checkpoint_peak_bytes: int  # the same for writing the checkpoint after the step (`checkpoint_extra`)
    train_flops: int
    eval_batch: int
    saved_by_block: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def phases(self) -> dict[str, int]:
        """Peak bytes of each phase of a training run: the step, an evaluation batch, writing the checkpoint."""
        return {"step": self.step_peak_bytes, "evaluation": self.eval_peak_bytes,
                "checkpoint": self.checkpoint_peak_bytes}

    @property
    def peak_phase(self) -> str:
        """The phase whose peak is the run's (`phases`)."""
        return max(self.phases, key=self.phases.get)

    @property
    def peak_bytes(self) -> int:
        return self.phases[self.peak_phase]


def _fake_model(cfg: TrainConfig, num_classes: int, device: torch.device, mode: FakeTensorMode) -> nn.Module:
    """The model of `cfg` (method applied, random weights: memory does not depend on values) on fake tensors."""
    shapes_only = with_values(cfg, checkpoint="none", pretrained=False, device="cpu")
    with torch.device("meta"):
        model = setup_model(shapes_only, torch.device("meta"), num_classes)
    with mode:
        return model.to_empty(device=device).train()


def _saved_by_block(model: nn.Module, forward, exclude: set[int]) -> dict[str, int]:
    """Bytes saved for backward by `forward()` per block of `model`, each storage once, `exclude` (storage ids of
    parameters and buffers) left out."""
    seen: dict[int, Any] = {}
    by_block: dict[str, int] = {}
    with _module_stack(model) as stack:
        def pack(t: torch.Tensor) -> torch.Tensor:
            ref = StorageWeakRef(t.untyped_storage())
            if ref.cdata not in exclude and ref.cdata not in seen:
                seen[ref.cdata] = t
                owner = stack[-1] if stack else OUTSIDE
                block = owner if owner in (ROOT, OUTSIDE) else rollup_name(owner)
                by_block[block] = by_block.get(block, 0) + t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    return by_block


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """`bsr.train.optim.build_optimizer`'s optimizer, with AdamW as `TraceAdamW`."""
    if cfg.optimizer != "adamw":
        return build_optimizer(cfg, model)
    groups = build_optimizer(with_values(cfg, fused_step=False), model).param_groups

    def make(groups: list[dict]) -> torch.optim.Optimizer:
        return TraceAdamW(groups, lr=cfg.lr)

    return FusedOptimizer(groups, make) if cfg.fused_step else make(groups)


def checkpoint_extra(tensors: list[torch.Tensor], device: torch.device) -> int:
    """Memory that writing a checkpoint of `tensors` adds (`bsr.tensorfile`: one tensor at a time, straight from its
    storage): on CPU at most one copy of the largest tensor (a strided one is made contiguous first); on a GPU the
    copy is in host memory, none on the device. (Before `bsr.tensorfile`, safetensors' in-memory `save` held copies
    of the whole trainable state: about +600 MiB over the step for ViT-B/16 bsr with AdamW at batch 8,
    `benchmarks/checkpoint_peak.py`.)"""
    if device.type != "cpu" or not tensors:
        return 0
    return max(t.untyped_storage().nbytes() for t in tensors)


def _tensors_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum({StorageWeakRef(t.untyped_storage()).cdata: t.untyped_storage().nbytes() for t in tensors}.values())


def trace_config(cfg: TrainConfig, num_classes: int, device: Optional[torch.device] = None,
                 eval_batch: Optional[int] = None, flops: bool = True, heap_factor: float = 1.0,
                 small_below: int = 1 << 20) -> StepTrace:
    """Trace one training step of `cfg` (after one untraced step that creates the optimizer state), then one
    evaluation batch of `eval_batch` images (default: `bsr train`'s, `max(batch_size, 256)`). Single-task only.
    device: where the real step would run (its kernels decide what is saved); default `cfg.device`'s type, CPU.
    heap_factor: weight of storages below `small_below` bytes in the peaks (CPU: glibc's heap, see `LiveBytes`;
    `bsr.measure.overhead` calibrates it). The step's (large, small) timeline is kept as `.timeline`."""
    if cfg.tasks:
        raise BSRError("the memory model plans single-task runs; drop --tasks")
    device = device or torch.device("cuda" if cfg.device.startswith("cuda") else "cpu")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = _fake_model(cfg, num_classes, device, mode)
    size, batch = image_size(model), cfg.effective_batch
    eval_batch = eval_batch or max(cfg.batch_size, 256)
    with mode:
        optimizer = _optimizer(cfg, model)
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        images = torch.empty(batch, 3, size, size, device=device)
        labels = torch.zeros(batch, dtype=torch.int64, device=device)
        training_step(model, optimizer, criterion, images, labels, cfg, 1)  # the optimizer state now exists
        params = list(model.parameters())
        persistent = [*params, *model.buffers(), *_tensors_of(optimizer), images, labels]
        exclude = {StorageWeakRef(t.untyped_storage()).cdata for t in [*params, *model.buffers()]}
        cuda = device.type == "cuda"
        tracker = LiveBytes(granule=512 if cuda else 1, small_below=0 if cuda else small_below)
        tracker.hold(persistent + [p.grad for p in params if p.grad is not None])
        with tracker:  # micro-batches after the second repeat its memory exactly
            training_step(model, optimizer, criterion, images, labels, cfg, 2)
        step_peak, timeline = tracker.peak_at(heap_factor), tracker.timeline
        tracker.reset()
        after_step = tracker.peak_at(heap_factor)
        with tracker, torch.no_grad():
            model.eval()
            with autocast(cfg, device):
                model(torch.empty(eval_batch, 3, size, size, device=device))
            model.train()
        eval_peak = tracker.peak_at(heap_factor)
        micro = images[:cfg.batch_size]
        saved = _saved_by_block(backbone(model), lambda: criterion(model(micro), labels[:cfg.batch_size]), exclude)
        one = with_values(cfg, accumulate=1)  # FLOPs: one micro-batch's step, times the micro-batches
        train_flops = cfg.accumulate * count_flops(lambda: training_step(model, optimizer, criterion, micro,
                                                                         labels[:cfg.batch_size], one)) if flops else 0
    trainable = [p for p in params if p.requires_grad]
    result = StepTrace(param_bytes=_unique_bytes(params), grad_bytes=_unique_bytes(trainable),
                       optimizer_bytes=_unique_bytes(_tensors_of(optimizer)),
                       batch_bytes=images.untyped_storage().nbytes() + labels.untyped_storage().nbytes(),
                       saved_bytes=sum(saved.values()), step_peak_bytes=step_peak, eval_peak_bytes=eval_peak,
                       checkpoint_peak_bytes=after_step + checkpoint_extra(trainable + _tensors_of(optimizer), device),
                       train_flops=int(train_flops), eval_batch=eval_batch, saved_by_block=saved)
    result.timeline = timeline  # not a field: for calibration only
    return result
