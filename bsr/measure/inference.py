"""`bsr bench --inference`: what BSR's token dropping saves when the fine-tuned model is deployed (issue 13).

BSR (Sarkar et al., arXiv 2405.10951) drops tokens in inference too, so the model a run evaluated runs on fewer tokens
than the model it started from. Four variants of one benchmarked model, built by `bsr.train.build` with random
weights (speed and memory do not depend on their values):

- `timm`: the unpatched timm model in PyTorch (the baseline of every ratio);
- `bsr`: the BSR model (method bsr, its `BSRConfig`) in PyTorch, dropping tokens as in evaluation;
- `timm-onnx`, `bsr-onnx`: both exported by `bsr.deploy.export_onnx` and run by onnxruntime (CPU provider).

Protocol, as the training bench's (`bsr.measure.bench`):
- time: one process runs every variant in turn (round-robin, rotated start; `warmup` untimed then `steps` timed
  rounds). Each round times `B1_REPEATS` forwards of one image (latency at batch 1) and one forward of `batch_size`
  images (throughput); medians over the rounds. PyTorch runs under `inference_mode` with `threads` threads,
  onnxruntime with as many intra-op threads.
- memory: a fresh process per variant (`python -m bsr.measure.inference`), the peak resident memory of building (or
  loading the ONNX file into a session) and running one batch of `batch_size`, above the memory in use before.
- limit: the forward FLOP ratio timm/bsr (`bsr.measure.flops`), what dropping could save at most.
Inference runs on the CPU only (onnxruntime's CPU provider): `device` must be cpu or auto.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from bsr_device.runtime import import_onnxruntime

from ..deploy import export_onnx, onnx_session, verify_onnx
from ..errors import BSRError
from ..train import setup_model
from ..train.methods import format_tokens, tokens_per_block
from . import flops, memory
from .bench import apply_mmap_threshold, machine, versions
from .bench_spec import MIB, RECORD_PREFIX, BenchSpec, bench_config, meta_model
from .protocol import random_batch, release_memory

VARIANTS = ("timm", "bsr", "timm-onnx", "bsr-onnx")
BASELINES = {"pytorch": "timm", "onnxruntime": "timm-onnx"}  # the unpatched model in each runtime
B1_REPEATS = 3  # batch-1 forwards timed per round
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def check(spec: BenchSpec) -> None:
    """Refuse (one line) what inference cannot measure here, before anything is built."""
    if spec.device not in ("cpu", "auto"):
        raise BSRError(f"device={spec.device!r}: bsr bench --inference measures CPU inference (onnxruntime's CPU "
                       f"provider); use --device cpu")
    if spec.moe:
        raise BSRError("--inference measures single-task models; drop --moe")
    import_onnxruntime()  # a one-line error when it is not installed


def build_variant(spec: BenchSpec, variant: str) -> nn.Module:
    """The PyTorch model of `timm` (unpatched) or `bsr` (method bsr applied), eval mode, on the CPU."""
    model = setup_model(bench_config(spec, "bsr"), torch.device("cpu"), apply=variant.startswith("bsr"))
    return model.eval().requires_grad_(False)


def _runner(variant: str, model: Optional[nn.Module], onnx_path: Optional[Path], threads: int):
    """A function images -> logits for `variant`."""
    if variant.endswith("-onnx"):
        session = onnx_session(onnx_path, threads=threads)
        return lambda x: session.run(["logits"], {"images": x.numpy()})[0]

    def run(x: torch.Tensor):
        with torch.inference_mode():
            return model(x)

    return run


def _threads(spec: BenchSpec) -> int:
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    return torch.get_num_threads()


def memory_record(spec: BenchSpec, variant: str, onnx_path: Optional[str]) -> dict:
    """Peak memory (bytes above the memory in use before) of building `variant` and running one batch of
    `batch_size`; meant for a fresh process."""
    threads = _threads(spec)
    apply_mmap_threshold(spec)
    size = int(meta_model(spec).patch_embed.img_size[0])
    images, _ = random_batch(spec.batch_size, size, spec.num_classes, spec.seed, torch.device("cpu"))
    release_memory()
    with memory.track_peak("cpu") as window:
        model = None if variant.endswith("-onnx") else build_variant(spec, variant)
        _runner(variant, model, Path(onnx_path) if onnx_path else None, threads)(images)
    return {"variant": variant, "peak_bytes": window.increase, "peak_resettable": window.resettable}


def memory_record_isolated(spec: BenchSpec, variant: str, onnx_path: Optional[Path]) -> dict:
    """`memory_record` in a fresh `python -m bsr.measure.inference` process."""
    request = json.dumps({"spec": spec.to_dict(), "variant": variant, "onnx": str(onnx_path) if onnx_path else None})
    proc = subprocess.run([sys.executable, "-m", "bsr.measure.inference"], input=request, capture_output=True,
                          text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [ln[len(RECORD_PREFIX):] for ln in proc.stdout.splitlines() if ln.startswith(RECORD_PREFIX)]
    reply = json.loads(lines[-1]) if lines else {}
    if proc.returncode != 0 or "error" in reply or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BSRError(f"inference memory worker for {variant} failed (exit {proc.returncode}): "
                       f"{reply.get('error') or tail}")
    return reply


def round_robin(spec: BenchSpec, runners: dict, size: int, log: Log = _quiet) -> dict[str, dict[str, list[float]]]:
    """Time every variant in turn: per round `B1_REPEATS` batch-1 forwards and one batch of `batch_size`."""
    one, _ = random_batch(1, size, spec.num_classes, spec.seed, torch.device("cpu"))
    batch, _ = random_batch(spec.batch_size, size, spec.num_classes, spec.seed, torch.device("cpu"))
    names = list(runners)
    times = {n: {"b1": [], "batch": []} for n in names}
    for r in range(spec.warmup + spec.steps):
        timed = r >= spec.warmup
        for name in names[r % len(names):] + names[:r % len(names)]:
            for x, key, repeats in ((one, "b1", B1_REPEATS), (batch, "batch", 1)):
                for _ in range(repeats):
                    start = time.perf_counter()
                    runners[name](x)
                    elapsed = time.perf_counter() - start
                    if timed:
                        times[name][key].append(elapsed)
        log(f"inference time: round {r + 1}/{spec.warmup + spec.steps} {'timed' if timed else 'warm-up'}")
    return times


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return num / den if num and den else None


def add_ratios(records: list[dict]) -> None:
    """Speed-ups (latency, throughput), memory and FLOP ratios of every variant against the unpatched model in
    PyTorch (`vs_timm`) and in onnxruntime (`vs_timm_onnx`), all from this run."""
    by = {r["variant"]: r for r in records}
    for r in records:
        for key, base in (("vs_timm", by.get("timm")), ("vs_timm_onnx", by.get("timm-onnx"))):
            r[key] = None if base is None else {
                "latency": _ratio(base["latency_b1_s"], r["latency_b1_s"]),
                "throughput": _ratio(r["throughput_img_s"], base["throughput_img_s"]),
                "memory": _ratio(base["peak_bytes"], r["peak_bytes"]),
                "flops": _ratio(base["fwd_gmacs_per_image"], r["fwd_gmacs_per_image"])}


def run_inference_bench(spec: BenchSpec, *, command: Optional[str] = None, isolate: bool = True,
                        log: Log = _quiet) -> dict:
    """Measure the four variants of `spec.model` (see the module docstring); returns {meta, records}."""
    spec.check()
    check(spec)
    threads = _threads(spec)
    apply_mmap_threshold(spec)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    models = {v: build_variant(spec, v) for v in ("timm", "bsr")}
    size = int(models["timm"].patch_embed.img_size[0])
    probe, _ = random_batch(2, size, spec.num_classes, spec.seed, torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="bsr-inference-") as tmp:
        onnx = {}
        for v in ("timm", "bsr"):
            t0 = time.perf_counter()
            onnx[v] = export_onnx(models[v], Path(tmp) / f"{v}.onnx")
            onnx[v]["check"] = verify_onnx(models[v], onnx[v]["path"], probe)
            log(f"exported {v} to ONNX ({onnx[v]['bytes'] / MIB:.0f} MiB, {time.perf_counter() - t0:.0f} s, max abs "
                f"diff {onnx[v]['check']['max_abs_diff']:.1e})")
        paths = {v: Path(onnx[v.removesuffix("-onnx")]["path"]) if v.endswith("-onnx") else None for v in VARIANTS}
        peaks = {}
        for v in VARIANTS:
            peaks[v] = (memory_record_isolated(spec, v, paths[v]) if isolate else
                        memory_record(spec, v, str(paths[v]) if paths[v] else None))
            log(f"inference memory: {v}: peak {peaks[v]['peak_bytes'] / MIB:,.0f} MiB")
        runners = {v: _runner(v, models.get(v), paths[v], threads) for v in VARIANTS}
        times = round_robin(spec, runners, size, log)
    load_after = os.getloadavg()
    gmacs = {v: flops.fwd_gmacs_per_image(models[v], size) for v in ("timm", "bsr")}
    tokens = {v: [list(t) for t in tokens_per_block(models[v], probe[:1])] for v in ("timm", "bsr")}
    records = []
    for v in VARIANTS:
        torch_v = v.removesuffix("-onnx")
        b1, big = statistics.median(times[v]["b1"]), statistics.median(times[v]["batch"])
        records.append({
            "variant": v, "runtime": "onnxruntime" if v.endswith("-onnx") else "pytorch", "model": spec.model,
            "img_size": size, "batch_size": spec.batch_size, "latency_b1_s": b1, "latency_b1_times_s": times[v]["b1"],
            "batch_s": big, "batch_times_s": times[v]["batch"], "throughput_img_s": spec.batch_size / big,
            "peak_bytes": peaks[v]["peak_bytes"], "fwd_gmacs_per_image": gmacs[torch_v], "tokens": tokens[torch_v],
            "onnx_bytes": onnx[torch_v]["bytes"] if v.endswith("-onnx") else None,
            "onnx_max_abs_diff": onnx[torch_v]["check"]["max_abs_diff"] if v.endswith("-onnx") else None})
    add_ratios(records)
    meta = {"spec": spec.to_dict(), "command": command, "started": started,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": threads,
            "onnx_threads": threads, "b1_repeats": B1_REPEATS, "load_average_before": list(load_before),
            "load_average_after": list(load_after), "bsr_config": bench_config(spec, "bsr").bsr.to_dict(),
            "peak_resettable": all(p["peak_resettable"] for p in peaks.values()),
            "versions": versions(), "machine": machine(torch.device("cpu"))}
    return {"meta": meta, "records": records}


# ------------------------------------------------------------------------------------------------- report


def _x(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render_markdown(result: dict) -> str:
    """`inference.md`: the table (ratios against the unpatched model in PyTorch and in onnxruntime), the setting."""
    meta, records = result["meta"], result["records"]
    spec, m, first = meta["spec"], meta["machine"], records[0]
    b = spec["batch_size"]
    header = ["variant", "runtime", "fwd GMACs/img", "FLOP limit", "batch 1 ms", "speed-up vs timm PyTorch",
              "vs timm ORT", f"batch {b} img/s", "speed-up vs timm PyTorch", "vs timm ORT", "peak MiB",
              "memory timm/x"]
    rows = []
    for r in records:
        pt, ort = r["vs_timm"] or {}, r["vs_timm_onnx"] or {}
        rows.append([f"**{r['variant']}**" if r["variant"].startswith("bsr") else r["variant"], r["runtime"],
                     f"{r['fwd_gmacs_per_image']:.2f}", _x(pt.get("flops")), f"{1000 * r['latency_b1_s']:.1f}",
                     _x(pt.get("latency")), _x(ort.get("latency")), f"{r['throughput_img_s']:.1f}",
                     _x(pt.get("throughput")), _x(ort.get("throughput")), f"{r['peak_bytes'] / MIB:,.0f}",
                     _x(pt.get("memory"))])
    table = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2),
             *("| " + " | ".join(row) + " |" for row in rows)]
    bsr_tokens = next(r["tokens"] for r in records if r["variant"] == "bsr")
    lines = [f"# bsr bench --inference: {spec['model']}, {first['img_size']} px", "",
             f"- command: `{meta['command'] or '(library call)'}`",
             f"- date: {meta['started']} to {meta['finished']} (UTC); load average (1 min) before "
             f"{meta['load_average_before'][0]:.2f}, after {meta['load_average_after'][0]:.2f}",
             f"- machine: {m['cpu']}, {m['cores']} cores; PyTorch threads {meta['threads']}, onnxruntime intra-op "
             f"threads {meta['onnx_threads']} (CPU provider)",
             f"- versions: bsr {meta['versions']['bsr']} (commit {meta['versions'].get('commit') or 'unknown'}), "
             f"torch {meta['versions']['torch']}, timm {meta['versions']['timm']}",
             f"- protocol: round-robin in one process, {spec['warmup']} warm-up + {spec['steps']} timed rounds; each "
             f"round {meta['b1_repeats']} forwards of 1 image and 1 forward of {b} images per variant; medians. Peak "
             f"memory in a fresh process per variant: building the model (or loading the ONNX file into an "
             f"onnxruntime session) and one batch of {b}, above the resident memory before",
             f"- BSR: `{json.dumps(meta['bsr_config'])}`; tokens per block (attention/MLP): "
             f"{format_tokens([tuple(t) for t in bsr_tokens])}",
             "- speed-up = unpatched/variant time, from this run; FLOP limit = unpatched/variant forward FLOPs", "",
             *table]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "inference.json", "md": out / "inference.md"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["md"].write_text(render_markdown(result))
    return paths


def main() -> int:
    """The fresh process of the memory measurement: a JSON request on stdin, one `BSR_BENCH_RECORD` line out."""
    request = json.loads(sys.stdin.read())
    try:
        record = memory_record(BenchSpec.from_dict(request["spec"]), request["variant"], request["onnx"])
    except BSRError as e:
        print(RECORD_PREFIX + json.dumps({"error": str(e)}), flush=True)
        return 2
    print(RECORD_PREFIX + json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
