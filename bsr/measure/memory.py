"""Memory measurements behind every `bsr` report: saved-for-backward bytes, peak and current memory, sizes.

Sarkar et al. (arXiv 2405.10951) report the training memory of Block Selective Reprogramming; here it is measured,
not derived: the bytes autograd really keeps for backward (`saved_tensor_bytes`) and the peak the allocator or the OS
really saw (`reset_peak` / `peak_bytes`). `bsr.measure.flops` counts FLOPs, `bsr.measure.analytic` holds the authors'
formula (for comparison only) and `bsr.measure.protocol` puts them together into one measured training step.

Everything here is device-agnostic: CPU peaks come from Linux `/proc/self/status`, CUDA peaks from the caching
allocator. All sizes are in bytes, all counts are exact integers.
"""

from __future__ import annotations

import resource
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

Device = Union[str, torch.device]

ROOT = "(root)"  # label of storages saved by the model's own forward, outside any submodule
OUTSIDE = "(outside)"  # label of storages saved outside the model (e.g. by the loss)


# --------------------------------------------------------------------------------------------------------------------
# Bytes saved for backward
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class SavedBytes:
    """Tensors autograd saved for backward during one forward, counted once per storage, parameters excluded.

    `by_module` maps the qualified name of the innermost module whose forward was running when a storage was first
    saved (`"blocks.3.attn"`, or `ROOT` / `OUTSIDE`) to bytes; `by_block` rolls those up to top-level children,
    with the blocks of a `ModuleList` kept apart (`"blocks.3"`, `"head"`). Both sum to `total`.
    """

    total: int = 0
    num_storages: int = 0
    by_module: dict[str, int] = field(default_factory=dict)
    by_block: dict[str, int] = field(default_factory=dict)


def _storage_key(t: Tensor) -> Optional[tuple[int, int]]:
    """`(data_ptr, nbytes)` of the untyped storage behind `t`, or None if it has no ordinary storage."""
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, some tensor subclasses
        return None
    return storage.data_ptr(), storage.nbytes()


def rollup_name(name: str) -> str:
    """Top-level owner of a module name: `"blocks.3.attn.qkv"` -> `"blocks.3"`, `"head"` -> `"head"`."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[1].isdigit():  # children of a ModuleList / Sequential stay apart
        return ".".join(parts[:2])
    return parts[0]


@contextmanager
def _module_stack(model: Optional[nn.Module]) -> Iterator[list[str]]:
    """Keep a stack of the qualified names of `model`'s modules whose forward is running; hooks removed on exit.

    Per-module hooks (not the global ones) so that other models running meanwhile are not affected; `always_call`
    pops the stack even when a forward raises.
    """
    stack: list[str] = []
    handles = []

    def push(name: str, module: nn.Module, args: Any) -> None:
        stack.append(name)

    def pop(module: nn.Module, args: Any, output: Any) -> None:
        if stack:
            stack.pop()

    try:
        if model is not None:
            for name, module in model.named_modules():
                handles.append(module.register_forward_pre_hook(partial(push, name or ROOT)))
                handles.append(module.register_forward_hook(pop, always_call=True))
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def saved_tensor_bytes(run: Callable[[], Any], exclude: Iterable[Tensor] = (), *,
                       model: Optional[nn.Module] = None) -> SavedBytes:
    """Run `run()` (a forward that builds the autograd graph) and count the bytes autograd saves for backward.

    Each storage counts once with its full size (views such as q, k, v of one qkv output, or an op saving a tensor
    that another op saved as well, share a storage). Storages shared with a tensor in `exclude` are skipped: pass the
    parameters and buffers, so that e.g. the `weight.t()` view a Linear saves does not count. If `model` is given,
    bytes are attributed to its modules (see `SavedBytes`) and `exclude` defaults to its parameters and buffers.
    The saved tensors are held until counting ends, so that a storage freed early cannot reappear under a reused
    address and be missed. Returns a `SavedBytes`; whatever `run()` returns is dropped.
    """
    exclude = list(exclude)
    if model is not None and not exclude:
        exclude = [*model.parameters(), *model.buffers()]
    excluded = {key[0] for t in exclude if (key := _storage_key(t)) is not None and key[1] > 0}
    seen: dict[tuple, Tensor] = {}  # storage key -> a tensor keeping that storage alive until we are done
    result = SavedBytes()

    with _module_stack(model) as stack:
        def pack(t: Tensor) -> Tensor:
            key = _storage_key(t)
            if key is None:  # no plain storage: count this tensor's own elements, once per tensor object
                key, nbytes = ("tensor", id(t)), t.numel() * t.element_size()
            else:
                nbytes = key[1]
            if not (t.device.type == "meta" or nbytes == 0 or key[0] in excluded or key in seen):
                seen[key] = t
                owner = stack[-1] if stack else OUTSIDE
                result.total += nbytes
                result.num_storages += 1
                result.by_module[owner] = result.by_module.get(owner, 0) + nbytes
            # Detached: a saved output returned as itself would hold its own grad_fn through the graph's packed
            # object, a cycle through C++ that no collector frees (the whole graph leaked). Nothing unpacks it.
            return t.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    for owner, nbytes in result.by_module.items():
        block = owner if owner in (ROOT, OUTSIDE) else rollup_name(owner)
        result.by_block[block] = result.by_block.get(block, 0) + nbytes
    seen.clear()
    return result


# --------------------------------------------------------------------------------------------------------------------
# Peak and current memory
# --------------------------------------------------------------------------------------------------------------------

_STATUS = "/proc/self/status"


def _proc_status_bytes(field_name: str) -> Optional[int]:
    """A `kB` line of `/proc/self/status` (`VmHWM`, `VmRSS`) in bytes, or None where there is no such file."""
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _is_cuda(device: Device) -> bool:
    return torch.device(device).type == "cuda"


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux `VmRSS`; elsewhere the peak, which is all `getrusage` knows)."""
    rss = _proc_status_bytes("VmRSS")
    return rss if rss is not None else _ru_maxrss_bytes()


