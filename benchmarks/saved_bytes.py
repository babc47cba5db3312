"""Bytes saved for backward by one training step: full fine-tuning against BSR, per block.

    python benchmarks/saved_bytes.py                       # ViT-B/16, 224 px, batch 32 (about 2 minutes on 2 cores)
    python benchmarks/saved_bytes.py --model deit_small_patch16_224 --out runs/saved_bytes_deit.json

Counts every storage autograd saves during the forward of one training step (loss included), once per storage,
parameters excluded (`bsr.measure.memory.saved_tensor_bytes`). Weights are random: saved bytes do not depend on their
values.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import timm
import torch

import bsr
from bsr.measure.bench import workload
from bsr.measure.bench_spec import BenchSpec
from bsr.measure.memory import saved_tensor_bytes

MiB = 2 ** 20


def measure(model_name: str, method: str, batch_size: int, img_size: int, num_classes: int,
            config: bsr.BSRConfig) -> dict:
    """One record: saved bytes of one training forward of `method` ("full" or "bsr"), total and per block.

    Model and batch are built exactly as `bsr bench` builds them (seeded random weights and images).
    """
    spec = BenchSpec(model=model_name, img_size=img_size, batch_size=batch_size, num_classes=num_classes,
                     methods=[method], bsr=config.to_dict())
    work = workload(spec, method, torch.device("cpu"))
    saved = saved_tensor_bytes(work.loss, model=work.model)
    return {"method": method, "model": model_name, "batch_size": batch_size, "img_size": img_size,
            "saved_activation_bytes": saved.total, "by_block": saved.by_block,
            "tokens": bsr.summary(work.model).tokens, "config": config.to_dict() if method == "bsr" else None}


def table(records: list[dict]) -> str:
    """Markdown: per-block MiB of every method, then totals and the ratio against `full`."""
    def order(name: str) -> tuple:
        is_block = name.startswith("blocks.")
        return (not is_block, int(name.split(".")[1]) if is_block else 0, name)

    names = sorted({k for r in records for k in r["by_block"]}, key=order)
    lines = ["| part | " + " | ".join(r["method"] for r in records) + " |",
             "|---|" + "---:|" * len(records)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{r['by_block'].get(name, 0) / MiB:,.1f}" for r in records) + " |")
    lines.append("| **total (MiB)** | " + " | ".join(f"**{r['saved_activation_bytes'] / MiB:,.1f}**"
                                                     for r in records) + " |")
    full = records[0]["saved_activation_bytes"]
    ratios = " | ".join(f"{full / r['saved_activation_bytes']:.2f}x" for r in records)
    lines.append(f"| full / method | {ratios} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--out", default="runs/saved_bytes.json", help="where to write the records (JSON)")
    args = parser.parse_args()

    config = bsr.BSRConfig()
    records = [measure(args.model, m, args.batch_size, args.img_size, args.num_classes, config)
               for m in ("full", "bsr")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "timm": timm.__version__, "machine": platform.processor() or platform.machine()}
    out.write_text(json.dumps({"meta": meta, "records": records}, indent=2))
    print(f"{args.model}, {args.img_size} px, batch {args.batch_size}: bytes saved for backward by one training step")
    print(table(records))
    print(f"records: {out}")


if __name__ == "__main__":
    main()
