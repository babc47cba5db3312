"""Peak memory of one plain training step of a timm model, alone in this process: nothing else measured.

    python benchmarks/train_step_peak.py --model vit_base_patch16_224 --batch-size 128

`bsr bench`'s memory worker also counts the saved-for-backward bytes (a forward of its own) and the FLOPs (a step
under `FlopCounterMode`); where it is killed for memory, this says whether the training step itself fits. Full
fine-tuning, SGD with momentum, random inputs, CPU: the peak resident memory (`VmHWM`) above the process's own
before the model is built, glibc's mmap threshold at 1 MiB as `bsr bench` sets it. No warm-up step: the momentum
buffers are allocated inside the measured step.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from bsr.allocator import release_freed_memory
from bsr.measure.memory import peak_bytes
from bsr.measure.protocol import random_batch

CPU = torch.device("cpu")


def max_rss_mib() -> float:
    return peak_bytes(CPU) / 2**20  # the process's peak RSS (VmHWM, never reset here)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args()
    release_freed_memory(1 << 20)
    torch.manual_seed(0)
    start = max_rss_mib()
    model = timm.create_model(args.model, num_classes=args.num_classes, img_size=args.img_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images, labels = random_batch(args.batch_size, args.img_size, args.num_classes, seed=0, device=CPU)
    built = max_rss_mib()
    began = time.perf_counter()
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    peak = max_rss_mib()
    print(f"{args.model} batch {args.batch_size}: full fine-tuning step peak {peak - start:,.0f} MiB above the "
          f"process before the model was built (model and batch {built - start:,.0f} MiB), "
          f"{time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
