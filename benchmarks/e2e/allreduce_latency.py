"""All-reduce latency between the GPUs of one host, as a tensor-parallel decode step issues it: bf16
[M, hidden] sums replayed from a CUDA graph (160 in a row, the all-reduces of one Llama-3-70B step).
Peers in the same run: NCCL, PyTorch symmetric-memory one-shot and two-shot all-reduces (peer-to-peer
loads over NVLink, no multicast) in place on their buffer, and what the engine calls
(`ParallelContext.all_reduce`: the two-shot one with the copy into its buffer, NCCL above
SymmetricAllReduce.MAX_BYTES), checked against the expected sum. Also the per-step control message
cost (gloo broadcast_object_list, rank 0 to the others).

    torchrun --standalone --nproc-per-node 2 benchmarks/e2e/allreduce_latency.py [--hidden 8192]

Keep NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 set on shared hosts.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from cometserve.distributed.context import ParallelContext, _symmetric_all_reduce

CALLS = 160


def graph_us(fn, reps: int = 10) -> float:
    """Median microseconds per call of `fn`, CALLS calls captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            fn()
    g.replay()
    torch.cuda.synchronize()
    dist.barrier()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / CALLS)
    return sorted(times)[reps // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--batches", default="1,8,64,256,1024,2048,4096,8192")
    args = p.parse_args()
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    cpu = dist.new_group(backend="gloo")
    group = dist.group.WORLD.group_name
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{dist.get_world_size()} x {torch.cuda.get_device_name()}, torch {torch.__version__}; us per all-reduce")
    world, dev = dist.get_world_size(), torch.device("cuda", torch.cuda.current_device())
    tp = ParallelContext(rank, world, dev, dist.group.WORLD, cpu, _symmetric_all_reduce(dist.group.WORLD, cpu, dev, world))
    say(f"{'M':>6} {'MB':>7} {'nccl':>8} {'engine':>8} {'one_shot':>9} {'two_shot':>9}")
    for m in map(int, args.batches.split(",")):
        x = torch.randn(m, args.hidden, device="cuda", dtype=torch.bfloat16)
        y = tp.all_reduce(x.clone())
        assert torch.equal(y, x * world) if world == 2 else torch.allclose(y.float(), x.float() * world, rtol=1e-2, atol=1e-2), \
            "ParallelContext.all_reduce: wrong sum"
        cols = [f"{graph_us(lambda x=x: dist.all_reduce(x)):8.1f}", f"{graph_us(lambda y=y: tp.all_reduce(y)):8.1f}"]
        try:
            import torch.distributed._symmetric_memory as symm_mem

            buf = symm_mem.empty(x.numel(), dtype=x.dtype, device="cuda")
            symm_mem.rendezvous(buf, group)
            buf.copy_(x.view(-1))
            want = x.float() * dist.get_world_size()  # every rank holds the same x (seeded alike)
            got = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group).view_as(x).float()
            assert torch.allclose(got, want, rtol=1e-2, atol=1e-2), "one_shot_all_reduce: wrong sum"
            cols.append(f"{graph_us(lambda b=buf: torch.ops.symm_mem.one_shot_all_reduce(b, 'sum', group)):9.1f}")
            cols.append(f"{graph_us(lambda b=buf: torch.ops.symm_mem.two_shot_all_reduce_(b, 'sum', group)):9.1f}")
        except Exception as e:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
            cols.append(f"  symm_mem unavailable: {type(e).__name__}: {str(e)[:120]}")
        say(f"{m:6d} {x.numel() * 2 / 1e6:7.2f} {' '.join(cols)}")
    for n in (1, 256):
        msg = ("step", [([i], True) for i in range(8)], {"ids": list(range(n)), "positions": list(range(n))})
        for _ in range(5):
            dist.broadcast_object_list([msg if rank == 0 else None], src=0, group=cpu)
        t0 = time.perf_counter()
        for _ in range(200):
            dist.broadcast_object_list([msg if rank == 0 else None], src=0, group=cpu)
        say(f"gloo broadcast_object_list, a step of {n} sequences: {(time.perf_counter() - t0) / 200 * 1e6:.0f} us")
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
