"""Programmatic dependent launch (PDL, sm_90+) for the short kernels of a decode step.

A batch-1 decode step of Llama-3-8B is ~330 kernels of 2-15 us each, replayed from a CUDA graph.
Without PDL a kernel's grid is launched only once the previous grid has drained, and its CTAs then
ramp up: about a microsecond per boundary in which no weight byte moves. With PDL the next grid is
launched as soon as every CTA of the running one has called `launch_dependents`, so its CTAs are
already resident when the previous grid ends and only `wait` (until the previous grid has completed
and its writes are visible) stands between them and their first load.

The rules for a kernel launched with `launch_kwargs(...)`:
- every program calls `wait(PDL)` before its first read of anything an earlier kernel wrote and
  before its first write (an earlier kernel may still read the buffer being overwritten);
- every program calls it, even one with nothing to do: a grid then completes only after its
  predecessor did, so the ordering stays transitive along the stream;
- `launch_dependents` comes after `wait`: called before it, grid after grid is launched ahead and
  piles up on the SMs, waiting (measured: the prompt's KV write back to back 11.7 -> 18.1 us).
A non-PDL kernel after a PDL one, or the other way round, gets ordinary stream order.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

ENABLED = True  # benchmarks switch it off for the A/B measurement; read at launch (and graph capture)


@functools.cache
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def launch_kwargs(t: torch.Tensor) -> dict:
    """Launch keywords for a kernel whose tensors live where `t` does: the PDL constexpr and, on a
    Hopper-or-newer GPU, the launch attribute (the interpreter and older GPUs get PDL=False)."""
    on = ENABLED and t.is_cuda and _supported(t.device.index if t.device.index is not None
                                              else torch.cuda.current_device())
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def wait(PDL: tl.constexpr):
    """Block until the previous grid has completed and its memory is visible (no-op without PDL)."""
    if PDL:
        gdc_wait()


@triton.jit
def launch_dependents(PDL: tl.constexpr):
    """Let the next grid launch once every program of this one has passed here."""
    if PDL:
        gdc_launch_dependents()
