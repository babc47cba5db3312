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
import subprocess
import sys
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
from ..train.config import MICRO_MODEL, TrainConfig, make_config
from . import memory
from .protocol import random_batch, release_memory, sync
from .trace import trace_config, training_step

CACHE_FILE = "memory-overhead.json"
# Calibration steps: the micro model at 28 px, fp32 (full, bsr) and bf16 kernels (bsr lean), whose overheads differ
CALIBRATION = [dict(method="full", batch_size=64), dict(method="bsr", batch_size=64),
               dict(method="bsr", batch_size=64, bsr={"preset": "lean"})]


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
    """Bytes beyond the traced tensors: `process_bytes` (a bsr process before it builds a model: Python, torch and
    the libraries; 0 on CUDA, whose peak counts tensors only) and `step_bytes` per kernel kind (the largest
    real-minus-traced step peak of the calibration steps of that kind: "fp32", "bf16")."""

    key: str
    process_bytes: int
    step_bytes: dict
    measured: str
    steps: list

    def step_for(self, cfg: TrainConfig) -> int:
        """The step overhead of `cfg`'s kernel kind."""
        return int(self.step_bytes[kernel_kind(cfg)])

    def describe(self) -> str:
        steps = ", ".join(f"{kind} {value / 2**20:,.1f}" for kind, value in self.step_bytes.items())
        return (f"process {self.process_bytes / 2**20:,.0f} MiB, step overhead MiB {steps}; measured "
                f"{self.measured}, cached in {cache_file()}")


def kernel_kind(cfg: TrainConfig) -> str:
    """"bf16" when frozen weights or autocast compute in 16 bit (other kernels, other workspaces), else "fp32"."""
    half = cfg.amp != "off" or (cfg.method in ("bsr", "tokendrop") and cfg.bsr.frozen_dtype != "float32")
    return "bf16" if half else "fp32"


def measure_step(cfg: TrainConfig, num_classes: int, device: torch.device, steps: int = 2) -> dict:
    """A real measured step of `cfg` in this process: build the model (its base weights as configured), `steps`
    training steps (`bsr.measure.trace.training_step`) on a seeded random batch; returns the process's peak
    (`process_peak_bytes`: VmHWM on CPU, the allocator's peak on CUDA) and the peak above the memory in use before
    building (`step_peak_bytes`). Everything is freed again before it returns."""
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
    gaps: dict[str, int] = {"fp32": 0, "bf16": 0}
    for step in record["steps"]:
        cfg = _calibration_config(step["config"], device)
        step["traced_bytes"] = trace_config(cfg, 10, device, flops=False).step_peak_bytes
        kind = kernel_kind(cfg)
        gaps[kind] = max(gaps[kind], step["step_peak_bytes"] - step["traced_bytes"])
    return Overhead(machine_key(device, released), int(record["process_bytes"]), gaps,
                    time.strftime("%Y-%m-%d %H:%M"), record["steps"])


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
            if set(result.step_bytes) == {"fp32", "bf16"}:
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
