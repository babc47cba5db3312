"""Training loss and top-1 kept on the device between log steps, so the hot loop never waits for the device.

A `.item()` per step (or an all-reduce of logged values per step under data parallel) makes the host wait for the
device to finish every step before queueing the next one. `StepMeter.add` only writes into a device tensor;
`collect` moves the steps since the last sync to the host in one transfer (one all-reduce over data-parallel ranks:
per-step means of per-rank means over equal slices, the global batch's values) and names the first non-finite loss;
`pop` hands out the window's means for one metrics line. Steps collected but not yet logged (a checkpoint between
two log steps) travel in the checkpoint (`state`/`load`), so a resumed run logs the same numbers.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

import torch

from .distributed import Group


class StepMeter:
    """Per task and step since the last metrics line: loss and top-1 (%), on the device until `collect`."""

    def __init__(self, names: list[str], capacity: int, device: torch.device, window: Optional[list] = None) -> None:
        self.names = names
        self.values = torch.zeros(capacity, len(names), 2, device=device)  # (step, task, [loss, top-1 fraction])
        self.steps: list[int] = []  # 0-based steps held in `values` (not yet collected)
        self.window: list[list] = list(window or [])  # collected, not yet logged: [step, [[loss, top-1 %] per task]]

    def add(self, step: int, task: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Record task `task`'s loss () and top-1 of logits (B, C) against labels (B,) at `step`; no sync."""
        if not self.steps or self.steps[-1] != step:
            self.steps.append(step)
        row = self.values[len(self.steps) - 1, task]
        row[0] = loss.detach()
        row[1] = (logits.detach().argmax(-1) == labels).float().mean()

    def collect(self, group: Group) -> Optional[tuple[float, int, str]]:
        """Move the recorded steps to the host (one sync, one all-reduce); returns (loss, step, task name) of the
        first non-finite loss, else None."""
        if not self.steps:
            return None
        values = self.values[:len(self.steps)].double()
        values[..., 1] *= 100  # top-1 in %, in float64 as `.item() * 100` gives it
        rows = group.mean_(values).tolist()
        steps, self.steps = self.steps, []
        for step, row in zip(steps, rows):
            for name, (loss, _) in zip(self.names, row):
                if not math.isfinite(loss):
                    return loss, step, name
            self.window.append([step, row])
        return None

    def pop(self) -> tuple[float, float, dict[str, tuple[float, float]]]:
        """(loss, top-1) means over the collected steps and tasks, and per task; empties the window."""
        per_task = {name: (statistics.fmean(row[t][0] for _, row in self.window),
                           statistics.fmean(row[t][1] for _, row in self.window))
                    for t, name in enumerate(self.names)}
        self.window = []
        loss, acc = (statistics.fmean(v) for v in zip(*per_task.values()))
        return loss, acc, per_task

    def state(self) -> list[list]:
        """The collected steps not yet logged, for the checkpoint (JSON-able)."""
        return self.window
