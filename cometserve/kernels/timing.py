"""Timing kernels the way a serving step runs them: calls replayed back to back from a CUDA graph,
each on its own copy of the weights, so neither launch overhead nor an L2-resident weight flatters a
small kernel, and no L2 flush leaves dirty lines whose write-back the next kernel pays for
(benchmarks/kernels/NOTES-gemm.md, item 8). Used by the benchmarks and by the GEMM tuner. `run_meta`:
what a result file records of its run."""

from __future__ import annotations

import datetime
import math
import subprocess
from pathlib import Path

import torch


def copies_for(nbytes: int, rotate_bytes: float, cap: int = 16) -> int:
    """Copies of an operand of `nbytes` that together span `rotate_bytes` (at most `cap`)."""
    return max(1, min(cap, math.ceil(rotate_bytes / max(1, nbytes))))


def graph_us(calls, replays: int = 9, target_us: float = 2000.0) -> float:
    """Median microseconds per call: `calls` (a list of callables) captured in turn into one CUDA
    graph, repeated to about `target_us`, replayed `replays` times."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    calls[0]()
    e1.record()
    torch.cuda.synchronize()
    inner = max(1, min(64, math.ceil(target_us / (e0.elapsed_time(e1) * 1e3 * len(calls)))))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            for c in calls:
                c()
    graph.replay()
    times = []
    for _ in range(replays):
        e0.record()
        graph.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / (inner * len(calls)))
    return sorted(times)[len(times) // 2]


def run_meta(command: str, commit: str | None = None) -> dict:
    """GPU, driver (of the first GPU nvidia-smi lists), torch, triton, commit (git HEAD of this tree unless given), command and UTC date."""
    import triton

    def out(*cmd: str) -> str:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=Path(__file__).parent)
        except OSError:
            return ""
        return proc.stdout.strip() if proc.returncode == 0 else ""

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "driver": (out("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader") or "unknown").splitlines()[0],
            "commit": commit or out("git", "rev-parse", "HEAD") or "unknown", "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
