"""W4Ax GEMV for decode batches of 1-4 tokens: a CUDA kernel (gemv_w4ax.cu, NVRTC on first use), one
of the tuner's candidates in gemm_w4ax.py at those M.

Why: at M = 1 the Triton kernel pads the tokens to a 16-row MMA tile, splits K over 2-6 waves of CTAs
and sums the fp32 partials in the last CTA of each tile; on the H200 the four Llama-3-8B matrices took
7-22 us each, 5-10 us over their byte floor (NOTES-gemm.md item 24). Here the weights stream through
the CUDA cores (dp4a on the mask-widened nibbles), each CTA owns 32 weight rows over all of K, its
warps take interleaved blocks with the next block's loads in flight, and the warps' partial sums meet
in shared memory in a fixed order: one launch, no partial buffers or semaphores, deterministic.

Same operands as the other two kernels (prepare_weights' tiled INT4 layout, int8 activation codes,
fp32 activation scales, fp16 weight scales [nb or 1, N]); per block the same fp32 FMA as the Triton
kernel, the blocks summed in another order (the reference's tolerance; integer-exact with unit
scales, as tested).
"""

from __future__ import annotations

import functools
import os
import struct

import torch

from cometserve.kernels import cuda_launch, pdl

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = (os.path.join(_HERE, "mma_int4.cuh"), os.path.join(_HERE, "gemv_w4ax.cu"))
MAX_M = 4
ROWS = 32  # weight rows per CTA
THREADS = 512  # gemv_w4ax.cu's GV_WARPS warps
SMEM_MAX = 160 * 1024  # staged activations (K_pad 28672 at 4 tokens: 116 KB); the opt-in limit is 227 KB
_OUT = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
FUSE_ACT_QUANT = True  # one token: quantize the activation inside the GEMV (quant_gemv); False for A/B runs
FUSED_CTAS_PER_SM = 2  # quant_gemv's register bound (__launch_bounds__ min CTAs): 2 caps it at 64 registers


def _instance_rows(m: int) -> int:
    """The kernel instance (1, 2 or 4 rows) that runs m tokens."""
    return 1 << (m - 1).bit_length()


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
                  device: torch.device) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"needs a CUDA device, got {device.type}"
    if not 1 <= m <= MAX_M:
        return False, f"M={m}: the GEMV takes 1 to {MAX_M} tokens"
    if w_bits != 4:
        return False, f"INT4 weights only, got {w_bits} bits"
    if n % 64:
        return False, f"N={n} is not a multiple of the 64-row weight tile"
    if out_dtype not in _OUT:
        return False, f"output dtype {out_dtype}"
    if smem_bytes(m, k_pad) > SMEM_MAX:
        return False, f"K_pad={k_pad}: {smem_bytes(m, k_pad)} B of staged activations exceed shared memory"
    return _device_ok(device.index if device.index is not None else torch.cuda.current_device())


