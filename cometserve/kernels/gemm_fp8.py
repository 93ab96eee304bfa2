"""W4Ax GEMM for large M (prefill) on FP8 tensor cores: cuBLAS block-scaled FP8 (`torch._scaled_mm`
with 1x128 scales on both operands, CC 9.0 only), the same function as `w4ax_gemm`.

The W4Ax contract Y = sum_b int(A_b . W_b^T) * a_scale[m, b] * w_scale[n, b] is exactly what cuBLAS's
(BlockWise1x128, BlockWise1x128) mode computes: a 128-deep product per block, scaled in float32 by
one scale per (row, block) of A and per (column, block) of B. The codes must be exact in e4m3:
- INT4 codes (-8..7) are. Weights arrive from the W4Ax kernel's layout as code * 16 (the mask
  widening), also exact in e4m3; the 1/16 goes into the weight scales (a power of two: exact).
- INT8 activation codes are not (e4m3 has 3 mantissa bits). Each INT8 block is split into a high
  and a low part, c = 16 h + l with l = c & 15 in [0, 15] and h in [-8, 7], both exact: the high
  part stays in the block's place with its scale times 16, the low part is appended as an extra
  block (K' = K + 128 * #INT8 blocks) matched by a copy of that weight block. 16% INT8 blocks cost
  16% more tensor-core work.
Per 128-block the integer products are exact (|sum| <= 128 * 15 * 8 < 2^14); the float32 scaling
and the sum over blocks run in cuBLAS's order, so the output matches the reference within float32
rounding before the bf16 store.

Weights stay INT4 in memory: each call expands the layer's weights to FP8 [N, K'] in a scratch
buffer (one read of the INT4 bytes, one write of K' bytes per weight), about 5% of the GEMM's time at
M = 4096. Below ~1024 rows the Triton W4Ax kernel is faster (it reads 4-bit weights directly).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

from cometserve.kernels.weight_layout import HALF, W_TILE
from cometserve.scheme import BLOCK_SIZE

MIN_M = 1024  # rows from which this path beats the Triton kernel (benchmarks/results/*-gemm.md)
_BLK = tl.constexpr(BLOCK_SIZE)
_HALF = tl.constexpr(HALF)
_WT = tl.constexpr(W_TILE)
COPY, HIGH, LOW = 0, 1, 2  # what an expanded activation block holds of its source block
_COPY, _HIGH = tl.constexpr(COPY), tl.constexpr(HIGH)


@dataclass(frozen=True)
class Fp8Plan:
    """Per layer: for each expanded block e (K' / 128 of them), its source block and part."""

    src: torch.Tensor  # int32 [nb']
    part: torch.Tensor  # int32 [nb']: COPY, HIGH or LOW
    low: torch.Tensor  # int32 [nb]: the expanded block holding an INT8 block's LOW part (0: none)

    @property
    def num_blocks(self) -> int:
        return self.src.numel()


def plan(block_bits: torch.Tensor) -> Fp8Plan:
    """Expanded block order: the original blocks in place (INT8 ones as their HIGH part), then the
    LOW parts of the INT8 blocks in block order."""
    bits = block_bits.to(torch.int32)
    nb = bits.numel()
    int8 = torch.nonzero(bits == 8)[:, 0].to(torch.int32)
    src = torch.cat((torch.arange(nb, dtype=torch.int32, device=bits.device), int8))
    part = torch.cat((torch.where(bits == 8, HIGH, COPY).to(torch.int32),
                      torch.full_like(int8, LOW)))
    low = torch.zeros(nb, dtype=torch.int32, device=bits.device)
    low[int8.long()] = nb + torch.arange(int8.numel(), dtype=torch.int32, device=bits.device)
    return Fp8Plan(src.contiguous(), part.contiguous(), low)


@triton.jit
def _expand_weights_kernel(w_ptr, ws_ptr, src_ptr, out_ptr, outs_ptr, NB, N, K_OUT, stride_wsb):
    """One 64-row tile x one expanded block: INT4 tile bytes -> FP8 codes * 16; scales / 16."""
    t = tl.program_id(0)
    e = tl.program_id(1)
    s = tl.load(src_ptr + e)
    r = tl.arange(0, _WT)
    j = tl.arange(0, _HALF)
    wp = tl.load(w_ptr + ((t * NB + s) * _WT + r[:, None]) * _HALF + j[None, :])  # [64, 64] bytes
    lo = ((wp << 4) & 0xF0).to(tl.uint8).to(tl.int8, bitcast=True)  # channel j, code * 16
    hi = (wp & 0xF0).to(tl.uint8).to(tl.int8, bitcast=True)  # channel 64 + j
    rows = t * _WT + r
    base = out_ptr + rows[:, None] * K_OUT + e * _BLK + j[None, :]
    tl.store(base, lo.to(tl.float32).to(out_ptr.dtype.element_ty))
    tl.store(base + _HALF, hi.to(tl.float32).to(out_ptr.dtype.element_ty))
    w_s = tl.load(ws_ptr + s * stride_wsb + rows).to(tl.float32)
    tl.store(outs_ptr + e * N + rows, w_s * 0.0625)


def expand_weights(qweight: torch.Tensor, w_scales: torch.Tensor, p: Fp8Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """The W4Ax kernel's prepared INT4 weights (uint8 [N, K_pad/2] tiled, float16 scales [nb, N]) ->
    (FP8 e4m3 [N, K'] holding code * 16, float32 scales [nb', N] / 16). Per-channel scales ([1, N])
    repeat for every block."""
    n = qweight.shape[0]
    nb = qweight.shape[1] * 2 // BLOCK_SIZE
    ne = p.num_blocks
    out = torch.empty((n, ne * BLOCK_SIZE), dtype=torch.float8_e4m3fn, device=qweight.device)
    scales = torch.empty((ne, n), dtype=torch.float32, device=qweight.device)
    stride_wsb = 0 if w_scales.shape[0] == 1 else w_scales.stride(0)
    _expand_weights_kernel[(n // W_TILE, ne)](qweight, w_scales, p.src, out, scales, nb, n, ne * BLOCK_SIZE,
                                              stride_wsb, num_warps=4)
    return out, scales


@triton.jit(do_not_specialize=["M"])  # one binary for every M (M_PAD is a multiple of 16)
def _split_act_kernel(a_ptr, as_ptr, src_ptr, part_ptr, out_ptr, outs_ptr, M, M_PAD, stride_am, stride_asm,
                      K_OUT, BLOCK_M: tl.constexpr):
    """Rows [i*BM, (i+1)*BM) x one expanded block: int8 codes -> FP8 (copy / high / low part),
    scales transposed to [nb', M_PAD] (the column-major layout cuBLAS wants); pad rows zero."""
    i = tl.program_id(0)
    e = tl.program_id(1)
    s = tl.load(src_ptr + e)
    part = tl.load(part_ptr + e)
    rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, _BLK)
    live = rows < M
    c = tl.load(a_ptr + rows[:, None] * stride_am + s * _BLK + cols[None, :], mask=live[:, None], other=0)
    c = c.to(tl.int32)
    low = c & 15
    v = tl.where(part == _COPY, c, tl.where(part == _HIGH, (c - low) >> 4, low))
    tl.store(out_ptr + rows[:, None] * K_OUT + e * _BLK + cols[None, :],
             v.to(tl.float32).to(out_ptr.dtype.element_ty), mask=rows[:, None] < M_PAD)
    a_s = tl.load(as_ptr + rows * stride_asm + s, mask=live, other=0.0)
    a_s = tl.where(part == _HIGH, a_s * 16.0, a_s)
    tl.store(outs_ptr + e * M_PAD + rows, a_s, mask=rows < M_PAD)


def split_activations(a_codes: torch.Tensor, a_scales: torch.Tensor, p: Fp8Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [M, K_pad], float32 scales [M, nb] -> FP8 [M16, K'] and float32 scales [M16, nb']
    (column-major), M16 = M rounded up to 16 with zero rows."""
    m = a_codes.shape[0]
    m_pad = -(-m // 16) * 16
    ne = p.num_blocks
    out = torch.empty((m_pad, ne * BLOCK_SIZE), dtype=torch.float8_e4m3fn, device=a_codes.device)
    scales_t = torch.empty((ne, m_pad), dtype=torch.float32, device=a_codes.device)
    block_m = 64
    _split_act_kernel[(triton.cdiv(m_pad, block_m), ne)](a_codes, a_scales, p.src, p.part, out, scales_t, m, m_pad,
                                                          a_codes.stride(0), a_scales.stride(0), ne * BLOCK_SIZE,
                                                          BLOCK_M=block_m, num_warps=4)
    return out, scales_t.t()


def w4ax_gemm(a_codes: torch.Tensor, a_scales: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, p: Fp8Plan) -> torch.Tensor:
    """`gemm_w4ax.w4ax_gemm`'s function (its prepared weights, plus the layer's plan) on cuBLAS FP8.
    a_codes: int8 [M, K_pad] codes (split here), or the FP8 operand that quant_act(fp8=p) wrote
    (then a_scales are its column-major scales and the output has its M16 rows)."""
    m = a_codes.shape[0]
    w8, ws = expand_weights(qweight, w_scales, p)
    a8, as_ = (a_codes, a_scales) if a_codes.dtype == torch.float8_e4m3fn else split_activations(a_codes, a_scales, p)
    b = None if bias is None else bias.to(torch.bfloat16)  # added in cuBLAS's epilogue, before rounding
    return torch._scaled_mm(a8, w8.t(), scale_a=as_, scale_b=ws, bias=b, out_dtype=torch.bfloat16)[:m].to(out_dtype)


def can_implement(n: int, k_pad: int, w_bits: int, out_dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    """Whether this path runs here; the reason when it does not."""
    if device.type != "cuda":
        return False, "needs CUDA"
    if w_bits != 4:
        return False, "INT4 weights only"
    if out_dtype != torch.bfloat16:
        return False, "cuBLAS block-scaled FP8 writes bfloat16 only"
    if n % W_TILE or k_pad % BLOCK_SIZE:
        return False, f"N={n} must be a multiple of {W_TILE}"
    return _cublas_block_scaling(device.index if device.index is not None else torch.cuda.current_device())


@cache
def _cublas_block_scaling(device_index: int) -> tuple[bool, str]:
    """cuBLAS 1x128 block scaling exists on compute capability 9.0 with CUDA 12.9+: try it once."""
    if torch.cuda.get_device_capability(device_index) != (9, 0):
        return False, "cuBLAS 128-element block scaling runs on compute capability 9.0 only"
    dev = torch.device("cuda", device_index)
    try:
        a = torch.ones(16, 256, device=dev).to(torch.float8_e4m3fn)  # K = 2 blocks: not rowwise
        b = torch.ones(16, 256, device=dev).to(torch.float8_e4m3fn)
        sa = torch.ones(2, 16, device=dev).t()  # [M, 2] column-major
        sb = torch.full((2, 16), 2.0, device=dev)
        bias = torch.ones(16, device=dev, dtype=torch.bfloat16)
        y = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, bias=bias, out_dtype=torch.bfloat16)
        ok = bool((y == 513).all())
        return ok, "" if ok else "cuBLAS block-scaled FP8 gave a wrong result"
    except (RuntimeError, AttributeError, TypeError) as e:
        return False, f"cuBLAS block-scaled FP8 unavailable: {str(e)[:120]}"
