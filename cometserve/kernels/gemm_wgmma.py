"""W4Ax GEMM for many tokens on Hopper: a warp-specialized, persistent CUDA kernel (gemm_wgmma.cu,
compiled for sm_90a with NVRTC on first use), one of the tuner's candidates in gemm_w4ax.py.

Why a CUDA kernel: the contract's per-128-channel activation scales make every output take an FP32
fold (I2F, FMUL, FFMA) after each 128-deep integer MMA. Triton waits for every wgmma before that
fold and will not overlap the two inside a CTA (NOTES-gemm.md items 1, 5, 17), so its kernel ran at
~0.75x cuBLAS bf16 from M = 512. Here a producer warpgroup streams tiles through an mbarrier ring
while two consumer warpgroups each own 64 weight rows: one folds on the CUDA cores while the other's
wgmma runs on the tensor cores.

Work is persistent over units (tile, K split): with split > 1 each split writes an fp32 partial and
the tile's last split to arrive sums them in split order, as the Triton kernel's split-K does; it
pays where the tiles leave SMs idle (M = 128 on down_proj, NOTES-gemm.md item 23).

Same operands as the Triton kernel (prepare_weights' tiled INT4 layout, int8 activation codes,
fp32 activation scales, fp16 weight scales [nb or 1, N]) and the same fp32 arithmetic in the same
block order: unsplit, outputs equal the Triton kernel's unsplit results bit for bit.
"""

from __future__ import annotations

import functools
import os

import torch

from cometserve.kernels import cuda_launch, pdl

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = (os.path.join(_HERE, "mma_int4.cuh"), os.path.join(_HERE, "gemm_wgmma.cu"))
THREADS = 384  # producer warpgroup + 2 consumer warpgroups
TILE_N = 128  # weight rows per CTA tile
SMEM_MAX = 227 * 1024  # dynamic shared memory per CTA on sm_90
_OUT = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def smem_bytes(block_m: int, stages: int, out_dtype: torch.dtype) -> int:
    """The kernel's carve-up: alignment slack, per stage activation + weight tiles + both scale
    vectors + two mbarriers, and the two consumers' padded epilogue tiles."""
    osz = 4 if out_dtype == torch.float32 else 2
    return 1024 + stages * (block_m * 128 + TILE_N * 64 + block_m * 4 + TILE_N * 2 + 16) + 2 * block_m * (64 * osz + 16)


@functools.cache
def _device_ok(device_index: int) -> tuple[bool, str]:
    if not cuda_launch.available():
        return False, "torch.cuda._compile_kernel (NVRTC) missing in this PyTorch"
    if torch.cuda.get_device_capability(device_index) != (9, 0):
        return False, "wgmma and setmaxnreg need sm_90a (Hopper)"
    return True, ""


def can_implement(n: int, w_bits: int, out_dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"needs a CUDA device, got {device.type}"
    if w_bits != 4:
        return False, f"INT4 weights only, got {w_bits} bits"
    if n % TILE_N:
        return False, f"N={n} is not a multiple of the {TILE_N}-row tile"
    if out_dtype not in _OUT:
        return False, f"output dtype {out_dtype}"
    return _device_ok(device.index if device.index is not None else torch.cuda.current_device())


def operands_ok(a_codes: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> bool:
    """Per-call checks of what the 16-byte copies need (the shapes were checked by the caller)."""
    return (a_codes.data_ptr() % 16 == 0 and a_codes.stride(0) % 16 == 0 and y.data_ptr() % 16 == 0
            and (y.stride(0) * y.element_size()) % 16 == 0 and (bias is None or bias.dtype == y.dtype))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch(block_m: int, stages: int, group_n: int, split: int, a_codes, a_scales, qweight, w_scales, bias, y,
           part, sems) -> None:
    """Y = W4Ax(a_codes, a_scales, prepared qweight / w_scales) (+ bias) into y [M, N]. With split > 1
    each tile's blocks are cut into `split` K ranges: fp32 partials in part [split, M, N], the tile's
    counter in sems (zero before, left zero), as gemm_w4ax's Triton kernel does."""
    m, k_pad = a_codes.shape
    n, nb = y.shape[1], k_pad // 128
    smem = smem_bytes(block_m, stages, y.dtype)
    assert smem <= SMEM_MAX, f"block_m={block_m} x {stages} stages needs {smem} B of shared memory"
    tf = {True: "true", False: "false"}
    name = f"w4ax_wgmma<{block_m}, {_OUT[y.dtype]}, {tf[bias is not None]}, {stages}, {tf[split > 1]}>"
    k = cuda_launch.kernel(SOURCES, name, "90a", smem)
    units = -(-m // block_m) * (n // TILE_N) * split
    grid = min(units, _num_sms(y.device.index if y.device.index is not None else torch.cuda.current_device()))
    cuda_launch.launch(k, (grid, 1, 1), THREADS,
                       [a_codes, a_scales, qweight, w_scales, bias if bias is not None else y, y, part, sems,
                        m, n, nb, a_codes.stride(0), a_scales.stride(0),
                        w_scales.stride(0) if w_scales.shape[0] > 1 else 0, y.stride(0), group_n, split],
                       pdl.launch_kwargs(y)["PDL"], smem)