def operands_ok(a_codes: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> bool:
    """Per-call checks: 16-byte activation rows, the bias in Y's dtype, at most MAX_M rows."""
    return (a_codes.shape[0] <= MAX_M and a_codes.data_ptr() % 16 == 0 and a_codes.stride(0) % 16 == 0
            and (bias is None or bias.dtype == y.dtype))


def launch(a_codes, a_scales, qweight, w_scales, bias, y) -> None:
    """Y = W4Ax(a_codes, a_scales, prepared qweight / w_scales) (+ bias) into y [M, N], M <= MAX_M."""
    m, k_pad = a_codes.shape
    smem = smem_bytes(m, k_pad)
    name = f"w4ax_gemv<{_instance_rows(m)}, {_OUT[y.dtype]}, {'true' if bias is not None else 'false'}>"
    k = cuda_launch.kernel(SOURCES, name, None, SMEM_MAX)  # opt-in always: the static reduction buffer adds to it
    cuda_launch.launch(k, (y.shape[1] // ROWS, 1, 1), THREADS,
                       [a_codes, a_scales, qweight, w_scales, bias if bias is not None else y, y,
                        m, k_pad // 128, a_codes.stride(0), a_scales.stride(0),
                        w_scales.stride(0) if w_scales.shape[0] > 1 else 0, y.stride(0)],
                       pdl.launch_kwargs(y)["PDL"], smem)


def _fused_smem(k: int, nb: int) -> int:
    """Codes [K_pad], scales fp32 [nb rounded up to 4], the row fp32 [K]."""
    return nb * 128 + 4 * ((nb + 3) // 4 * 4) + 4 * k


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def fused_ok(x: torch.Tensor, perm, block_bits: torch.Tensor, norm_weight, gated: bool, residual,
             qweight: torch.Tensor, w_scales: torch.Tensor, bias, out_dtype: torch.dtype) -> bool:
    """Whether quant_gemv takes this call: one 16-bit token row (K % 8 == 0, at most 8 x THREADS
    channels), no SiLU-and-multiply, the norm weight and residual in x's dtype, and a shape the
    GEMV itself takes."""
    m, k = x.shape
    if not (FUSE_ACT_QUANT and m == 1 and not gated and x.dtype in (torch.float16, torch.bfloat16)
            and x.dtype == out_dtype and k % 8 == 0 and k <= 4 * 8 * THREADS and x.stride(1) == 1
            and x.data_ptr() % 16 == 0 and block_bits.dtype == torch.uint8):
        return False
    for t, dtype in ((perm, torch.int32), (norm_weight, x.dtype), (residual, x.dtype)):
        if t is not None and (t.dtype != dtype or not t.is_contiguous() or t.data_ptr() % 16):
            return False
    nb = block_bits.numel()
    return (_fused_smem(k, nb) <= SMEM_MAX and (bias is None or bias.dtype == out_dtype)
            and can_implement(1, qweight.shape[0], nb * 128, 4 if qweight.dtype == torch.uint8 else 8, out_dtype,
                          x.device)[0])


def quant_gemv(x, perm, block_bits, norm_weight, eps, rotate, residual, qweight, w_scales, bias):
    """One token: quant_act.quant_act(x, perm, block_bits, norm_weight, eps, rotate, residual=residual)
    followed by the GEMV, in one launch (fused_ok must hold). -> y [1, N] in x's dtype, and
    x + residual [1, K] when `residual` is given."""
    k, nb, n = x.shape[1], block_bits.numel(), qweight.shape[0]
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    total = torch.empty_like(residual) if residual is not None else None
    ch = -(-k // (8 * THREADS))
    flags = [x.dtype == torch.bfloat16, perm is not None, norm_weight is not None, rotate, residual is not None]
    name = (f"w4ax_gemv_quant<{_OUT[x.dtype]}, {'true' if bias is not None else 'false'}, "
            + ", ".join("true" if f else "false" for f in flags) + f", {ch}, {FUSED_CTAS_PER_SM}>")
    smem = _fused_smem(k, nb)
    kern = cuda_launch.kernel(SOURCES, name, None, SMEM_MAX)
    eps_bits = struct.unpack("<i", struct.pack("<f", eps))[0]
    resident = _sm_count(x.device.index) * cuda_launch.ctas_per_sm(kern, THREADS, smem)
    cuda_launch.launch(kern, (min(n // ROWS, resident), 1, 1), THREADS,
                       [x, residual if residual is not None else x, total if total is not None else y,
                        perm if perm is not None else x, block_bits,
                        norm_weight if norm_weight is not None else x, qweight, w_scales,
                        bias if bias is not None else y, y, k, nb, n // ROWS,
                        w_scales.stride(0) if w_scales.shape[0] > 1 else 0, eps_bits],
                       pdl.launch_kwargs(y)["PDL"], smem)
    return y if residual is None else (y, total)
