"""`bsr bench`: memory, FLOPs and time of every fine-tuning method, side by side, measured on one machine.

Sarkar et al. (arXiv 2405.10951) compare Block Selective Reprogramming against full fine-tuning and other
memory-saving methods by training memory, FLOPs and time. This module measures those figures as SPEC section 6
defines them and returns them as records (one dict per method); `bsr.measure.report` renders tables, JSON and the plot
from the records, and the CLI only parses and calls.

Protocol, and why:
- Memory comes from a fresh process per method (`bsr.measure.worker`): a CPU process's peak RSS cannot be reset below
  what an earlier method left in the heap, and a fresh process starts every method from the same state. Inside it,
  first the inference peak of the unpatched model, then (after freeing it back to the OS) the training step measured
  by `bsr.measure.protocol`, the protocol `bsr study` uses too. Models are built by `bsr.train.build`.
- Time comes from one process stepping every method in turn (round-robin, rotated start, medians): this machine's
  speed drifts by about 20% within minutes, so methods timed minutes apart are not comparable. The dense matmul speed
  is sampled every round in the same process, so achieved GFLOP/s can be read against it.
- Inputs are the same seeded random batch for every method, weights random: memory, FLOPs and time do not depend on
  their values (and this machine has no pretrained weights offline).

`moe=True` benchmarks the multi-task Mixture-of-Experts ViT of SPEC section 5 instead (`bsr.core.moe`): the step is one
task's batch (task 0's head, cross-entropy, backward, optimizer step) with the router noise on, as in training, and
the methods are `MOE_METHODS`; ratios are then against `moe-full`, the MoE model trained in full without dropping.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from datetime import datetime, timezone
from typing import Callable, Optional

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..core.moe import moe_layers
from ..core.patch import bsr_state
from ..errors import BSRError
from ..train import pick_device, setup_model
from ..train.build import backbone
from ..train.fused import AdamWBf16State, FusedOptimizer, SGDBf16State
from ..train.methods import tokens_per_block
from ..version import __version__
from . import flops, memory
from .bench_spec import (MIB, MOE_METHODS, MOE_TASK, RECORD_PREFIX, BenchSpec, base_method, bench_config,
                         has_bf16_state, is_fused, meta_model, method_config, method_options)
from .protocol import Workload, measure_training, prepare_process, random_batch, release_memory, sync

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ------------------------------------------------------------------------------------------------- one method


class TaskStep(nn.Module):
    """A `MultiTaskViT` seen as a single-task classifier: `forward(images)` is `mt(images, task)`, so the training
    step, FLOP counter and forward-GMAC count run it like any benchmarked model. images: (B, 3, H, W) -> logits."""

    def __init__(self, mt: nn.Module, task: int = MOE_TASK):
        super().__init__()
        self.mt, self.task = mt, task

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.mt(images, self.task)




def bench_host(model: nn.Module) -> nn.Module:
    """The timm ViT inside a benchmarked model (a `TaskStep`'s backbone, a peft model's base model, or the model)."""
    return backbone(model.mt if isinstance(model, TaskStep) else model)


def build(spec: BenchSpec, name: str, device: torch.device, apply: bool = True) -> nn.Module:
    """The model of bench method `name` on `device` in train mode, built by `bsr.train.build` from `bench_config`
    (random weights, seeded); a multi-task model is seen through a `TaskStep` on task 0, its router noise on as in
    training. `apply=False`: the model before the method is applied (the same for every single-task method)."""
    classes = [spec.num_classes] * spec.num_tasks if spec.moe else None
    model = setup_model(bench_config(spec, name), device, task_classes=classes, apply=apply)
    return (TaskStep(model) if spec.moe else model).train()


def image_size(model: nn.Module) -> int:
    return int(bench_host(model).patch_embed.img_size[0])


def make_optimizer(spec: BenchSpec, model: nn.Module, fused: bool = False,
                   bf16: bool = False) -> torch.optim.Optimizer | FusedOptimizer:
    """SGD with momentum (the paper's ViT-B recipe) or AdamW over the trainable parameters, no weight decay; `fused`:
    one per parameter, stepped inside backward; `bf16`: momentum / first moment in bf16 (`bsr.train.fused`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer == "adamw":
        make = partial(AdamWBf16State if bf16 else torch.optim.AdamW, lr=spec.lr, weight_decay=0.0)
    else:
        make = partial(SGDBf16State if bf16 else torch.optim.SGD, lr=spec.lr, momentum=spec.momentum)
    if fused or bf16:
        return FusedOptimizer([{"params": params}], make, in_backward=fused)
    return make(params)



def workload(spec: BenchSpec, name: str, device: torch.device) -> Workload:
    """Method `name`'s training step: its model, `make_optimizer`, cross-entropy on the seeded random batch."""
    model = build(spec, name, device)
    images, labels = random_batch(spec.batch_size, image_size(model), spec.num_classes, spec.seed, device)
    optimizer = make_optimizer(spec, model, is_fused(name), has_bf16_state(name))
    return Workload(model, optimizer, lambda: F.cross_entropy(model(images), labels),
                    bench_host(model), images)


def apply_mmap_threshold(spec: BenchSpec) -> None:
    """Fix glibc's mmap threshold if `spec` asks (see `bsr.allocator`): in the memory processes and in the
    timing process alike, so that its cost in page faults is part of every method's step time."""
    if not prepare_process(spec.threads, spec.mmap_threshold, lora=False):
        raise BSRError("mmap_threshold needs glibc (Linux); drop the option here")


def inference_peak(spec: BenchSpec, device: torch.device, name: Optional[str] = None) -> int:
    """Peak memory (bytes) of building the unpatched model of method `name` (the same for every single-task method)
    and running one batch under `inference_mode`, above the memory in use just before building it. The model is
    freed again before returning."""
    size = spec.img_size or int(meta_model(spec).patch_embed.img_size[0])
    images, _ = random_batch(spec.batch_size, size, spec.num_classes, spec.seed, device)
    release_memory()
    with memory.track_peak(device) as window:
        model = build(spec, name or spec.baseline, device, apply=False).eval()
        with torch.inference_mode():
            model(images)
    del model
    release_memory()
    return window.increase


def training_memory(spec: BenchSpec, name: str, device: torch.device) -> dict:
    """`bsr.measure.protocol` on method `name` (`warmup` steps, then the peak over `memory_steps` steps above the
    pre-build baseline; saved bytes, FLOPs, sizes), plus forward GMACs, tokens per block, MoE parameters and the
    recomputation the BSR model ran with (`recompute="auto"` resolved for it; None without BSR)."""
    record, work = measure_training(lambda: workload(spec, name, device), device, spec.warmup, spec.memory_steps)
    model, vit, size = work.model, work.host, int(work.images.shape[-1])
    resolved = bsr_state(vit)
    return {
        **record,
        "fwd_gmacs_per_image": flops.fwd_gmacs_per_image(model, size, device=device, in_chans=3),
        "tokens": [list(t) for t in tokens_per_block(vit if isinstance(model, TaskStep) else model, work.images[:1])],
        "img_size": size,
        "moe_params": sum(p.numel() for layer in moe_layers(vit) for p in layer.parameters()),
        "recompute": resolved.recompute if resolved is not None else None,
    }


def memory_record(spec: BenchSpec, name: str) -> dict:
    """The fresh-process half of a record: inference peak, then training memory, sizes and FLOPs of `name`."""
    device = pick_device(spec.device)
    apply_mmap_threshold(spec)
    prepare_process(None, None, lora=method_config(spec, name)[0] == "lora")
    infer = inference_peak(spec, device, name)
    return {"method": name, "infer_peak_bytes": infer, **training_memory(spec, name, device)}


def memory_record_isolated(spec: BenchSpec, name: str, timeout: Optional[float] = None) -> dict:
    """`memory_record` in a fresh `python -m bsr.measure.worker` process; its one JSON record read back."""
    request = json.dumps({"spec": spec.to_dict(), "method": name})
    proc = subprocess.run([sys.executable, "-m", "bsr.measure.worker"], input=request, capture_output=True,
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
    runs = {name: workload(spec, name, device) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    gflops: list[float] = []
    for r in range(spec.warmup + spec.steps):
        timed = r >= spec.warmup
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync(device)
            start = time.perf_counter()
            runs[name].step()
            sync(device)
            if timed:
                times[name].append(time.perf_counter() - start)
        if timed:
            gflops.append(flops.matmul_gflops(device, size=spec.matmul_size))
        log(f"time: round {r + 1}/{spec.warmup + spec.steps} {'timed' if timed else 'warm-up'}"
            + (f", matmul {gflops[-1]:.0f} GFLOP/s" if timed else ""))
    return times, gflops


# ------------------------------------------------------------------------------------------------- the run


def analytic_fields(spec: BenchSpec, name: str, tokens: list) -> dict:
    """The authors' formula (`bsr.measure.analytic`) for method `name`, where it has a counterpart; else None fields.

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
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bsr/measure/bench.py
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
    """Versions of bsr (with its git commit), torch, timm and Python."""
    return {"bsr": __version__, "commit": source_commit(), "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def add_ratios(records: list[dict], baseline: str = "full") -> None:
    """Ratios baseline/method of memory, time and FLOPs (`ratio_vs_baseline`, and the `baseline` method's name), from
    the baseline record of the same run (None without one): `full`, or `moe-full` for the multi-task run. Also
    `ratio_vs_same_option`: against the baseline given the same options (`full+fused` for `bsr+fused`), so that an
    optimizer option's own saving is not mistaken for the method's."""
    by_name = {r["method"]: r for r in records}
    same = {method_options(r["method"]): r for r in records if base_method(r["method"]) == baseline}
    keys = {"train_peak": "train_peak_bytes", "saved_activation": "saved_activation_bytes",
            "step_time": "step_time_median_s", "flops": "train_flops_per_step"}
    for r in records:
        r["baseline"] = baseline
        for field, base in (("ratio_vs_baseline", by_name.get(baseline)),
                            ("ratio_vs_same_option", same.get(method_options(r["method"])))):
            r[field] = {k: (base[key] / r[key] if base is not None and r[key] else None) for k, key in keys.items()}
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
    device = pick_device(spec.device)
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
        recompute = record.pop("recompute")
        moe = {"tasks": spec.num_tasks, "task": MOE_TASK, "experts": spec.moe_experts, "top_k": spec.moe_top_k,
               "has_moe_layers": MOE_METHODS[base_method(name)][1]} if spec.moe else None
        records.append({"method": name, "model": spec.model, "batch_size": spec.batch_size,
                        "optimizer": spec.optimizer, "fused_step": is_fused(name),
                        "bf16_state": has_bf16_state(name), "multitask": moe, **record,
                        "bsr_config": {**config.to_dict(), "recompute": recompute} if uses_bsr else None,
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
