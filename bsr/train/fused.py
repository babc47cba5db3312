"""Per-parameter optimizers: the step fused into backward (`TrainConfig.fused_step`; in `bsr bench`, methods named
`METHOD+fused`) and the optimizer state in bf16 (`TrainConfig.optimizer_state`).

A usual training step holds every trainable parameter's gradient until `optimizer.step()`: for BSR on the ViT-B/16
MoE model 892 MiB. Here each trainable parameter gets an optimizer of its own (the same class, with the
hyper-parameters of its param group), stepped from `Tensor.register_post_accumulate_grad_hook` as soon as backward
has written that parameter's gradient, and the gradient is freed right after; no full set of gradients is ever
resident, only the ones autograd has just computed (PyTorch's recipe "How to save memory by fusing the optimizer step
into the backward pass"). It lowers the peak only where the peak falls late in backward: BSR's MoE ViT-B and DeiT-S
peak at the start of backward, before any gradient exists, and keep their peak; ViT-S at 112 px drops 5%
(BENCHMARKS.md, "Optimizer options").

It learns the same thing. SGD and AdamW update each parameter from its own gradient and state only, and backward
never reads a parameter again once its gradient is complete (autograd's version counter would refuse a modified
saved tensor), so the weights equal the unfused optimizer's: bitwise on the CPU (tests/test_fused.py).

What it cannot do is anything that needs all gradients before the first update: clipping by the global norm, fp16's
loss scaling (one inf check over every gradient), data parallel (DDP's all-reduce completes after the hook fires).
`TrainConfig` refuses the first two in one line, `FusedOptimizer` the third.

`FusedOptimizer` stands where a `torch.optim.Optimizer` does in the loop, bench and checkpoints: `param_groups` (one
per parameter; the loop writes the scheduled lr into each), `state`, `zero_grad`, `step` (nothing is left to do by
then), and `state_dict`/`load_state_dict` in the unfused optimizer's exact layout, so a checkpoint resumes with or
without the option. With `in_backward=False` the same per-parameter optimizers are stepped one after the other by
`step()` instead.

bf16 state (`SGDBf16State`, `AdamWBf16State`): SGD's momentum and Adam's first moment are kept in bf16 between steps
(half their bytes); each step runs torch's own update on an fp32 copy of one parameter's state, rounded back to
nearest after, so the fp32 transient is one parameter's. Adam's second moment stays fp32: with beta2 = 0.999 its
per-step change (0.1%) is below bf16's resolution (0.4%), so rounding to nearest would freeze it. The trajectory
differs from fp32 by the rounding only; tests/test_fused.py bounds it.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..errors import BSRError

MakeOptimizer = Callable[[list[dict]], torch.optim.Optimizer]


def _step_and_free(optimizer: torch.optim.Optimizer, param: Tensor) -> None:
    """The hook: update `param` from the gradient backward has just accumulated into it, then free that gradient."""
    optimizer.step()
    param.grad = None


def check_single_process() -> None:
    """Refuse the fused step under data parallel: the hook would step on this rank's gradient before DDP averaged it."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise BSRError(f"fused_step runs in one process only: with {dist.get_world_size()} processes DDP averages the "
                       f"gradients after the step would have used them; drop --fused-step or run without torchrun")


