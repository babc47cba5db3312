"""Proof on a capped device: training jobs inside a real memory cap (issue 12).

    python benchmarks/capped.py --cap 1.5GiB                     # ViT-B/16, batch 32, 3 steps (about 10 minutes)
    python benchmarks/capped.py --cap 1.5GiB --model deit_small_patch16_224 --out runs/capped-deits
    python benchmarks/capped.py --budget-only --model vit_base_patch16_224,deit_small_patch16_224 \
        --cap 768MiB,1GiB,1.5GiB,2GiB --out runs/budget-promise     # is every budget kept? (issue 31)

Runs, each inside the same kernel-enforced memory cap: (1) full fine-tuning, `bsr train --method full`, which the
cap's OOM killer should stop, and (2) `bsr train --memory-budget CAP` with otherwise the same flags, which plans a
configuration for the cap, checks it with a real step and trains it to the end. Several caps and models: each
(model, cap) pair in a cap of its own; the table sets every budgeted run's whole-process peak against its budget.
The cap is, in order of preference:
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


def _budget_run(cap: Cap, command: list[str], run_dir: Path, log: Path) -> dict:
    """One `bsr train` inside the cap, with what its report and plan file say."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    result = run_capped(cap, command + ["--out", str(run_dir)], log)
    report = run_dir / "report.json"
    if report.is_file():
        result["report_peak_mib"] = json.loads(report.read_text())["peak_memory_mib"]
    if (run_dir / "plan.json").is_file():
        plan = json.loads((run_dir / "plan.json").read_text())
        result["plan"] = {"chosen": plan.get("chosen"), "trained_peak_bytes": plan.get("trained_peak_bytes"),
                          "budget_kept": plan.get("budget_kept"), "options": [
                              {k: o.get(k) for k in ("label", "changes", "predicted_bytes", "measured_bytes")}
                              for o in plan["options"]]}
    return result


def _promise_row(model: str, budget: str, r: dict) -> str:
    """A row of the budget table: what was chosen, predicted, checked, and the trained run's peaks."""
    plan = r.get("plan") or {}
    chosen = plan.get("chosen")
    option = plan["options"][chosen] if chosen is not None else {}
    mib = lambda b: f"{b / MiB:,.0f}" if b else "-"  # noqa: E731
    own = r.get("report_peak_mib")
    limit = parse_size(budget)
    kept = "yes" if r["returncode"] == 0 and own is not None and own * MiB <= limit else "no"
    return (f"| {model} | {budget} ({limit / MiB:,.0f} MiB) | {option.get('label', '-')} | "
            f"{mib(option.get('predicted_bytes'))} | {mib(option.get('measured_bytes'))} | "
            f"{f'{own:,.0f}' if own else '-'} | {mib(r.get('peak_bytes'))} | {r['returncode']} | {kept} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cap", default="1.5GiB", help="memory cap(s), comma-separated, e.g. 1.5GiB or 1GiB,2GiB (each "
                                                   "also the --memory-budget)")
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model(s), comma-separated")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget-only", action="store_true", help="skip the full fine-tuning run of each cap")
    p.add_argument("--train-flags", default="",
                   help="more `bsr train` flags for the memory-budget run (the full run is the unchanged reference), "
                        "e.g. '--frozen-dtype int8'")
    p.add_argument("--out", default="runs/capped")
    args = p.parse_args()
    caps, models = args.cap.split(","), args.model.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the machine's overhead is measured once and cached; measure it here, outside the cap, if it is not cached yet
    overhead(torch.device("cpu"), True, lambda message: print(f"capped.py: {message}", flush=True))
    bsr = [sys.executable, "-m", "bsr", "train"]
    runs, hows, why = {}, set(), []
    for model in models:
        common = ["--model", model, "--checkpoint", "none", "--dataset", "digits-embedded",
                  "--limit", str(args.batch_size * args.steps), "--batch-size", str(args.batch_size), "--steps",
                  str(args.steps), "--threads", str(args.threads), "--no-progress"]
        for budget in caps:
            cap, why = make_cap(parse_size(budget))
            if cap is None:
                print(f"capped.py: cannot cap memory here: {'; '.join(why)}. Run it where systemd-run --scope works "
                      f"or /sys/fs/cgroup is writable (e.g. as root in a VM).", file=sys.stderr)
                return 2
            hows.add(cap.how.split(" = ")[0])
            try:
                print(f"{model} in {budget}: {cap.how}", flush=True)
                jobs = ([] if args.budget_only else [("full", ["--method", "full"])]) + \
                    [("memory-budget", ["--memory-budget", budget, *args.train_flags.split()])]
                for name, extra in jobs:
                    key = f"{model}/{budget}/{name}"
                    stem = key.replace("/", "-")
                    runs[key] = _budget_run(cap, bsr + common + extra, out / stem, out / f"{stem}.log")
                    print(f"{key}: exit {runs[key]['returncode']} after {runs[key]['seconds']} s; {runs[key]}",
                          flush=True)
            finally:
                cap.close()
    record = {"caps": caps, "models": models, "batch_size": args.batch_size, "steps": args.steps,
              "train_flags": args.train_flags, "how": sorted(hows),
              "not_used": why, "runs": runs, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (out / "capped.json").write_text(json.dumps(record, indent=1) + "\n")
    print("\n| model | budget = cap | option trained | predicted MiB | checked MiB | trained process peak MiB | "
          "cap peak MiB | exit | peak within budget |\n|---|---|---|---:|---:|---:|---:|---:|---|")
    for key, r in runs.items():
        model, budget, name = key.split("/")
        if name == "memory-budget":
            print(_promise_row(model, budget, r))
    fulls = {k: r for k, r in runs.items() if k.endswith("/full")}
    if fulls:
        print("\n" + "\n".join(f"{k}: exit {r['returncode']}, cap peak "
                                f"{(r.get('peak_bytes') or 0) / MiB:,.0f} MiB, OOM kills {r.get('oom_kills', '-')}"
                                for k, r in fulls.items()))
    kept = all(r["returncode"] == 0 and (r.get("plan") or {}).get("budget_kept") for k, r in runs.items()
               if k.endswith("/memory-budget"))
    print(f"\nevery --memory-budget run {'trained within its budget' if kept else 'did NOT keep its budget'}")
    return 0 if kept else 1


if __name__ == "__main__":
    sys.exit(main())