def _ru_maxrss_bytes() -> int:
    # ru_maxrss is in KiB on Linux but in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak(device: Device) -> bool:
    """Start a new peak-memory window for `device`; returns False if the peak cannot be reset here.

    CPU: writing "5" to `/proc/self/clear_refs` resets `VmHWM` to the current RSS (Linux >= 4.0); `ru_maxrss` can
    never be reset, which is why a fresh process per method is the safe protocol. CUDA: the allocator's peak stats.
    """
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes(device: Device) -> int:
    """Peak memory since the last `reset_peak`: CPU peak RSS (`VmHWM`, whole process), CUDA peak allocated tensors."""
    if _is_cuda(device):
        return torch.cuda.max_memory_allocated(device)
    hwm = _proc_status_bytes("VmHWM")
    return hwm if hwm is not None else _ru_maxrss_bytes()


def current_bytes(device: Device) -> int:
    """Memory in use now: CPU resident set size (whole process), CUDA bytes allocated to tensors."""
    if _is_cuda(device):
        return torch.cuda.memory_allocated(device)
    return current_rss_bytes()


@dataclass
class PeakWindow:
    """What `track_peak` saw: memory in use at the start, the peak inside the window, and their difference."""

    start: int = 0
    peak: int = 0
    resettable: bool = True

    @property
    def increase(self) -> int:
        """Peak above the memory in use when the window opened (bytes)."""
        return max(0, self.peak - self.start)


@contextmanager
def track_peak(device: Device) -> Iterator[PeakWindow]:
    """`with track_peak(dev) as w: ...` fills `w.start`, `w.peak` (bytes) for the code inside the block.

    CUDA work is synchronised first so that queued kernels fall inside the window.
    """
    if _is_cuda(device):
        torch.cuda.synchronize(device)
    window = PeakWindow(resettable=reset_peak(device))
    window.start = current_bytes(device)
    try:
        yield window
    finally:
        if _is_cuda(device):
            torch.cuda.synchronize(device)
        window.peak = peak_bytes(device)


# --------------------------------------------------------------------------------------------------------------------
# Parameters, gradients, optimizer state
# --------------------------------------------------------------------------------------------------------------------

def _unique_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of `tensors`, each tensor object counted once (tied weights appear once in `parameters()` anyway)."""
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def param_bytes(model: nn.Module, trainable_only: bool = False) -> int:
    """Bytes of the model's parameters (all, or only those with `requires_grad`)."""
    return _unique_bytes(p for p in model.parameters() if p.requires_grad or not trainable_only)


def grad_bytes(model: nn.Module) -> int:
    """Bytes the gradients of the trainable parameters occupy: one tensor like each parameter with `requires_grad`.

    Counted from the parameters, not from `.grad`, so the figure does not depend on whether backward ran yet or
    gradients were set to None.
    """
    return param_bytes(model, trainable_only=True)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in `optimizer.state` (momentum, Adam moments, step counters).

    Most optimizers create their state lazily, so call this after the first `step()`.
    """
    tensors = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]
    return _unique_bytes(tensors)


def trainable_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts: elements, not bytes."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
