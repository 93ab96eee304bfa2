"""Paged decode attention over the INT4 KV cache as a CUDA kernel (sources: mma_int4.cuh +
paged_decode.cu), compiled on first use with NVRTC (kernels/cuda_launch.py).
attention.decode_attention takes this path on CUDA when can_implement() agrees, else its Triton
kernel (the portable path, and the one the CPU interpreter tests).

Why not Triton (benchmarks/kernels/NOTES-attention.md): the Triton kernel spent ~3200
warp-instructions and 13 CTA barriers per 64-token tile, moving every widened K/V operand through
shared memory, and streamed 0.85-1.45 TB/s. Here one warp owns a tile from load to softmax update:
mma.sync fragments are built in registers from the tile's raw bytes (the reduction order over
channels is free, so q is permuted to the order the codes widen into), P goes from the score
accumulators to the next MMA without a layout change, scales and zero points are folded around
the MMAs: ~1100 SASS instructions per tile (1300 from the ring), no CTA barrier in the loop.

Work split: grid (splits, Hkv, B); the warps of a CTA take tiles w, w + num_warps, ... of their
split. Large problems stream each warp's tiles through a 2-stage cp.async ring (2.9-3.0 TB/s at
128 x 8192-32768); small ones (latency-bound) load straight from global memory with 4 warps per
CTA. Splits fill one wave of resident CTAs (occupancy from the CUDA driver); partials are merged
by a second kernel, skipped with one split (an in-kernel merge by the last CTA was slower, and so
was one through a thread block cluster's shared memory: NOTES-attention.md). Both kernels launch
with programmatic dependent launch on sm_90+ (kernels/pdl.py), through cuLaunchKernelEx.
"""

from __future__ import annotations

import functools
import os
import struct

import torch

from cometserve.kernels import cuda_launch, pdl
from cometserve.kernels.ref import PagedKVCache

LOG2E = 1.4426950408889634
_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [os.path.join(_HERE, "mma_int4.cuh"), os.path.join(_HERE, "paged_decode.cu")]  # one NVRTC unit
SMEM_LIMIT = 48 * 1024  # static shared memory per CTA: the warps' rings, or the warp merge

# Measured in NOTES-attention.md; decode_attention(config=...) overrides them for tuning.
# stages: depth of each warp's cp.async ring (0: fragments loaded straight from global memory).
# None: problems of at most SMALL_TILES tiles (B x Hkv x 64-token tiles) take 4 warps with direct
# loads (latency-bound: fewer steps per warp), larger ones 2 warps with a 2-stage ring. 8 warps where
# the grid has at most FEW_CTAS (sequence, KV head) pairs, or up to 4x that when 8 warps leave a single
# split (no merge launch: contexts up to 512 tokens). Batch-1 decode graph sized for 8192
# tokens, attention plus the next act-quant: 10.5 -> 8.8 us at context 256, 16.3 -> 15.1 at 8064;
# at batch 4 with splits, 8 warps lost 0.4-0.7 us (H200, NOTES-attention.md session 15).
DECODE_CUDA_CONFIG = {"num_warps": None, "stages": None, "min_tiles_per_warp": 1}
SMALL_TILES = 4096
FEW_CTAS = 8


def _kernel(name: str):
    return cuda_launch.kernel(tuple(SOURCES), name)


def _launch(name: str, grid: tuple, block: int, args: list, use_pdl: bool) -> None:
    cuda_launch.launch(_kernel(name), grid, block, args, use_pdl)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _shape(cfg: dict, pairs: int, max_tiles: int, rep: int, d: int, tile: int) -> tuple[int, int]:
    """(warps, stages) for `pairs` (sequence, KV head) pairs of up to `max_tiles` tiles each, within
    the static shared memory limit."""
    small = pairs * max_tiles <= SMALL_TILES
    wide = small and (pairs <= FEW_CTAS or (pairs <= 4 * FEW_CTAS and max_tiles <= 8 * cfg["min_tiles_per_warp"]))
    nw = cfg["num_warps"] or (8 if wide else 4 if small else 2)
    stages = cfg["stages"] if cfg["stages"] is not None else (0 if small else 2)
    merge, stage = rep * (d + 2) * 4, tile * d + 8 * d
    while nw > 1 and nw * max(merge, stages * stage) > SMEM_LIMIT:
        nw //= 2
    while stages and nw * stages * stage > SMEM_LIMIT:
        stages = stages - 1 if stages > 2 else 0
    return nw, stages


