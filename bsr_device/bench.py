"""`python -m bsr_device.bench ARTIFACTS`: the step time and whole-process peak memory of on-device training, measured
in a process without PyTorch (what a board running the device trainer pays).

Trains the artifacts for `--warmup` + `--steps` steps on seeded random batches of `--batch-size` images at their image
size (speed and memory do not depend on the pixels; the token counts are fixed by the graph) and prints one JSON line:
per-step CPU time (process time, all threads) and wall time medians, the peak RSS (VmHWM) after import and after
training. The ORT checkpoint is not written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def measure(artifacts: str, batch_size: int, steps: int, warmup: int, threads: int, graph_format: str,
            arena: bool) -> dict:
    from .runtime import block_torch, import_onnxruntime
    from .process import peak_rss_mib

    block_torch()
    import_onnxruntime()
    imported = peak_rss_mib()
    from .session import DeviceSession

    session = DeviceSession(artifacts, graph_format=graph_format, threads=threads, arena=arena)
    size = int(session.meta["img_size"][0])
    rng = np.random.default_rng(0)
    cpu, wall = [], []
    for step in range(warmup + steps):
        x = rng.standard_normal((batch_size, 3, size, size)).astype(np.float32)
        y = rng.integers(0, int(session.meta["num_classes"]), batch_size)
        c0, w0 = time.process_time(), time.perf_counter()
        session.train_step(x, y, 1e-4)
        if step >= warmup:
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    return {"runtime": "onnxruntime-training", "batch_size": batch_size, "steps": steps, "threads": threads,
            "graph_format": graph_format, "arena": arena, "step_cpu_s": statistics.median(cpu),
            "step_wall_s": statistics.median(wall), "import_rss_mib": imported, "peak_rss_mib": peak_rss_mib(),
            "torch_loaded": any(m == "torch" or m.startswith("torch.") for m, v in sys.modules.items() if v)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifacts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--graph-format", default="onnx", choices=("onnx", "ort"))
    p.add_argument("--no-arena", action="store_true")
    args = p.parse_args(argv)
    print(json.dumps(measure(args.artifacts, args.batch_size, args.steps, args.warmup, args.threads,
                             args.graph_format, not args.no_arena)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
