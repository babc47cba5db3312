"""On-device training against `bsr train`, same data, recipe and steps: test top-1 of both on the shipped digits.

Writes the shipped digits as an image folder (`benchmarks/digits_folder.py`), then, with the same options:
1. `bsr train --dataset folder:DIGITS ...` (PyTorch);
2. `bsr export --format ort-training ARTIFACTS --dataset folder:DIGITS ...` (the pretrained backbone with BSR) and
   `bsr-device train ARTIFACTS --dataset folder:DIGITS` (ONNX Runtime, a process without PyTorch);
3. `bsr device-import` of the device run and `bsr eval` of it (PyTorch evaluating what the device learned).
Records both accuracies, the device run's peak RSS and step time in OUT/device-accuracy.json.

    python benchmarks/device_accuracy.py --out runs/device-accuracy [-- extra bsr train options]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_folder import write_digits_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(argv: list[str], log: Path) -> str:
    """Run a command, its output into `log`; its stdout, or exit with its tail."""
    start = time.time()
    result = subprocess.run(argv, capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({result.returncode}):\n{(result.stdout + result.stderr)[-2000:]}")
    print(f"  {Path(argv[0]).name} {argv[1]}: {time.time() - start:.0f} s", flush=True)
    return result.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/device-accuracy"))
    p.add_argument("options", nargs="*", help="bsr train options for both runs (after --)")
    args = p.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    digits = out / "digits"
    if not digits.exists():
        write_digits_folder(digits, ROOT / "bsr" / "assets" / "digits_embedded.npz")
    dataset = ["--dataset", f"folder:{digits}", *args.options]
    run([str(BIN / "bsr"), "train", *dataset, "--out", str(out / "pytorch"), "--no-progress"], out / "pytorch.log")
    run([str(BIN / "bsr"), "export", "--format", "ort-training", str(out / "artifacts"), *dataset],
        out / "export.log")
    run([str(BIN / "bsr-device"), "train", str(out / "artifacts"), "--dataset", f"folder:{digits}", "--out",
         str(out / "device")], out / "device.log")
    run([str(BIN / "bsr"), "device-import", str(out / "device"), str(out / "home")], out / "import.log")
    shown = run([str(BIN / "bsr"), "eval", str(out / "home")], out / "eval.log")
    torch_report = json.loads((out / "pytorch" / "report.json").read_text())
    device_report = json.loads((out / "device" / "report.json").read_text())
    home_top1 = float(re.search(r"top-1 ([0-9.]+)%", shown)[1])
    record = {"options": args.options, "steps": device_report["steps"],
              "pytorch_final_top1": torch_report["accuracy"]["final"],
              "pytorch_best_top1": torch_report["accuracy"]["best"],
              "pytorch_step_s_median": torch_report["median_step_time_s"],
              "pytorch_peak_memory_mib": torch_report["peak_memory_mib"],
              "device_final_top1": device_report["final_top1"], "device_best_top1": device_report["best_top1"],
              "device_step_ms_median": device_report["step_ms_median"],
              "device_peak_rss_mib": device_report["peak_rss_mib"], "home_eval_top1": home_top1}
    (out / "device-accuracy.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
