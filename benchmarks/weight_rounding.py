"""How far int8 and bf16 storage round the real frozen weights (issue 30): relative L2 error ||W - stored W|| / ||W||
of every block Linear of DINOv2 ViT-S/14 (`--checkpoint auto`: the converted dinov2-s), averaged per layer kind, for
bsr's int8 (one scale per output channel, `bsr.core.frozen.quantize_rows`), int8 with a scale per group of inputs
(what a finer file format would store), and bfloat16.

    python benchmarks/weight_rounding.py --out docs/bench/weight-rounding.json      # seconds
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from bsr.core.frozen import INT8_MAX, dequantize_rows, quantize_rows
from bsr.train import make_config, setup_model


def grouped_int8(weight: torch.Tensor, group: int) -> torch.Tensor:
    """weight rounded to symmetric int8 with one scale per `group` consecutive inputs of each row."""
    out, inp = weight.shape
    w = weight.reshape(out, inp // group, group)
    scale = w.abs().amax(-1, keepdim=True) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(w / scale).clamp(-INT8_MAX, INT8_MAX) * scale).reshape(out, inp)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--groups", default="32,128", help="group sizes of the grouped int8 variant")
    p.add_argument("--out", default="runs/weight-rounding.json")
    args = p.parse_args()
    cfg = make_config({"model": args.model, "checkpoint": "auto", "method": "full", "dataset": "digits-embedded"})
    model = setup_model(cfg, torch.device("cpu"), 10)
    groups = [int(g) for g in args.groups.split(",")]
    errors: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for blk in model.blocks:
        for name, module in blk.named_modules():
            if type(module) is not nn.Linear:
                continue
            w = module.weight.detach().float()
            stored = {"int8 per output channel": dequantize_rows(*quantize_rows(w)),
                      "bfloat16": w.bfloat16().float()}
            stored.update({f"int8 per {g} inputs": grouped_int8(w, g) for g in groups if w.shape[1] % g == 0})
            for variant, s in stored.items():
                errors[name][variant].append(((s - w).norm() / w.norm()).item())
    table = {name: {v: {"mean": sum(e) / len(e), "max": max(e)} for v, e in per.items()}
             for name, per in errors.items()}
    variants = list(next(iter(table.values())))
    print(f"relative L2 rounding error of {args.model}'s block Linears (mean over blocks, max in brackets)\n")
    print("| layer | " + " | ".join(variants) + " |")
    print("|---|" + "---:|" * len(variants))
    for name, per in table.items():
        print(f"| {name} | " + " | ".join(f"{per[v]['mean']:.2%} ({per[v]['max']:.2%})" for v in variants) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "errors": table}, indent=1))


if __name__ == "__main__":
    main()
