"""The learning-rate schedule: a pure function of the step, the one `bsr train` and the device trainer both use."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0,
          schedule: str = "cosine") -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine from `lr` to `min_lr`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