class FusedOptimizer:
    """One optimizer per trainable parameter, stepped inside backward (see the module's docstring).

    groups: param groups as `torch.optim` takes them (e.g. timm's weight-decay or layer-decay groups); make: builds
    the optimizer of one group (`make([{**group_options, "params": [p]}])`), e.g. `lambda g: torch.optim.SGD(g, lr=..,
    momentum=..)`. Hooks are registered on the parameters here and stay until `remove()`.
    """

    def __init__(self, groups: list[dict], make: MakeOptimizer, in_backward: bool = True):
        if in_backward:
            check_single_process()
        self.layout: list[list[torch.optim.Optimizer]] = []  # per param group: its parameters' optimizers, in order
        self._handles = []
        for group in groups:
            options = {k: v for k, v in group.items() if k != "params"}
            row = []
            for p in group["params"]:
                optimizer = make([{**options, "params": [p]}])
                if in_backward:
                    self._handles.append(p.register_post_accumulate_grad_hook(partial(_step_and_free, optimizer)))
                row.append(optimizer)
            self.layout.append(row)
        self.optimizers = [o for row in self.layout for o in row]
        self.in_backward = in_backward

    @property
    def param_groups(self) -> list[dict]:
        """Every parameter's own param group (the live dicts: a new lr written here is used by the next step)."""
        return [o.param_groups[0] for o in self.optimizers]

    @property
    def state(self) -> dict[Tensor, dict[str, Any]]:
        """Parameter -> its optimizer state (the live dicts), as `torch.optim.Optimizer.state`."""
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    def step(self, closure: Optional[Callable] = None) -> None:
        """In backward: nothing to do, every parameter with a gradient was stepped then. Otherwise each parameter's
        optimizer in turn (one skips a parameter without gradient, as torch's does)."""
        if closure is not None:
            raise BSRError("per-parameter optimizers take no closure that re-evaluates the loss")
        if not self.in_backward:
            for optimizer in self.optimizers:
                optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop any gradient left (the hooks free theirs; one can remain only if a backward was cut short)."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def remove(self) -> None:
        """Take the hooks off the parameters: backward no longer steps them."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict:
        """The state in `torch.optim.Optimizer.state_dict()`'s layout for the original param groups: states keyed by
        the parameter's index over all groups, each group's options with its parameters' indices."""
        state, groups, index = {}, [], 0
        for row in self.layout:
            indices = []
            for optimizer in row:
                own = optimizer.state_dict()
                if own["state"]:
                    state[index] = own["state"][0]
                indices.append(index)
                index += 1
            options = {k: v for k, v in row[0].state_dict()["param_groups"][0].items() if k != "params"} if row else {}
            groups.append({**options, "params": indices})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Inverse of `state_dict` (also takes an unfused optimizer's state dict over the same groups). Raises
        ValueError, as torch does, when the groups or their sizes differ."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.layout):
            raise ValueError(f"loaded state dict has {len(groups)} parameter groups, the optimizer {len(self.layout)}")
        for row, group in zip(self.layout, groups):
            if len(group["params"]) != len(row):
                raise ValueError(f"a loaded parameter group has {len(group['params'])} parameters, the optimizer's "
                                 f"{len(row)}")
            options = {k: v for k, v in group.items() if k != "params"}
            for optimizer, index in zip(row, group["params"]):
                own = state_dict["state"].get(index)
                optimizer.load_state_dict({"state": {0: own} if own is not None else {},
                                           "param_groups": [{**options, "params": [0]}]})


def largest_grad_bytes(optimizer: FusedOptimizer) -> int:
    """Bytes of the largest single gradient the fused step holds: what it keeps of the gradients at once (beside the
    few others computed by the same autograd node, e.g. a Linear's weight and bias)."""
    sizes = [p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"]]
    return max(sizes, default=0)


# ------------------------------------------------------------------------------------------------- bf16 state


class _Bf16State:
    """Mixin for a torch optimizer of one parameter: `KEYS` of its state kept in bf16 between steps (see the module's
    docstring); a state loaded from a checkpoint (torch casts it to the parameter's dtype) is rounded at the first
    step, which changes nothing (the values came from bf16)."""

    KEYS = ("momentum_buffer", "exp_avg")

    def step(self, closure: Optional[Callable] = None):
        for state in self.state.values():
            for key in self.KEYS:
                if key in state:
                    state[key] = state[key].float()
        loss = super().step(closure)
        for state in self.state.values():
            for key in self.KEYS:
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)
        return loss


class SGDBf16State(_Bf16State, torch.optim.SGD):
    """`torch.optim.SGD` whose momentum buffer is bf16 between steps."""


class AdamWBf16State(_Bf16State, torch.optim.AdamW):
    """`torch.optim.AdamW` whose first moment is bf16 between steps (the second stays fp32)."""