def can_implement(q: torch.Tensor, cache: PagedKVCache) -> tuple[bool, str]:
    """Whether the CUDA kernel takes these inputs (attention.can_implement already holds)."""
    if not q.is_cuda:
        return False, "not on CUDA"
    if not cuda_launch.available():
        return False, "torch.cuda._compile_kernel (NVRTC) missing in this PyTorch"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return False, "mma.sync bf16 and cp.async need sm_80 or newer"
    rep = q.shape[1] // cache.num_kv_heads
    if rep > 16:
        return False, f"{rep} query heads per KV head (at most 16: one 16-row MMA tile)"
    if q.data_ptr() % 16 or q.stride(0) % 8 or q.stride(1) % 8:
        return False, "q rows must be 16-byte aligned"
    if not all(t.is_contiguous() for t in cache.tensors()):
        return False, "cache tensors must be contiguous"
    return True, ""


def _num_splits(batch: int, kv_heads: int, max_tiles: int, nw: int, cfg: dict, resident: int) -> int:
    """One wave of resident CTAs (a partial second wave would take as long as a full one)."""
    cap = max(1, max_tiles // (nw * cfg["min_tiles_per_warp"]))
    return max(1, min(resident // (batch * kv_heads), cap))


def decode(q: torch.Tensor, cache: PagedKVCache, block_tables: torch.Tensor, context_lens: torch.Tensor,
           seq_slots: torch.Tensor, scale: float, max_context_len: int | None = None,
           num_splits: int | None = None, config: dict | None = None) -> torch.Tensor:
    """attention.decode_attention's contract: q [B, Hq, D] -> [B, Hq, D] in q's dtype."""
    cfg = {**DECODE_CUDA_CONFIG, **(config or {})}
    b, hq, d = q.shape
    h, g, p = cache.num_kv_heads, cache.group_size, cache.page_size
    rep = hq // h
    assert block_tables.stride(1) == 1 and context_lens.is_contiguous() and seq_slots.is_contiguous()
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    if b == 0:
        return out
    if max_context_len is None:
        max_context_len = int(context_lens.max())
    tt = min(g, 64)  # tokens per quantized tile
    # sizes the grid only: the kernel spreads each sequence's own tiles (its window in 16-token chunks)
    # over the splits, so every tile is covered whatever this count
    max_tiles = max(1, -(-max_context_len // tt))
    nw, stages = _shape(cfg, b * h, max_tiles, rep, d, tt)
    bf16 = "true" if q.dtype == torch.bfloat16 else "false"
    name = f"paged_decode_int4<{d}, {g}, {p}, {rep}, {nw}, {bf16}, {stages}>"
    if num_splits is None:
        resident = _num_sms(q.device.index or 0) * cuda_launch.ctas_per_sm(_kernel(name), nw * 32)
        splits = _num_splits(b, h, max_tiles, nw, cfg, resident)
        tps = nw * -(-max_tiles // (splits * nw))  # tiles per split, whole rounds of the warps
    else:
        tps = -(-max_tiles // num_splits)
    splits = -(-max_tiles // tps)
    use_pdl = pdl.launch_kwargs(q)["PDL"]
    f32 = {"dtype": torch.float32, "device": q.device}  # split partials: [B, Hq, splits, D], (max, sum)
    part_o = torch.empty(b, hq, splits, d, **f32) if splits > 1 else out
    part_ml = torch.empty(b, hq, splits, 2, **f32) if splits > 1 else out
    scale_bits = struct.unpack("<i", struct.pack("<f", scale * LOG2E))[0]
    _launch(name, (splits, h, b), nw * 32,
            [q, *cache.tensors(), block_tables, context_lens, seq_slots, out, part_o, part_ml,
             q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), h, splits,
             scale_bits], use_pdl)
    if splits > 1:
        _launch(f"merge_splits<{d}, {bf16}>", (b * hq, 1, 1), d,
                [part_o, part_ml, out, hq, out.stride(0), out.stride(1), splits], use_pdl)
    return out
