"""Data-parallel training under `torchrun`: process group, DDP wrapping, sharding and the few collectives needed.

`bsr train` needs no flag to scale out: launched by `torchrun` (which sets RANK, WORLD_SIZE and LOCAL_RANK), every
process joins one process group (NCCL on `cuda:LOCAL_RANK`, gloo on CPU), wraps the model in
`DistributedDataParallel` and trains on its own contiguous slice of every global batch. Outside torchrun every helper
here is the identity, so the single-process path computes exactly what it did before.

Why DDP is wrapped after the method is applied: DDP registers for gradient all-reduce only the parameters whose
`requires_grad` is set when it is built, so frozen blocks cost no communication; what one step all-reduces is
`gradient_bytes(model)`. Every method of `bsr.train.methods` uses all its trainable parameters in every forward
(tested), hence `find_unused_parameters=False` and no extra graph traversal per step. A model whose forward may leave
trainable parameters without gradient (a mixture of experts whose experts receive no token in a batch) must pass
`find_unused=True` to `wrap`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import BSRError

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Group:
    """This process's place in the data-parallel group (rank 0 of 1 without a launcher) and its device."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group (single process)

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and shows progress."""
        return self.rank == 0

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """The sums of `values` over all ranks (float64); `values` unchanged in a single process."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)  # NCCL reduces only CUDA tensors
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def mean(self, values: Sequence[float]) -> list[float]:
        """Means of `values` over ranks: the global mean of per-rank means over equal shards."""
        if not self.enabled:
            return list(values)
        return [v / self.world_size for v in self.all_reduce_sum(values)]

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (float64, on this rank's device) replaced by its mean over ranks, in one all-reduce; `t` itself in a
        single process."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world_size
        return t

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (any picklable object), e.g. a run directory named after the clock."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shard(self, n: int) -> range:
        """This rank's contiguous slice of `n` items; sizes differ by at most one, every item goes to one rank."""
        return range(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)


def launched() -> bool:
    """True when a launcher (torchrun, or anything setting RANK/WORLD_SIZE/LOCAL_RANK) started this process."""
    present = [k for k in ENV_KEYS if k in os.environ]
    if present and len(present) < len(ENV_KEYS):
        missing = [k for k in ENV_KEYS if k not in os.environ]
        raise BSRError(f"{', '.join(present)} set but {', '.join(missing)} not; launch with torchrun or set all of "
                       f"{', '.join(ENV_KEYS)}")
    return bool(present)


def is_main() -> bool:
    """Rank 0 according to the environment (valid before the group exists and after it is gone)."""
    return int(os.environ.get("RANK", "0")) == 0


def _env_int(key: str) -> int:
    try:
        return int(os.environ[key])
    except ValueError:
        raise BSRError(f"{key}={os.environ[key]!r} must be an integer (set by torchrun)") from None


def _process_device(device: torch.device, local_rank: int) -> tuple[torch.device, str]:
    """(device, backend) of this process: `cuda:LOCAL_RANK` with NCCL, or the CPU with gloo."""
    if device.type == "cuda":
        if device.index is not None and device.index != local_rank:
            raise BSRError(f"device={device} under torchrun: each process uses cuda:LOCAL_RANK; pass --device cuda "
                           f"or auto (limit the GPUs with CUDA_VISIBLE_DEVICES)")
        if local_rank >= torch.cuda.device_count():
            raise BSRError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; use "
                           f"--nproc-per-node {torch.cuda.device_count()} or fewer")
        return torch.device("cuda", local_rank), "nccl"
    if device.type == "cpu":
        return device, "gloo"
    raise BSRError(f"device={device} has no distributed backend; torchrun training runs on CUDA (nccl) or CPU (gloo)")


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Group]:
    """The group of this process: joined from torchrun's environment, left on exit; a single-process `Group` else.

    `device` is the user's choice (`pick_device`); under torchrun a CUDA device becomes `cuda:LOCAL_RANK`. A group
    that already exists (initialised by the caller) is used and left alone.
    """
    if not launched():
        yield Group(device=device)
        return
    rank, world_size, local_rank = (_env_int(k) for k in ENV_KEYS)
    device, backend = _process_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and object collectives use the current device
    owned = not dist.is_initialized()
    if owned:
        # env:// reads MASTER_ADDR/MASTER_PORT (torchrun sets them, also for multi-node rendezvous)
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    elif dist.get_rank() != rank or dist.get_world_size() != world_size:
        raise BSRError(f"an existing process group (rank {dist.get_rank()} of {dist.get_world_size()}) disagrees "
                       f"with RANK={rank}, WORLD_SIZE={world_size}")
    group = Group(device=device, rank=rank, world_size=world_size, local_rank=local_rank,
                  backend=dist.get_backend())
    failed = False
    try:
        yield group
    except BaseException:
        failed = True  # the other ranks may never reach a barrier: leave without one
        raise
    finally:
        if owned:
            if not failed:
                dist.barrier()  # rank 0 may still be writing the last checkpoint and report
            dist.destroy_process_group()


def wrap(model: nn.Module, group: Group, find_unused: bool = False) -> nn.Module:
    """`model` in `DistributedDataParallel` in a group (only parameters with requires_grad are all-reduced), else
    `model` itself. Call after the method froze what it freezes; keep using `model` for evaluation and checkpoints
    (its parameter names carry no `module.` prefix)."""
    if not group.enabled:
        return model
    device_ids = [group.device.index] if group.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of the gradients DDP all-reduces each step: numel * element size over parameters with requires_grad
    (each storage once). DDP's buckets hold exactly these; on the wire a ring all-reduce moves about twice this per
    rank."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() * p.element_size() for p in params if p.requires_grad)
