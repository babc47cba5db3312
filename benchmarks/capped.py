"""Proof on a capped device: training jobs inside a real memory cap (issue 12).

    python benchmarks/capped.py --cap 1.5GiB                     # ViT-B/16, batch 32, 3 steps (about 10 minutes)
    python benchmarks/capped.py --cap 1.5GiB --model deit_small_patch16_224 --out runs/capped-deits

Runs, each inside the same kernel-enforced memory cap: (1) full fine-tuning, `bsr train --method full`, which the
cap's OOM killer should stop, and (2) `bsr train --memory-budget CAP` with otherwise the same flags, which plans a
configuration for the cap, checks it with a real step and trains it to the end. The cap is, in order of preference:
`systemd-run --scope -p MemoryMax=CAP` (cgroup v2 through systemd), a cgroup v2 child of this process's cgroup with
`memory.max`, or a cgroup v1 memory child with `memory.limit_in_bytes` (and `memory.memsw.limit_in_bytes`: no swap).
Where none of them works it says why and exits with status 2. Weights are random (`--checkpoint none`): memory does
not depend on their values. Results: `--out`/capped.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from bsr.measure.overhead import overhead
from bsr.measure.plan import parse_size

MiB = 2 ** 20


class Cap:
    """A memory cap that commands can run in: `wrap(argv)` and `preexec` start a command inside it; `stats()` reads
    what the kernel recorded (peak, OOM kills) where it can; `close()` removes what was created."""

    how = ""

    def wrap(self, argv: list[str]) -> list[str]:
        return argv

    preexec: Optional[Callable[[], None]] = None

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class SystemdCap(Cap):
    def __init__(self, limit: int):
        self.limit = limit
        self.how = f"systemd-run --scope -p MemoryMax={limit} -p MemorySwapMax=0 (cgroup v2 through systemd)"

    def wrap(self, argv: list[str]) -> list[str]:
        return ["systemd-run", "--scope", "--quiet", "-p", f"MemoryMax={self.limit}", "-p", "MemorySwapMax=0", *argv]


class CgroupCap(Cap):
    """A child cgroup of this process's own (v2: memory.max; v1: the memory controller's memory.limit_in_bytes)."""

    def __init__(self, path: Path, limit: int, v2: bool):
        self.path, self.v2 = path, v2
        path.mkdir()
        try:
            if v2:
                (path / "memory.max").write_text(str(limit))
                if (path / "memory.swap.max").exists():
                    (path / "memory.swap.max").write_text("0")
            else:
                (path / "memory.limit_in_bytes").write_text(str(limit))
                if (path / "memory.memsw.limit_in_bytes").exists():
                    (path / "memory.memsw.limit_in_bytes").write_text(str(limit))
        except OSError:
            path.rmdir()
            raise
        self.how = f"cgroup {'v2 memory.max' if v2 else 'v1 memory.limit_in_bytes'} = {limit} at {path}"
        procs = path / "cgroup.procs"
        self.preexec = lambda: procs.write_text(str(os.getpid()))

    def stats(self) -> dict:
        def read(name: str) -> str:
            try:
                return (self.path / name).read_text()
            except OSError:
                return ""

        if self.v2:
            events = dict(line.split() for line in read("memory.events").splitlines() if line)
            peak = read("memory.peak").strip()
            return {"peak_bytes": int(peak) if peak else None, "oom_kills": int(events.get("oom_kill", 0))}
        oom = dict(line.split() for line in read("memory.oom_control").splitlines() if line)
        return {"peak_bytes": int(read("memory.max_usage_in_bytes") or 0), "oom_kills": int(oom.get("oom_kill", 0)),
                "limit_hits": int(read("memory.failcnt") or 0)}

    def reset(self) -> None:
        if not self.v2:
            for name in ("memory.max_usage_in_bytes", "memory.failcnt"):
                try:
                    (self.path / name).write_text("0")
                except OSError:
                    pass

    def close(self) -> None:
        for _ in range(50):  # the last process may take a moment to leave
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def own_cgroup(controller: str) -> Optional[str]:
    """This process's cgroup path for `controller` (v1), or its v2 path (controller "")."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (controller and controller in controllers.split(",")) or (not controller and controllers == ""):
            return path
    return None


