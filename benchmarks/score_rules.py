"""Which patch tokens do the two token scores keep on a real ViT? (issue 29)

    python benchmarks/score_rules.py --out docs/bench/score-rules.json        # ~1 minute

Real DINOv2 ViT-S/14 weights (`--checkpoint auto`: the converted dinov2-s) at 84 px (the studies' size: 36 patches),
BSR's defaults, 64 shipped test digits, evaluation mode. For each rule (`cls`: the class token's attention; `mean`:
the attention each token receives): the tokens the first drop block (block 3) keeps, how many of them the two rules
share (mean Jaccard overlap), and the share of kept tokens that are "bright" (the image's patch, from its pixels, is
not background) versus the share among all patches; and how often each rule keeps the highest-norm token of the
block's input, the kind of token that draws every query's attention in DINOv2 without registers (Darcet et al.,
"Vision Transformers Need Registers", 2023).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import bsr
from bsr.data import build_dataset
from bsr.train import make_config, setup_model


def kept(rule: str, images: torch.Tensor, model_name: str, img_size: int):
    cfg = make_config({"model": model_name, "img_size": img_size, "checkpoint": "auto", "threads": 2,
                       "dataset": "digits-embedded", "bsr": {"token_score": rule}})
    model = setup_model(cfg, torch.device("cpu"), 10).eval()
    inputs = []
    model.blocks[3].register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad(), bsr.record_kept_tokens(model) as records:
        model(images)
    return records[3][0], inputs[0][:, model.num_prefix_tokens:]  # (B, k), block 3's patch tokens (B, n, C)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--img-size", type=int, default=84)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--out", default="runs/score-rules.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    data = build_dataset("digits-embedded", "test", img_size=args.img_size, train=False,
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    images = torch.stack([data[i][0] for i in range(args.images)])
    patch = 14
    grid = args.img_size // patch
    raw = images.mean(1).unfold(1, patch, patch).unfold(2, patch, patch)  # (B, g, g, 14, 14)
    bright = (raw.amax(dim=(-1, -2)) > raw.amin(dim=(1, 2, 3, 4), keepdim=False)[:, None, None] + 1.0).reshape(
        len(images), grid * grid)  # a patch with digit strokes (1 std above the darkest pixel)
    result = {}
    sets = {}
    for rule in ("cls", "mean"):
        keep, tokens = kept(rule, images, args.model, args.img_size)
        norms = tokens.norm(dim=-1)  # (B, n)
        top = norms.argmax(dim=1)
        sets[rule] = keep
        result[rule] = {
            "kept_per_image": int(keep.shape[1]),
            "bright_share_kept": float(torch.gather(bright, 1, keep).float().mean()),
            "keeps_highest_norm_token": float((keep == top[:, None]).any(dim=1).float().mean()),
        }
    overlap = [len(set(a.tolist()) & set(b.tolist())) / len(set(a.tolist()) | set(b.tolist()))
               for a, b in zip(sets["cls"], sets["mean"])]
    record = {"model": args.model, "img_size": args.img_size, "images": args.images,
              "bright_share_all": float(bright.float().mean()), "jaccard_cls_mean": sum(overlap) / len(overlap),
              "rules": result, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
