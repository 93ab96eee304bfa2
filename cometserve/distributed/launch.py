"""Starting the ranks of a tensor-parallel engine. Two ways, same engine code:

- torchrun (`torchrun --nproc-per-node N script.py`): every process calls `run_under_torchrun`:
  rank 0 runs the caller's driver function, the others follow it in `worker_loop`.
- spawned from this process (`start_workers(N)`, or `launch_engine` which also builds the engine):
  ranks 1..N-1 are spawned processes running `worker_loop`, and this process becomes rank 0 (the
  server's and `cometserve bench`'s way: one command, no launcher). The rendezvous is
  tcp://127.0.0.1 on a free port.
"""

from __future__ import annotations

import multiprocessing
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from cometserve.distributed.context import ParallelContext, destroy_parallel, init_parallel
from cometserve.distributed.engine import ModelSpec, create_engine, free_engine, stop_workers, worker_loop
from cometserve.engine.engine import EngineConfig, LLMEngine

T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Workers:
    """Ranks 1..N-1 running in spawned processes; `tp` is this process's (rank 0's) context."""

    tp: ParallelContext
    processes: list = field(default_factory=list)
    engine: LLMEngine | None = None  # rank 0's, when launch_engine built it

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.processes)

    def close(self, timeout: float = 60.0) -> None:
        """Stop the workers and leave the process group with them, then wait for them. Every rank drops
        its engine first (decode CUDA graphs hold NCCL work), and rank 0 leaves the group before it
        joins the workers: NCCL's teardown waits for every rank."""
        if self.engine is not None:
            self.engine.runner.graphs = None
            self.engine = None
        try:
            if self.alive():
                free_engine(self.tp)
                stop_workers(self.tp)
        finally:
            try:
                destroy_parallel()
            finally:
                for p in self.processes:
                    p.join(timeout)
                    if p.is_alive():
                        p.terminate()


def start_workers(world_size: int, device: str | None = None, num_threads: int | None = None) -> Workers:
    """Spawn ranks 1..world_size-1 and make this process rank 0. `device` "cpu" forces gloo and
    the CPU; `num_threads` sets torch's intra-op threads in the workers (CPU runs)."""
    if world_size < 1:
        raise ValueError(f"tensor-parallel size must be >= 1, got {world_size}")
    if device != "cpu" and torch.cuda.is_available() and world_size > torch.cuda.device_count():
        raise ValueError(f"tensor-parallel size {world_size} > {torch.cuda.device_count()} visible GPUs")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    ctx = multiprocessing.get_context("spawn")
    processes = [ctx.Process(target=_worker_main, args=(rank, world_size, init_method, device, num_threads),
                             name=f"cometserve-tp-rank{rank}", daemon=True) for rank in range(1, world_size)]
    for p in processes:
        p.start()
    try:
        tp = init_parallel(world_size, 0, init_method, device=device)
    except BaseException:
        for p in processes:
            p.terminate()
        raise
    return Workers(tp, processes)


def launch_engine(spec: ModelSpec, tensor_parallel: int, config: EngineConfig | None = None, tokenizer=None,
                  device: str | None = None) -> tuple[LLMEngine, Workers]:
    """The server's entry point: spawn ranks 1..N-1, build every rank's shard of `spec` and its engine,
    and return rank 0's engine (used like any LLMEngine, e.g. inside AsyncEngine) with the workers.
    Call `workers.close()` once the engine has stepped for the last time."""
    workers = start_workers(tensor_parallel, device)
    try:
        workers.engine = create_engine(workers.tp, spec, config, tokenizer)
        return workers.engine, workers
    except BaseException:
        workers.close()
        raise


def _worker_main(rank: int, world_size: int, init_method: str, device: str | None, num_threads: int | None) -> None:
    if num_threads:
        torch.set_num_threads(num_threads)
    tp = init_parallel(world_size, rank, init_method, device=device)
    try:
        worker_loop(tp)
    finally:
        destroy_parallel()


def run_under_torchrun(driver: Callable[[ParallelContext], T], device: str | None = None) -> T | None:
    """In a torchrun process: rank 0 returns driver(tp) (the workers are stopped after it, even if it
    raises); the other ranks follow rank 0 and return None."""
    tp = init_parallel(device=device)
    try:
        if not tp.is_driver:
            worker_loop(tp)
            return None
        try:
            return driver(tp)
        finally:
            stop_workers(tp)
    finally:
        destroy_parallel()


def run_tensor_parallel(world_size: int, driver: Callable[[ParallelContext], T], device: str | None = None) -> T | None:
    """Run `driver(tp)` as rank 0 of `world_size` ranks: under torchrun (which started them; the other
    ranks get None back once rank 0 is done), or with ranks 1.. spawned from this process."""
    from cometserve.config import torchrun_env

    env = torchrun_env()
    if env is not None:
        if env.world_size != world_size:
            raise ValueError(f"torchrun started {env.world_size} processes but --tensor-parallel is {world_size}")
        return run_under_torchrun(driver, device)
    workers = start_workers(world_size, device)
    try:
        return driver(workers.tp)
    finally:
        workers.close()