def make_cap(limit: int) -> tuple[Optional[Cap], list[str]]:
    """The first cap that works here, and why each one before it did not."""
    why = []
    if shutil.which("systemd-run"):
        probe = subprocess.run(SystemdCap(limit).wrap(["true"]), capture_output=True, text=True)
        if probe.returncode == 0:
            return SystemdCap(limit), why
        why.append(f"systemd-run --scope failed: {(probe.stderr.strip().splitlines() or ['?'])[-1]}")
    else:
        why.append("no systemd-run")
    name = f"bsr-capped-{os.getpid()}"
    root = Path("/sys/fs/cgroup")
    v2_path = own_cgroup("")
    if (root / "cgroup.controllers").is_file() and v2_path is not None:
        try:
            return CgroupCap(root / v2_path.lstrip("/") / name, limit, v2=True), why
        except OSError as e:
            why.append(f"cgroup v2 child of {v2_path}: {e.strerror or e}")
    else:
        why.append("no cgroup v2 hierarchy with controllers at /sys/fs/cgroup")
    v1_path = own_cgroup("memory")
    if (root / "memory").is_dir() and v1_path is not None:
        try:
            return CgroupCap(root / "memory" / v1_path.lstrip("/") / name, limit, v2=False), why
        except OSError as e:
            why.append(f"cgroup v1 memory child of {v1_path}: {e.strerror or e}")
    else:
        why.append("no cgroup v1 memory controller")
    return None, why


def run_capped(cap: Cap, argv: list[str], log: Path) -> dict:
    """`argv` inside the cap, its output to `log`; exit status, time and what the cap recorded."""
    if isinstance(cap, CgroupCap):
        cap.reset()
    before = cap.stats()
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.run(cap.wrap(argv), stdout=out, stderr=subprocess.STDOUT, preexec_fn=cap.preexec)
    after = cap.stats()
    if "oom_kills" in after:  # a counter over the cgroup's life: this command's share
        after["oom_kills"] -= before.get("oom_kills", 0)
    return {"argv": argv, "returncode": proc.returncode, "seconds": round(time.time() - start, 1),
            "log": str(log), **after}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cap", default="1.5GiB", help="memory cap, e.g. 1.5GiB (also the --memory-budget)")
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/capped")
    args = p.parse_args()
    limit = parse_size(args.cap)
    cap, why = make_cap(limit)
    if cap is None:
        print(f"capped.py: cannot cap memory here: {'; '.join(why)}. Run it where systemd-run --scope works or "
              f"/sys/fs/cgroup is writable (e.g. as root in a VM).", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the machine's overhead is measured once and cached; measure it here, outside the cap, if it is not cached yet
    overhead(torch.device("cpu"), True, lambda message: print(f"capped.py: {message}", flush=True))
    common = ["--model", args.model, "--checkpoint", "none", "--dataset", "digits-embedded",
              "--limit", str(args.batch_size * args.steps), "--batch-size", str(args.batch_size), "--steps",
              str(args.steps), "--threads", str(args.threads), "--no-progress"]
    bsr = [sys.executable, "-m", "bsr", "train"]
    runs = {}
    try:
        print(f"cap: {cap.how}", flush=True)
        for name, extra in (("full", ["--method", "full"]), ("memory-budget", ["--memory-budget", args.cap])):
            run_dir = out / name
            if run_dir.exists():
                shutil.rmtree(run_dir)
            runs[name] = run_capped(cap, bsr + common + extra + ["--out", str(run_dir)], out / f"{name}.log")
            report = run_dir / "report.json"
            if report.is_file():
                runs[name]["report_peak_mib"] = json.loads(report.read_text())["peak_memory_mib"]
            if (run_dir / "plan.json").is_file():
                plan = json.loads((run_dir / "plan.json").read_text())
                chosen = plan.get("chosen")
                runs[name]["plan"] = {"chosen": chosen, "options": [
                    {k: o.get(k) for k in ("label", "changes", "predicted_bytes", "measured_bytes")}
                    for o in plan["options"]]}
            print(f"{name}: exit {runs[name]['returncode']} after {runs[name]['seconds']} s; {runs[name]}",
                  flush=True)
    finally:
        cap.close()
    record = {"cap": args.cap, "cap_bytes": limit, "how": cap.how, "not_used": why, "runs": runs,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (out / "capped.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n| run | exit | seconds | cap peak MiB | OOM kills | bsr's own peak MiB |\n|---|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        peak = f"{r['peak_bytes'] / MiB:,.0f}" if r.get("peak_bytes") else "-"
        own = f"{r['report_peak_mib']:,.0f}" if r.get("report_peak_mib") else "-"
        print(f"| {name} | {r['returncode']} | {r['seconds']} | {peak} | {r.get('oom_kills', '-')} | {own} |")
    ok = runs["full"]["returncode"] != 0 and runs["memory-budget"]["returncode"] == 0
    print(f"\nfull fine-tuning {'was stopped by' if runs['full']['returncode'] != 0 else 'fit in'} the cap; "
          f"--memory-budget {'trained to the end' if runs['memory-budget']['returncode'] == 0 else 'failed'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
