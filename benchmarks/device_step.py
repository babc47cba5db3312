"""Training on the device, measured: per-step CPU time and whole-process peak memory of full, bsr and bsr-lean in ONNX
Runtime's on-device training (`bsr export --format ort-training`) against the same step in PyTorch (`bsr train`'s),
with the artifacts' sizes and export times.

For each method: export the artifacts from the config (timed, sizes of every file); then
- time: ONE process steps every method in both runtimes in turn (round-robin, 1 intra-op thread each, the same
  random batches), so the ORT/PyTorch and method ratios come from the same minutes of this machine; CPU time per step
  is the process time of the step (`time.process_time`), medians over the steps after warm-up;
- memory: a fresh process per (runtime, method): the device side by `python -m bsr_device.bench` (torch blocked: what
  a board pays), the PyTorch side by this script's `--worker torch` (bsr's model, optimizer and step, glibc's mmap
  threshold as `bsr train` sets it); peak RSS (VmHWM) of the whole process.
Writes OUT/device-step.json and prints a table.

    python benchmarks/device_step.py --model vit_small_patch14_dinov2_112 --batch-size 16 --out runs/device-dinov2
    python benchmarks/device_step.py --model vit_base_patch16_224 --checkpoint none --batch-size 8 --out runs/dev-b8
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

METHODS = {"full": {"method": "full"}, "bsr": {"method": "bsr"}, "bsr-lean": {"method": "bsr", "preset": "lean"}}


def config(args, method: str):
    from bsr.train import make_config

    values = {"model": args.model, "num_classes": 10, "batch_size": args.batch_size, "threads": 1,
              "method": METHODS[method]["method"], "dataset": "digits-embedded"}
    if args.checkpoint:
        values["checkpoint"] = args.checkpoint
    if METHODS[method].get("preset"):
        values["bsr"] = {"preset": METHODS[method]["preset"]}
    return make_config(values)


def batches(n: int, batch: int, size: int) -> list:
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((batch, 3, size, size)).astype(np.float32), rng.integers(0, 10, batch))
            for _ in range(n)]


def torch_stepper(cfg):
    """A closure doing one `bsr train` step (forward, loss, backward, clipping, optimizer) on a batch."""
    import torch
    import torch.nn.functional as F

    from bsr.train import setup_model
    from bsr.train.optim import build_optimizer

    model = setup_model(cfg, torch.device("cpu"))
    model.train()
    optimizer = build_optimizer(cfg, model)
    trained = [p for p in model.parameters() if p.requires_grad]

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, cfg.clip_grad)
        optimizer.step()

    return step, model


def worker_torch(args) -> dict:
    """Fresh-process peak memory of PyTorch training steps (this script with --worker torch)."""
    import torch

    from bsr.allocator import release_freed_memory
    from bsr_device.process import peak_rss_mib

    torch.set_num_threads(1)
    release_freed_memory()  # as bsr train does by default
    imported = peak_rss_mib()
    step, model = torch_stepper(config(args, args.method))
    size = int(model.patch_embed.img_size[0])
    times = []
    for x, y in batches(args.warmup + args.steps, args.batch_size, size):
        start = time.process_time()
        step(x, y)
        times.append(time.process_time() - start)
    return {"runtime": "pytorch", "import_rss_mib": imported, "peak_rss_mib": peak_rss_mib(),
            "step_cpu_s": statistics.median(times[args.warmup:])}


def worker_time(args, arts: dict) -> dict:
    """Round-robin CPU time per step of every method in both runtimes, in this one process."""
    import torch

    from bsr_device.session import DeviceSession

    torch.set_num_threads(1)
    runners = {}
    for method, art in arts.items():
        step, model = torch_stepper(config(args, method))
        session = DeviceSession(art, threads=1)
        runners[method] = (step, session)
    size = int(model.patch_embed.img_size[0])
    data = batches(args.warmup + args.steps, args.batch_size, size)
    times = {(m, r): [] for m in arts for r in ("pytorch", "onnxruntime")}
    for i, (x, y) in enumerate(data):
        for method, (step, session) in runners.items():
            for runtime in ("onnxruntime", "pytorch"):
                start = time.process_time()
                step(x, y) if runtime == "pytorch" else session.train_step(x, y, 1e-4)
                if i >= args.warmup:
                    times[(method, runtime)].append(time.process_time() - start)
    return {f"{m}/{r}": statistics.median(v) for (m, r), v in times.items()}


def _json_line(result: subprocess.CompletedProcess, what: str) -> dict:
    if result.returncode != 0:
        sys.exit(f"{what} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch14_dinov2_112")
    p.add_argument("--checkpoint", default=None, help="base weights (none: random init, for speed and memory only)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--methods", default="full,bsr,bsr-lean")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory-steps", type=int, default=2, help="steps of each fresh memory process (the first is "
                   "its warm-up; the peak comes with the first steps)")
    p.add_argument("--out", type=Path, default=Path("runs/device-step"))
    p.add_argument("--worker", choices=("torch", "time"), help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--arts", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "torch":
        print(json.dumps(worker_torch(args)))
        return
    if args.worker == "time":
        print(json.dumps(worker_time(args, json.loads(args.arts))))
        return
    from bsr.train.device import export_device

    methods = args.methods.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["--model", args.model, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
              "--warmup", str(args.warmup)] + (["--checkpoint", args.checkpoint] if args.checkpoint else [])
    record = {"model": args.model, "batch_size": args.batch_size, "steps": args.steps, "methods": {}}
    arts = {}
    for method in methods:
        art = args.out / f"artifacts-{method}"
        shutil.rmtree(art, ignore_errors=True)
        start = time.perf_counter()
        r = export_device(config(args, method), art)
        record["methods"][method] = {"export_s": time.perf_counter() - start, "files": r["files"],
                                     "trained_tensors": r["trained"]}
        arts[method] = str(art)
        print(f"exported {method}: {record['methods'][method]['export_s']:.1f} s", flush=True)
    memory = ["--steps", str(args.memory_steps - 1), "--warmup", "1"]
    for method in methods:
        ort = _json_line(subprocess.run([sys.executable, "-m", "bsr_device.bench", arts[method], "--batch-size",
                                         str(args.batch_size), *memory], capture_output=True, text=True),
                         f"ORT {method}")
        pt = _json_line(subprocess.run([sys.executable, __file__, *common, *memory, "--worker", "torch", "--method",
                                        method], capture_output=True, text=True), f"PyTorch {method}")
        record["methods"][method].update({"ort_memory": ort, "pytorch_memory": pt})
        print(f"memory {method}: ORT {ort['peak_rss_mib']:.0f} MiB, PyTorch {pt['peak_rss_mib']:.0f} MiB", flush=True)
    times = _json_line(subprocess.run([sys.executable, __file__, *common, "--worker", "time", "--arts",
                                       json.dumps(arts)], capture_output=True, text=True), "timing")
    record["step_cpu_s"] = times
    (args.out / "device-step.json").write_text(json.dumps(record, indent=1))
    base = times[f"{methods[0]}/pytorch"]
    print(f"\n{args.model}, batch {args.batch_size}, 1 thread; CPU s/step (ratio to {methods[0]} in PyTorch); peak RSS")
    for method in methods:
        m = record["methods"][method]
        ort_t, pt_t = times[f"{method}/onnxruntime"], times[f"{method}/pytorch"]
        print(f"  {method:<9} ORT {ort_t:7.3f} ({base / ort_t:4.2f}x)  PyTorch {pt_t:7.3f} ({base / pt_t:4.2f}x)  "
              f"ORT/PyTorch {ort_t / pt_t:4.2f}  RSS ORT {m['ort_memory']['peak_rss_mib']:6.0f} MiB  PyTorch "
              f"{m['pytorch_memory']['peak_rss_mib']:6.0f} MiB  ckpt {m['files']['checkpoint'] / 2**20:.1f} MiB  "
              f"export {m['export_s']:.1f} s")


if __name__ == "__main__":
    main()
