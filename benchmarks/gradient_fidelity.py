"""How far the memory options move BSR's gradient from the paper's (issue 30): relative L2 distance of every trained
tensor's gradient, per trained block, against float32 frozen weights with the gradient through the token scores.

    python benchmarks/gradient_fidelity.py --out docs/bench/gradient-fidelity.json      # ~2 minutes

One training-mode forward and backward of real DINOv2 ViT-S/14 weights (`--checkpoint auto`: the converted dinov2-s)
at 112 px on a batch of 32 shipped digits, the head seeded alike, BSR's defaults (train 3, 7, 11; drop 3, 6, 9; keep
0.5; fused token), for: `score_grad` off (what the lean preset does), frozen weights in bfloat16, in int8 (per output
channel), the lean preset (bfloat16 + recomputation + no score gradient) and lean with int8 frozen weights.
Recomputation alone is exact (tests/test_patch.py), so it is not listed. Dropout and drop path are off in these
models, so the only difference between two runs is the option.

Then what `score_grad=False` saves: the traced training step's tensor peak (`bsr.measure.trace`, exact bytes, nothing
allocated) with and without the score gradient, for the paper's configuration and the lean preset, on ViT-B/16 at
224 px and DINOv2 ViT-S/14 at 112 px, batch 32, SGD + momentum.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from bsr.data import build_dataset
from bsr.measure.trace import trace_config
from bsr.train import make_config, setup_model

VARIANTS = {
    "score_grad off": {"score_grad": False},
    "bf16 frozen": {"frozen_dtype": "bfloat16"},
    "int8 frozen": {"frozen_dtype": "int8"},
    "lean (bf16, recompute, score_grad off)": {"preset": "lean"},
    "lean with int8 frozen": {"preset": "lean", "frozen_dtype": "int8"},
}


def gradients(bsr: dict, images: torch.Tensor, labels: torch.Tensor, model_name: str, img_size: int):
    cfg = make_config({"model": model_name, "img_size": img_size, "checkpoint": "auto", "threads": 2, "bsr": bsr,
                       "dataset": "digits-embedded"})
    model = setup_model(cfg, torch.device("cpu"), 10).train()
    nn.CrossEntropyLoss()(model(images).float(), labels).backward()
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default="runs/gradient-fidelity.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    data = build_dataset("digits-embedded", "train", img_size=args.img_size, train=False,
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    images = torch.stack([data[i][0] for i in range(args.batch_size)])
    labels = torch.tensor([data[i][1] for i in range(args.batch_size)])
    reference = gradients({}, images, labels, args.model, args.img_size)
    rows = {}
    for name, bsr in VARIANTS.items():
        grads = gradients(bsr, images, labels, args.model, args.img_size)
        assert grads.keys() == reference.keys()
        by_part: dict[str, list[float]] = {}
        for key, ref in reference.items():
            part = ".".join(key.split(".")[:2]) if key.startswith("blocks.") else key.split(".")[0]
            by_part.setdefault(part, [0.0, 0.0])
            by_part[part][0] += float((grads[key] - ref).square().sum())
            by_part[part][1] += float(ref.square().sum())
        rows[name] = {part: (d / r) ** 0.5 if r else 0.0 for part, (d, r) in by_part.items()}
        print(name, {k: f"{v:.2%}" for k, v in rows[name].items()}, flush=True)
    memory = score_grad_memory()
    record = {"model": args.model, "img_size": args.img_size, "batch_size": args.batch_size, "relative_l2": rows,
              "score_grad_step_peak_mib": memory, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    parts = list(next(iter(rows.values())))
    print("\n| option | " + " | ".join(parts) + " |\n|---|" + "---:|" * len(parts))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[p]:.2%}" for p in parts) + " |")

    print("\n| model | preset | step peak MiB, score gradient on | off | saved by off |\n|---|---|---:|---:|---:|")
    for key, (on, off) in memory.items():
        model, preset = key.split("/")
        print(f"| {model} | {preset} | {on:,.1f} | {off:,.1f} | {on - off:,.1f} ({(on - off) / on:.1%}) |")


def score_grad_memory() -> dict:
    """{"model/preset": (traced step peak MiB with the score gradient, without)} at batch 32."""
    out = {}
    for model, img in (("vit_base_patch16_224", 224), ("vit_small_patch14_dinov2", 112)):
        for preset in ("paper", "lean"):
            peaks = []
            for score_grad in (True, False):
                cfg = make_config({"model": model, "img_size": img, "checkpoint": "none", "batch_size": 32,
                                   "threads": 1, "bsr": {"preset": preset, "score_grad": score_grad}})
                peaks.append(trace_config(cfg, 10, flops=False).step_peak_bytes / 2 ** 20)
            out[f"{model}/{preset}"] = tuple(peaks)
    return out


if __name__ == "__main__":
    main()
