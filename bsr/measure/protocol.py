"""The one measurement protocol of `bsr bench` and `bsr study` (SPEC section 6): memory and FLOPs of a training step.

Sarkar et al. (arXiv 2405.10951) compare methods by training memory and FLOPs; both are measured here the same way
for every caller:

1. `prepare_process`: torch threads, glibc's mmap threshold (`bsr.allocator`, so freed activations go back to
   the OS and peak RSS tracks live tensors), and peft imported outside the window (its modules are not training).
2. `release_memory`, then the baseline: the memory in use before the model is built.
3. The workload is built (model, optimizer, a fixed seeded random batch: memory and FLOPs do not depend on pixel
   values) and stepped `warmup` times, so that the optimizer state exists.
4. The peak is reset and `steps` more steps run; the training peak is the peak above the baseline.
5. Exact counts, after the peak was read so that they cannot disturb it: bytes saved for backward by one forward and
   loss, FLOPs of one whole step (forward, backward, optimizer), bytes of parameters, gradients, optimizer state.

Call it in a fresh process: a CPU process's peak RSS cannot be reset below what earlier work left in its heap.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..data import dataset_info
from ..train import build_optimizer, make_config, pick_device, setup_model
from ..train.build import backbone, image_size
from ..train.config import TrainConfig
from ..train.fused import FusedOptimizer, largest_grad_bytes
from ..train.methods import count_params
from .. import allocator
from . import memory
from .flops import count_flops


@dataclass
class Workload:
    """One training step to measure: `model`, its `optimizer` and `loss()` (forward and loss on the fixed batch whose
    images (B, 3, S, S) are `images`); `host` is the timm ViT whose blocks saved bytes are attributed to."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | FusedOptimizer
    loss: Callable[[], torch.Tensor]
    host: nn.Module
    images: torch.Tensor

    def step(self) -> None:
        """One forward, backward and optimizer step; gradients set to None after it, as torch does by default (a
        `FusedOptimizer` has stepped and freed them inside backward already)."""
        self.loss().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def random_batch(batch_size: int, img_size: int, num_classes: int, seed: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random batch: images (B, 3, S, S), labels (B,)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=gen)
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen)
    return images.to(device), labels.to(device)


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory() -> None:
    """Free what Python dropped and hand glibc's free heap back to the OS, so the next RSS baseline is honest."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    allocator.trim()  # a no-op off glibc, where RSS may stay higher; the baseline taken next says so


def prepare_process(threads: Optional[int], mmap_threshold: Optional[int], lora: bool) -> bool:
    """Step 1 of the protocol; returns whether the mmap threshold could be fixed (glibc only; True if not asked)."""
    if threads is not None:
        torch.set_num_threads(threads)
    fixed = not mmap_threshold or allocator.release_freed_memory(mmap_threshold)
    if lora:
        import peft  # noqa: F401  (imported here, not inside the window: its ~80 MB of modules are not training)
    return fixed


def measure_training(build: Callable[[], Workload], device: torch.device, warmup: int = 1,
                     steps: int = 1) -> tuple[dict, Workload]:
    """Steps 2-5 of the protocol on the workload `build()` makes; returns (record, the workload)."""
    release_memory()
    baseline = memory.current_bytes(device)
    work = build()
    for _ in range(warmup):
        work.step()
    sync(device)
    resettable = memory.reset_peak(device)
    resident = memory.current_bytes(device) - baseline
    for _ in range(steps):
        work.step()
    sync(device)
    peak = memory.peak_bytes(device) - baseline

    saved = memory.saved_tensor_bytes(work.loss, model=work.host,
                                      exclude=[*work.model.parameters(), *work.model.buffers()])
    flops = count_flops(work.step)
    counts = count_params(work.model)
    return {
        "train_peak_bytes": peak, "train_resident_bytes": resident, "peak_resettable": resettable,
        "saved_activation_bytes": saved.total, "saved_by_block": saved.by_block,
        "param_bytes": memory.param_bytes(work.model), "grad_bytes": grad_bytes(work),
        "optimizer_bytes": memory.optimizer_state_bytes(work.optimizer),
        "trainable_params": counts.trainable, "total_params": counts.total, "train_flops_per_step": flops,
    }, work


def grad_bytes(work: Workload) -> int:
    """Bytes of the gradients a step holds at once: all of them, or with the step fused into backward
    (`bsr.train.fused`) the largest one, each being freed once its parameter is updated."""
    if isinstance(work.optimizer, FusedOptimizer) and work.optimizer.in_backward:
        return largest_grad_bytes(work.optimizer)
    return memory.grad_bytes(work.model)


def config_workload(cfg: TrainConfig, device: torch.device) -> Workload:
    """The training step of `cfg` as `bsr train` takes it: its model (`bsr.train.build`), optimizer, loss (label
    smoothing included) on a seeded random batch of `batch_size`; a multi-task config trains task 0's head."""
    num_classes = cfg.num_classes or dataset_info(cfg.task_names[0]).num_classes
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    model = setup_model(cfg, device).train()
    images, labels = random_batch(cfg.batch_size, image_size(model), num_classes, cfg.seed, device)
    optimizer = build_optimizer(cfg, model)

    def loss() -> torch.Tensor:
        return criterion(model(images) if not cfg.tasks else model(images, 0), labels)

    return Workload(model, optimizer, loss, backbone(model), images)


def measure_config(config: dict, warmup: int = 1, steps: int = 1, mmap_threshold: Optional[int] = 1 << 20) -> dict:
    """The protocol on one `TrainConfig` (as a dict): what `bsr study` records per (point, dataset)."""
    cfg = make_config(config)
    device = pick_device(cfg.device)
    prepare_process(cfg.threads, mmap_threshold, lora=cfg.method == "lora")
    record, work = measure_training(lambda: config_workload(cfg, device), device, warmup, steps)
    return {**record, "batch_size": cfg.batch_size, "img_size": int(work.images.shape[-1])}
