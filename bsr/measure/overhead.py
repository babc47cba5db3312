"""What the memory model cannot trace, measured once per machine and cached: the memory of a `bsr` process before it
builds a model, and the step overhead (real peak minus traced tensor peak: allocator rounding and small blocks, kernel
workspaces), plus `measure_step`, the real measured step of a configuration that checks a plan.

The cache is one JSON file, `$BSR_CACHE_DIR/memory-overhead.json` (default `~/.cache/bsr/`), keyed by machine,
torch version, device and allocator setting; delete it to measure again. Calibration runs in a fresh process (a
process's peak cannot be reset below what earlier work left) and takes a few seconds: the micro model's steps.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import allocator
from ..errors import BSRError
from ..files import atomic_write_bytes
from ..train import build_optimizer, pick_device, setup_model
from ..train.build import image_size
from ..train.checkpoint import save_checkpoint
from ..train.config import MICRO_MODEL, TrainConfig, make_config
from . import memory
from .protocol import random_batch, release_memory, sync
from .trace import trace_config, training_step

CACHE_FILE = "memory-overhead.json"
# Calibration steps: the micro model at 28 px, fp32 (full, bsr) and bf16 kernels (bsr lean), whose overheads differ;
# at two batch sizes, so that the heap's share (tensors below the mmap threshold) can be told from the constant part
CALIBRATION = [dict(method=method, batch_size=batch, **extra) for batch in (16, 48)
               for method, extra in (("full", {}), ("bsr", {}), ("bsr", {"bsr": {"preset": "lean"}}))]
HEAP_FACTORS = [1.0 + 0.1 * i for i in range(16)]  # weights of heap-served bytes tried: 1.0 ... 2.5


def cache_file() -> Path:
    root = os.environ.get("BSR_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bsr"
    return Path(root) / CACHE_FILE


def machine_key(device: torch.device, released: bool) -> str:
    """What the overhead depends on: machine, CPU, torch, device type and allocator setting."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return "|".join([platform.node(), platform.processor() or platform.machine(), f"torch {torch.__version__}",
                     device.type, gpu, "mmap 1 MiB" if released else "glibc default"])


@dataclass
class Overhead:
    """What the trace does not see: `process_bytes` (a bsr process before it builds a model: Python, torch and the
    libraries; 0 on CUDA, whose peak counts tensors only), `heap_factor` (CPU: the weight of tensors below
    `small_below` bytes, which glibc serves from its heap and whose freed chunks stay resident) and `step_bytes` per
    kernel kind ("fp32", "bf16": the median of the calibration steps' measured minus predicted peaks)."""

    key: str
    process_bytes: int
    step_bytes: dict
    measured: str
    steps: list
    heap_factor: float = 1.0
    small_below: int = 1 << 20

    def step_for(self, cfg: TrainConfig) -> int:
        """The step overhead of `cfg`'s kernel kind."""
        return int(self.step_bytes[kernel_kind(cfg)])

    def describe(self) -> str:
        steps = ", ".join(f"{kind} {value / 2**20:,.1f}" for kind, value in self.step_bytes.items())
        return (f"process {self.process_bytes / 2**20:,.0f} MiB, step overhead MiB {steps}, heap factor "
                f"{self.heap_factor:.1f}; measured {self.measured}, cached in {cache_file()}")


def kernel_kind(cfg: TrainConfig) -> str:
    """"bf16" when frozen weights or autocast compute in 16 bit (other kernels, other workspaces), else "fp32"."""
    half = cfg.amp != "off" or (cfg.method in ("bsr", "tokendrop") and cfg.bsr.frozen_dtype in ("bfloat16", "float16"))
    return "bf16" if half else "fp32"


def measure_step(cfg: TrainConfig, num_classes: int, device: torch.device, steps: int = 2,
                 checkpoint: bool = False) -> dict:
    """A real measured step of `cfg` in this process: build the model (its base weights as configured), `steps`
    training steps (`bsr.measure.trace.training_step`) on a seeded random batch, then (`checkpoint`) its checkpoint
    written to a temporary directory as training writes it; returns the process's peak
    (`process_peak_bytes`: VmHWM on CPU, the allocator's peak on CUDA) and the peak above the memory in use before
    building (`step_peak_bytes`). Everything is freed again before it returns. Fixes glibc's mmap threshold first
    when `cfg.release_memory` (as `bsr train` does), so that the check sees the allocator training will run with."""
    if cfg.release_memory:
        allocator.release_freed_memory()
    release_memory()
    baseline = memory.current_bytes(device)
    memory.reset_peak(device)
    model = setup_model(cfg, device, num_classes).train()
    optimizer = build_optimizer(cfg, model)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    images, labels = random_batch(cfg.effective_batch, image_size(model), num_classes, cfg.seed, device)
    for _ in range(steps):
        training_step(model, optimizer, criterion, images, labels, cfg)
    sync(device)
    if checkpoint:
        with tempfile.TemporaryDirectory(prefix="bsr-check-") as directory:
            save_checkpoint(Path(directory), model, optimizer, {"config": cfg.to_dict(), "step": steps})
    peak = memory.peak_bytes(device)
    if hasattr(optimizer, "remove"):
        optimizer.remove()  # a fused optimizer's hooks hold the parameters
    del model, optimizer, images, labels
    gc.collect()
    release_memory()
    return {"process_peak_bytes": peak, "step_peak_bytes": peak - baseline, "baseline_bytes": baseline}


