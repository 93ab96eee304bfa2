"""W4Ax GEMV for decode batches of 1-32 tokens: a CUDA kernel (gemv_w4ax.cu, NVRTC on first use), one
of the tuner's candidates in gemm_w4ax.py at those M.

Why: at M = 1 the Triton kernel pads the tokens to a 16-row MMA tile, splits K over 2-6 waves of CTAs
and sums the fp32 partials in the last CTA of each tile; on the H200 the four Llama-3-8B matrices took
7-22 us each, 5-10 us over their byte floor (NOTES-gemm.md item 24). Here the weights stream through
the CUDA cores (dp4a on the mask-widened nibbles), each CTA owns 32 weight rows over all of K, its
warps take interleaved blocks with the next block's loads in flight, and the warps' partial sums meet
in shared memory in a fixed order: one launch, no partial buffers or semaphores, deterministic.
8 or 16 warps per CTA: the tuner times both (8 won on the larger-N shapes on the H200, 16 on o and
down_proj; NOTES-gemm.md item 29).

Two instance families: dp4a on the CUDA cores for 1-4 tokens (activations staged in shared memory),
and `mma` instances for 1-32 tokens (mma.sync m16n8k32 s8 on 8-token tiles, activations read per block
through L1), whose cost per block barely grows with the tokens (dp4a's grows linearly).

Same operands as the other two kernels (prepare_weights' tiled INT4 layout, int8 activation codes,
fp32 activation scales, fp16 weight scales [nb or 1, N]); per block the same fp32 FMA as the Triton
kernel, the blocks summed in another order (the reference's tolerance; integer-exact with unit
scales, as tested).
"""

from __future__ import annotations

import functools
import os

import torch

from cometserve.kernels import cuda_launch, pdl

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = (os.path.join(_HERE, "mma_int4.cuh"), os.path.join(_HERE, "gemv_w4ax.cu"))
MAX_M = 4  # dp4a instances
MMA_MAX_M = 32  # tensor-core instances: 1, 2 or 4 tiles of 8 tokens
ROWS = 32  # weight rows per CTA
WARPS = (16, 8)  # warps per CTA of the instances the tuner times (the first: the untuned default)
SMEM_MAX = 160 * 1024  # staged activations (K_pad 28672 at 4 tokens: 116 KB); the opt-in limit is 227 KB
_OUT = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def _instance_rows(m: int) -> int:
    """The kernel instance (1, 2 or 4 rows) that runs m tokens."""
    return 1 << (m - 1).bit_length()


def _mma_tiles(m: int) -> int:
    """8-token tiles of the mma instance that runs m tokens (1, 2 or 4)."""
    return 1 << max(0, (m - 1).bit_length() - 3)


def warps_for(m: int, mma: bool) -> tuple[int, ...]:
    """The warp counts the tuner times: WARPS, less 16 for the 4-tile mma instance (it spills at the
    128 registers a 512-thread CTA allows)."""
    return tuple(w for w in WARPS if not (mma and w > 8 and _mma_tiles(m) > 2))


def rows_for(mma: bool) -> tuple[int, ...]:
    """Weight rows per CTA the tuner times: ROWS, and with mma also two row groups (2 * ROWS)."""
    return (ROWS, 2 * ROWS) if mma else (ROWS,)


def _mma_smem(m: int, warps: int, groups: int) -> int:
    return warps // groups * 8 * _mma_tiles(m) * (ROWS * groups + 1) * 4


def smem_bytes(m: int, k_pad: int) -> int:
    """The staged activation codes and scales of the instance for `m` tokens."""
    mt = _instance_rows(m)
    return mt * k_pad + mt * (k_pad // 128) * 4


@functools.cache
def _device_ok(device_index: int) -> tuple[bool, str]:
    if not cuda_launch.available():
        return False, "torch.cuda._compile_kernel (NVRTC) missing in this PyTorch"
    if torch.cuda.get_device_capability(device_index) < (8, 0):
        return False, "needs sm_80 or newer"
    return True, ""


def can_implement(m: int, n: int, k_pad: int, w_bits: int, out_dtype: torch.dtype,
                  device: torch.device, mma: bool = False) -> tuple[bool, str]:
    """Whether the dp4a (mma False) or tensor-core (mma True) instances run this shape."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"needs a CUDA device, got {device.type}"
    max_m = MMA_MAX_M if mma else MAX_M
    if not 1 <= m <= max_m:
        return False, f"M={m}: the {'mma' if mma else 'dp4a'} GEMV takes 1 to {max_m} tokens"
    if w_bits != 4:
        return False, f"INT4 weights only, got {w_bits} bits"
    if n % 64:
        return False, f"N={n} is not a multiple of the 64-row weight tile"
    if out_dtype not in _OUT:
        return False, f"output dtype {out_dtype}"
    if not mma and smem_bytes(m, k_pad) > SMEM_MAX:
        return False, f"K_pad={k_pad}: {smem_bytes(m, k_pad)} B of staged activations exceed shared memory"
    return _device_ok(device.index if device.index is not None else torch.cuda.current_device())


def operands_ok(a_codes: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, mma: bool = False) -> bool:
    """Per-call checks: 16-byte activation rows, the bias in Y's dtype, at most MAX_M (MMA_MAX_M) rows."""
    return (a_codes.shape[0] <= (MMA_MAX_M if mma else MAX_M) and a_codes.data_ptr() % 16 == 0
            and a_codes.stride(0) % 16 == 0 and (bias is None or bias.dtype == y.dtype))


def launch(a_codes, a_scales, qweight, w_scales, bias, y, warps: int = WARPS[0], mma: bool = False,
           rows: int = ROWS) -> None:
    """Y = W4Ax(a_codes, a_scales, prepared qweight / w_scales) (+ bias) into y [M, N], M <= MAX_M
    (MMA_MAX_M with mma), with `warps` (one of WARPS) warps per CTA over `rows` weight rows (ROWS, or
    with mma 2 * ROWS: two row groups of warps that share the activation loads)."""
    m, k_pad = a_codes.shape
    common = f"{_OUT[y.dtype]}, {'true' if bias is not None else 'false'}, {warps}"
    if mma:
        groups = rows // ROWS
        smem, name = _mma_smem(m, warps, groups), f"w4ax_gemv_mma<{_mma_tiles(m)}, {common}, {groups}>"
    else:
        smem, name = smem_bytes(m, k_pad), f"w4ax_gemv<{_instance_rows(m)}, {common}>"
    k = cuda_launch.kernel(SOURCES, name, None, SMEM_MAX)  # opt-in always: the static reduction buffer adds to it
    cuda_launch.launch(k, (y.shape[1] // rows, 1, 1), 32 * warps,
                       [a_codes, a_scales, qweight, w_scales, bias if bias is not None else y, y,
                        m, k_pad // 128, a_codes.stride(0), a_scales.stride(0),
                        w_scales.stride(0) if w_scales.shape[0] > 1 else 0, y.stride(0)],
                       pdl.launch_kwargs(y)["PDL"], smem)
