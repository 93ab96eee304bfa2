"""Process groups for tensor parallelism, and the one object that carries them: `ParallelContext`.

Every tensor-parallel layer and the engine get the context passed in explicitly; nothing here is a
mutable module global. Two groups over the same ranks:

- `group`: tensor collectives inside the model forward (all-reduce after a row-parallel layer,
  all-gather of vocabulary-parallel logits). NCCL on CUDA, gloo on CPU. On CUDA the all-reduces of
  up to `SymmetricAllReduce.MAX_BYTES` go through PyTorch's symmetric memory instead (a two-shot
  all-reduce over NVLink peer loads; on 2 H200s, copy into its buffer included, 1.8x faster than NCCL
  at decode sizes and 1.2-1.5x at 1024-2048 rows of 8192: benchmarks/e2e/allreduce_latency.py);
  `COMETSERVE_ALL_REDUCE=nccl` keeps every one on NCCL.
- `cpu_group`: gloo, for the control messages of the engine (rank 0 broadcasts each step's
  SchedulerOutput). Its timeout is long: a server's workers wait in it for as long as no request
  comes, and the control message never touches a GPU stream.

Rendezvous: `env://` under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or an
explicit `tcp://host:port` when `launch.py` spawns the ranks itself.
"""

from __future__ import annotations

import datetime
import gc
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from cometserve.config import torchrun_env

DATA_TIMEOUT = datetime.timedelta(minutes=10)  # a collective that waits longer than this is a hang
CONTROL_TIMEOUT = datetime.timedelta(days=30)  # workers of an idle server wait here
# the one-tensor all-gather: all_gather_single from torch 2.13 (all_gather_into_tensor is deprecated there)
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class SymmetricAllReduce:
    """In-place sums through a symmetric-memory buffer that every rank maps (torch.distributed.
    _symmetric_memory): the input is copied in, two-shot reduced (each rank sums its slice from every
    peer, then gathers the others' sums) into the input. Made by every rank together (a rendezvous)."""

    # bf16 [2048, 8192]. Measured on 2 H200s (allreduce_latency.py, copy in included) against NCCL:
    # 140.7 vs 174.4 us at 2048 rows of 8192, 288.3 vs 285.8 at 4096, 538.9 vs 498.1 at 8192.
    MAX_BYTES = 32 << 20

    def __init__(self, group, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.buf = symm_mem.empty(self.MAX_BYTES, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buf, self.group_name)
        self._out = getattr(torch.ops.symm_mem, "two_shot_all_reduce_out", None)

    def __call__(self, x: torch.Tensor) -> bool:
        """Sum `x` over the ranks in place; False (nothing done) where it does not apply."""
        nbytes = x.numel() * x.element_size()
        if x.dtype not in (torch.bfloat16, torch.float32) or nbytes > self.MAX_BYTES or nbytes % 16 or not x.is_contiguous():
            return False
        buf = self.buf[:nbytes].view(x.dtype)
        buf.copy_(x.view(-1))
        if self._out is not None:
            self._out(buf, "sum", self.group_name, x.view(-1))
        else:
            torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", self.group_name)
            x.view(-1).copy_(buf)
        return True


def _symmetric_all_reduce(group, cpu_group, device: torch.device, world_size: int) -> SymmetricAllReduce | None:
    """Every rank's SymmetricAllReduce, or None on every rank where any rank cannot make one."""
    if device.type != "cuda" or world_size == 1 or os.environ.get("COMETSERVE_ALL_REDUCE", "symm") == "nccl":
        return None
    try:
        import torch.distributed._symmetric_memory

        ok = hasattr(torch.ops.symm_mem, "two_shot_all_reduce_")
    except Exception:  # noqa: BLE001 - agreed on below: NCCL everywhere
        ok = False
    t = torch.tensor([int(ok)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=cpu_group)
    if not t.item():
        return None
    try:
        return SymmetricAllReduce(group, device)
    except Exception as e:  # noqa: BLE001 - a rendezvous that fails fails on every rank
        warnings.warn(f"symmetric-memory all-reduce unavailable, NCCL for all: {type(e).__name__}: {e}", stacklevel=2)
        return None


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in a tensor-parallel group of `world_size` ranks."""

    rank: int
    world_size: int
    device: torch.device
    group: Any = None  # torch ProcessGroup for tensor collectives
    cpu_group: Any = None  # gloo ProcessGroup for control messages
    fast_all_reduce: SymmetricAllReduce | None = None  # CUDA: small sums without NCCL

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")

    @property
    def is_driver(self) -> bool:
        """Rank 0 schedules, samples and talks to the outside world."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; returns `x`."""
        if self.fast_all_reduce is None or not self.fast_all_reduce(x):
            dist.all_reduce(x, group=self.group)
        return x

    def broadcast_tensor(self, x: torch.Tensor, src: int = 0) -> None:
        """Overwrite `x` in place with rank `src`'s (through the tensor group: no host sync)."""
        dist.broadcast(x, src=src, group=self.group)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `x` (same shape on all ranks) concatenated along `dim` in rank order."""
        x = x.contiguous()
        flat = torch.empty((self.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_flat(flat, x, group=self.group)
        return torch.cat(flat.chunk(self.world_size, dim=0), dim=dim)

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """`obj` of rank `src` on every rank (pickled: control messages only, never weights)."""
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.cpu_group)
        return box[0]

    def barrier(self) -> None:
        dist.barrier(group=self.cpu_group)

    def min_int(self, value: int) -> int:
        """The smallest of every rank's `value` (through the CPU group)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())


def init_parallel(world_size: int | None = None, rank: int | None = None, init_method: str = "env://",
                  local_rank: int | None = None, device: str | None = None) -> ParallelContext:
    """Join (creating it if needed) the process group and return this rank's context.

    Without arguments, rank and world size come from torchrun's environment. `device` "cpu" forces
    gloo on a machine with GPUs; by default a CUDA machine uses NCCL and GPU `local_rank`."""
    if world_size is None or rank is None:
        env = torchrun_env()
        if env is None:
            raise RuntimeError("tensor parallelism needs torchrun's RANK/WORLD_SIZE, or an explicit rank and world")
        world_size, rank, local_rank = env.world_size, env.rank, env.local_rank
    local_rank = rank if local_rank is None else local_rank
    on_cuda = device != "cpu" and torch.cuda.is_available()
    if on_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"rank {rank} wants GPU {local_rank} but this host has {torch.cuda.device_count()}")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if on_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank,
                                timeout=DATA_TIMEOUT)
    elif (dist.get_world_size(), dist.get_rank()) != (world_size, rank):
        raise RuntimeError(f"a process group of {dist.get_world_size()} ranks (this one {dist.get_rank()}) "
                           f"already exists; asked for rank {rank} of {world_size}")
    cpu_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    fast = _symmetric_all_reduce(dist.group.WORLD, cpu_group, dev, world_size)
    return ParallelContext(rank, world_size, dev, dist.group.WORLD, cpu_group, fast)


def destroy_parallel() -> None:
    """Leave the process group (all groups of this process)."""
    if dist.is_initialized():
        gc.collect()  # engines in reference cycles: their CUDA graphs must not outlive the communicator
        dist.destroy_process_group()