def _calibration_config(values: dict, device: torch.device) -> TrainConfig:
    return make_config({"model": MICRO_MODEL, "img_size": 28, "checkpoint": "none", "optimizer": "sgd",
                        "weight_decay": 0.0, "clip_grad": None, "device": device.type, "threads": 1, **values})


def calibration_main() -> None:
    """Fresh-process half of `calibrate` (request on stdin: device, released): the process's memory before any
    model, then the real peaks of the `CALIBRATION` steps, as one JSON line on stdout."""
    request = json.loads(sys.stdin.read())
    device = pick_device(request["device"])
    if request["released"]:
        allocator.release_freed_memory()
    torch.set_num_threads(1)
    a = torch.randn(64, 64)
    torch.nn.functional.scaled_dot_product_attention(a[None, None], a[None, None], a[None, None])
    (a @ a).sum()  # the math libraries' first-use buffers belong to the process, not to a step
    release_memory()
    record = {"process_bytes": memory.current_rss_bytes() if device.type == "cpu" else 0, "steps": []}
    for values in CALIBRATION:
        measured = measure_step(_calibration_config(values, device), 10, device)
        record["steps"].append({"config": values, **measured})
    print(json.dumps(record))


def calibrate(device: torch.device, released: bool, log: Callable[[str], None]) -> Overhead:
    """Measure the overhead on this machine (fresh process) and trace the same steps; see `Overhead`."""
    log("measuring this machine's memory overhead once (a few seconds; cached)")
    proc = subprocess.run([sys.executable, "-c", "from bsr.measure.overhead import calibration_main as m; m()"],
                          input=json.dumps({"device": str(device), "released": released}), capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BSRError(f"measuring the memory overhead failed (exit {proc.returncode}): {tail}")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    small_below = (1 << 20) if released else (32 << 20)  # glibc's threshold, fixed or at its dynamic maximum
    timelines = []
    for step in record["steps"]:
        cfg = _calibration_config(step["config"], device)
        trace = trace_config(cfg, 10, device, flops=False, small_below=small_below)
        step["traced_bytes"] = trace.step_peak_bytes
        timelines.append((kernel_kind(cfg), step["step_peak_bytes"], trace.timeline))
    factor, gaps = fit_overhead(timelines, device.type == "cpu")
    return Overhead(machine_key(device, released), int(record["process_bytes"]), gaps,
                    time.strftime("%Y-%m-%d %H:%M"), record["steps"], factor, small_below)


def fit_overhead(steps: list[tuple[str, int, list]], heap: bool) -> tuple[float, dict]:
    """(heap factor, step bytes per kernel kind) that predict the measured peaks of `steps` ((kind, measured bytes,
    traced (large, small) timeline)) best: for each heap factor (1 without a heap), the step bytes of a kind are the
    median of measured minus traced-at-that-factor (at least 0); the factor with the smallest worst relative error
    wins."""
    best = None
    for factor in HEAP_FACTORS if heap else [1.0]:
        peaks = [(kind, measured, max(large + factor * small for large, small in timeline))
                 for kind, measured, timeline in steps]
        gaps = {kind: max(0, int(statistics.median([m - p for k, m, p in peaks if k == kind] or [0])))
                for kind in ("fp32", "bf16")}  # memory outside tensors is never negative
        worst = max(abs((p + gaps[k]) / m - 1) for k, m, p in peaks)
        if best is None or worst < best[0]:
            best = (worst, factor, gaps)
    return round(best[1], 2), best[2]


def overhead(device: torch.device, released: bool, log: Callable[[str], None], refresh: bool = False) -> Overhead:
    """This machine's `Overhead` from the cache, measured (and cached) when it is not there or `refresh`."""
    path, key = cache_file(), machine_key(device, released)
    cached: dict = {}
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            cached = {}  # a damaged cache is measured again and rewritten
    if key in cached and not refresh:
        try:
            result = Overhead(**cached[key])
            if set(result.step_bytes) == {"fp32", "bf16"} and "heap_factor" in cached[key]:
                return result
        except (TypeError, AttributeError):
            pass  # an older or damaged entry: measured again
    result = calibrate(device, released, log)
    cached[key] = asdict(result)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(cached, indent=1) + "\n").encode())
    except (OSError, BSRError) as e:
        log(f"could not cache the overhead in {path} ({e}); it will be measured again next time")
    return result


def data_bytes(info) -> int:
    """Bytes a dataset keeps in memory: its uint8 images when they have a fixed size (the offline datasets, CIFAR);
    0 for images read from files per item (image folders, Pets, Flowers, Food). `info`: its `DatasetInfo`."""
    if info.image_size == 0:
        return 0
    return (info.num_train + info.num_test) * info.image_size ** 2 * info.channels
