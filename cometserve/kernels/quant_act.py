"""Fused activation quantization (FMPQ, COMET section 3): [RMSNorm ->] gather by the layer's channel
permutation -> per-token, per-128-channel-block symmetric scale -> INT4- or INT8-grid codes, in one
pass over x. Codes go to int8 containers [M, K_pad] (zero padded), scales to float32 [M, nb].
With `residual`, the residual add that precedes the RMSNorm is fused too: the kernel reads x and
the residual, writes their sum (rounded to x's dtype, as torch's add) to a new tensor and quantizes
RMSNorm(sum). For down_proj (its permutation folded into gate_up's rows) the MLP's SiLU-and-multiply
is fused instead: x is [gate | up] and the kernel quantizes silu(gate) * up, computed and rounded to x's
dtype exactly as kernels/pointwise.silu_and_mul does, so the codes equal that op's followed by this one.

Why one pass: this op is a pure byte stream (read 2 bytes, write ~1 byte per channel); every extra
pass over x would cost as much as the whole op. The permutation gather reads x at random channel
positions within one row; a row (K * 2 bytes, 8-56 KB) stays in L1/L2, so DRAM still sees each
byte once.

Numerics are bit-exact with `ref.quant_act` when there is no RMSNorm: the per-block reciprocal is a
correctly rounded division (`div_rn`: a plain `/` on fp32 may lower to an approximate reciprocal on
GPU), codes are `floor(|v|) + (frac(|v|) >= 0.5)` with the sign put back, and FMA contraction is disabled at launch
so every product is rounded exactly as in the reference. The optional Hadamard rotation of INT4
blocks runs the reference's butterfly stages in the same order, so it is bit-exact too. With the fused RMSNorm, the
sum of squares is reduced in another order than torch's, so a rare code may differ by one (tested).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cometserve.kernels import pdl
from cometserve.scheme import BLOCK_SIZE, padded_k

_BLK = tl.constexpr(BLOCK_SIZE)  # a global read inside @triton.jit must be a tl.constexpr


@triton.jit
def _row_rstd(x_row, r_row, K, stride_xk, eps, NORM_BLOCK: tl.constexpr, RESIDUAL: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of one row (of x + residual, rounded), in float32, all roundings
    correct."""
    acc = tl.zeros([NORM_BLOCK], dtype=tl.float32)
    for k0 in range(0, K, NORM_BLOCK):
        offs = k0 + tl.arange(0, NORM_BLOCK)
        v = tl.load(x_row + offs * stride_xk, mask=offs < K, other=0.0)
        if RESIDUAL:
            v = (v.to(tl.float32) + tl.load(r_row + offs, mask=offs < K, other=0.0).to(tl.float32)
                 ).to(x_row.dtype.element_ty)
        v = v.to(tl.float32)
        acc += v * v
    mean = tl.math.div_rn(tl.sum(acc, axis=0), K.to(tl.float32))
    return tl.math.div_rn(1.0, tl.sqrt_rn(mean + eps))


@triton.jit
def _butterfly(v, T: tl.constexpr, H: tl.constexpr):
    """One FWHT stage on v [T, 128]: pairs H apart become (a + b, a - b). The pair axis is moved
    last and split (measured 1.2-3x faster than masked sums over it; same roundings)."""
    x = tl.permute(tl.reshape(v, [T, 64 // H, 2, H]), (0, 1, 3, 2))
    a, b = tl.split(x)
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), [T, 128])


@triton.jit
def _fwht(v, T: tl.constexpr):
    """v [T, 128] float32 -> each row times the orthonormal Hadamard matrix: the butterfly stages
    of `ref.fwht` in the same order (so the same float32 roundings), then the 128^-1/2 scale."""
    v = _butterfly(v, T, 1)
    v = _butterfly(v, T, 2)
    v = _butterfly(v, T, 4)
    v = _butterfly(v, T, 8)
    v = _butterfly(v, T, 16)
    v = _butterfly(v, T, 32)
    v = _butterfly(v, T, 64)
    return v * 0.08838834764831845


@triton.jit(do_not_specialize=["BLOCKS_PER_PROG"])  # follows M: one binary for every M
def _quant_act_kernel(
    x_ptr, perm_ptr, bits_ptr, nw_ptr, codes_ptr, scales_ptr, r_ptr, sum_ptr, low_ptr,  # pointers
    K, NB, BLOCKS_PER_PROG,  # dims
    stride_xm, stride_xk, stride_cm, stride_sm, stride_sb, stride_rm,  # strides (residual, sum: contiguous rows)
    eps,
    HAS_PERM: tl.constexpr, HAS_NORM: tl.constexpr, ROTATE: tl.constexpr,  # meta
    NB_TILE: tl.constexpr, NORM_BLOCK: tl.constexpr, ROW: tl.constexpr, GATED: tl.constexpr,
    RESIDUAL: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr,
):
    # program = (token row, chunk of blocks): small M splits a row over several programs so that
    # all SMs have loads in flight (each re-reads the row statistic's input from L2).
    pdl.wait(PDL)  # x and the residual come from the kernels before
    pdl.launch_dependents(PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    r_row = r_ptr + row.to(tl.int64) * stride_rm
    if ROW > 0:
        # whole row in registers, read once and coalesced; the permutation gather then runs on
        # registers (tl.gather, through shared memory) instead of 2-byte random global loads,
        # which cost one L1 wavefront per element (measured: 23% of the copy rate).
        offs_r = tl.arange(0, ROW)
        xr = tl.load(x_row + offs_r * stride_xk, mask=offs_r < K, other=0.0)
        if RESIDUAL:  # x + residual rounded to x's dtype (torch's add); chunk 0 stores the sum
            xr = (xr.to(tl.float32) + tl.load(r_row + offs_r, mask=offs_r < K, other=0.0).to(tl.float32)
                  ).to(x_ptr.dtype.element_ty)
            if chunk == 0:
                tl.store(sum_ptr + row.to(tl.int64) * stride_rm + offs_r, xr, mask=offs_r < K)
        xr = xr.to(tl.float32)
        if HAS_NORM:
            mean = tl.math.div_rn(tl.sum(xr * xr, axis=0), K.to(tl.float32))
            rstd = tl.math.div_rn(1.0, tl.sqrt_rn(mean + eps))
            xr = xr * rstd * tl.load(nw_ptr + offs_r, mask=offs_r < K, other=0.0).to(tl.float32)
    elif HAS_NORM:
        rstd = _row_rstd(x_row, r_row, K, stride_xk, eps, NORM_BLOCK, RESIDUAL)
    offs_j = tl.arange(0, _BLK)
    offs_t = tl.arange(0, NB_TILE)
    b_start = chunk * BLOCKS_PER_PROG
    b_end = tl.minimum(b_start + BLOCKS_PER_PROG, NB)
    for b0 in range(b_start, b_end, NB_TILE):
        blk = b0 + offs_t  # [T] block ids
        bmask = blk < b_end
        kk = blk[:, None] * _BLK + offs_j[None, :]  # [T, 128] permuted channel ids
        kmask = bmask[:, None] & (kk < K)
        if HAS_PERM:
            src = tl.load(perm_ptr + kk, mask=kmask, other=0)  # original channel of each slot
        else:
            src = kk
        if ROW > 0:
            v = tl.gather(xr, tl.reshape(tl.where(kmask, src, 0), [NB_TILE * _BLK]), 0)
            v = tl.where(kmask, tl.reshape(v, [NB_TILE, _BLK]), 0.0)
        elif GATED:  # x row = [gate | up], K wide each; pointwise._silu_and_mul_kernel's arithmetic
            g = tl.load(x_row + src * stride_xk, mask=kmask, other=0.0).to(tl.float32)
            u = tl.load(x_row + (src + K) * stride_xk, mask=kmask, other=0.0).to(tl.float32)
            v = (g / (1.0 + tl.exp(-g)) * u).to(x_ptr.dtype.element_ty).to(tl.float32)
        else:
            v = tl.load(x_row + src * stride_xk, mask=kmask, other=0.0)
            if RESIDUAL:  # each program stores the sum of its own blocks' channels
                v = (v.to(tl.float32) + tl.load(r_row + src, mask=kmask, other=0.0).to(tl.float32)
                     ).to(x_ptr.dtype.element_ty)
                tl.store(sum_ptr + row.to(tl.int64) * stride_rm + src, v, mask=kmask)
            v = v.to(tl.float32)
            if HAS_NORM:
                v = v * rstd * tl.load(nw_ptr + src, mask=kmask, other=0.0).to(tl.float32)
        bits = tl.load(bits_ptr + blk, mask=bmask, other=4)
        if ROTATE:  # INT4 blocks are Hadamard-rotated (scheme.a_rotation)
            v = tl.where((bits == 4)[:, None], _fwht(v, NB_TILE), v)
        absmax = tl.max(tl.abs(v), axis=1)  # [T]
        qmax = tl.where(bits == 8, 127.0, 7.0)
        inv = tl.where(absmax > 0, tl.math.div_rn(qmax, tl.where(absmax > 0, absmax, 1.0)), 0.0)
        q = v * inv[:, None]
        a = tl.abs(q)
        fl = tl.floor(a)
        mag = tl.minimum(fl + tl.where(a - fl >= 0.5, 1.0, 0.0), qmax[:, None])  # round half away from zero
        codes = tl.where(q < 0, -mag, mag)
        scale = tl.math.div_rn(absmax, qmax)
        if FP8:  # gemm_fp8's operand: an INT8 block c = 16 h + l as h (scale * 16) in place, l appended
            c = codes.to(tl.int32)
            low = c & 15
            is8 = bmask & (bits == 8)
            main = tl.where(is8[:, None], (c - low) >> 4, c)
            tl.store(codes_ptr + row * stride_cm + kk, main.to(tl.float32).to(codes_ptr.dtype.element_ty),
                     mask=bmask[:, None])
            e_low = tl.load(low_ptr + blk, mask=is8, other=0)  # expanded block of the low part
            tl.store(codes_ptr + row * stride_cm + e_low[:, None] * _BLK + offs_j[None, :],
                     low.to(tl.float32).to(codes_ptr.dtype.element_ty), mask=is8[:, None])
            tl.store(scales_ptr + row * stride_sm + blk * stride_sb, tl.where(is8, scale * 16.0, scale), mask=bmask)
            tl.store(scales_ptr + row * stride_sm + e_low * stride_sb, scale, mask=is8)
        else:
            tl.store(codes_ptr + row * stride_cm + kk, codes.to(tl.int8), mask=bmask[:, None])
            tl.store(scales_ptr + row * stride_sm + blk * stride_sb, scale, mask=bmask)


class _SmCount:
    """Multiprocessor count per device, read once (used to size the grid for small M)."""

    def __init__(self) -> None:
        self.cache: dict[torch.device, int] = {}

    def __call__(self, device: torch.device) -> int:
        if device.type != "cuda":
            return 4
        if device not in self.cache:
            self.cache[device] = torch.cuda.get_device_properties(device).multi_processor_count
        return self.cache[device]


_SM_COUNT = _SmCount()


MAX_ROW = 16384  # widest row held in registers for the gather path (64 fp32 per thread)
MAX_TILE = 32  # most blocks one program quantizes at once (measured: 64 is 18% slower at K = 8192)


def _grid_shape(m: int, nb: int, sms: int, max_tile: int) -> tuple[int, int, int]:
    """(NB_TILE, blocks per program, chunks per row): enough programs for ~4 per SM, each program's
    blocks in as few tiles as `max_tile` allows (the gather path re-stages the row per tile)."""
    chunks = max(1, min(triton.cdiv(4 * sms, m), triton.cdiv(nb, 8)))
    nb_tile = min(max_tile, triton.next_power_of_2(triton.cdiv(nb, chunks)))
    per = triton.cdiv(triton.cdiv(nb, chunks), nb_tile) * nb_tile
    return nb_tile, per, triton.cdiv(nb, per)


def _launch(x, k, perm, block_bits, norm_weight, eps, rotate, gated, codes, scales, residual=None,
            total=None, low=None) -> None:
    """scales [M, nb] (any strides); with `low` (gemm_fp8.Fp8Plan.low) codes are FP8 [M', K']."""
    m = x.shape[0]
    nb = block_bits.numel()
    # without a permutation the blocks are read in place (RMSNorm's statistic in a first pass)
    row = triton.next_power_of_2(k) if perm is not None and triton.next_power_of_2(k) <= MAX_ROW else 0
    nb_tile, per, chunks = _grid_shape(m, nb, _SM_COUNT(x.device), MAX_TILE if row else 8)
    _quant_act_kernel[(m, chunks)](
        x, perm if perm is not None else codes, block_bits,
        norm_weight if norm_weight is not None else x, codes, scales,
        residual if residual is not None else x, total if total is not None else x,
        low if low is not None else block_bits,
        k, nb, per,
        x.stride(0), x.stride(1), codes.stride(0), scales.stride(0), scales.stride(1), k,
        float(eps),
        HAS_PERM=perm is not None, HAS_NORM=norm_weight is not None, ROTATE=rotate,
        NB_TILE=nb_tile, NORM_BLOCK=min(4096, triton.next_power_of_2(k)), ROW=row, GATED=gated,
        RESIDUAL=residual is not None, FP8=low is not None,
        num_warps=16 if max(row, nb_tile * BLOCK_SIZE) >= 8192 else 8 if row or nb_tile * BLOCK_SIZE > 512 else 4,
        enable_fp_fusion=False,  # v * inv must round before + 0.5, as in the reference
        **pdl.launch_kwargs(x),
    )


def can_implement(k: int, device: torch.device) -> tuple[bool, str]:
    """Whether the fused kernel runs for a layer input of `k` channels on `device`."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"fused activation quantization needs a CUDA device, got {device.type}"
    if k <= 0 or k >= 2**31 // 8:
        return False, f"K={k} out of range"
    return True, ""


def quant_act(
    x: torch.Tensor,
    perm: torch.Tensor | None,
    block_bits: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    rotate: bool = False,
    gated: bool = False,
    residual: torch.Tensor | None = None,
    fp8=None,
) -> tuple[torch.Tensor, ...]:
    """x [M, K] float (any strides) -> (a_codes int8 [M, K_pad], a_scales float32 [M, nb]), and
    with `residual` ([M, K] contiguous, x's dtype) also x + residual [M, K]: what is quantized is
    then [RMSNorm](x + residual).
    With `fp8` (the layer's gemm_fp8.Fp8Plan) the codes are written as the cuBLAS FP8 path's
    operand instead, what gemm_fp8.split_activations makes of the int8 codes (saves that pass):
    FP8 [M16, K'] and column-major float32 scales [M16, nb'], M16 = M rounded up to 16 (zero rows).

    perm: [K] int (slot j reads channel perm[j]) or None; block_bits: [nb] int, 4 or 8;
    norm_weight: [K] in the original channel order (fuses RMSNorm) or None; rotate: Hadamard-rotate
    the INT4 blocks before quantizing them; gated: x is [M, 2K] = [gate | up] and silu(gate) * up is
    quantized (fused where there is no perm; with one, pointwise.silu_and_mul runs first; no norm)."""
    assert x.dim() == 2 and x.dtype in (torch.float16, torch.bfloat16, torch.float32), (
        f"x must be a 2-D float tensor [M, K], got {x.dtype} {tuple(x.shape)}")
    assert not gated or (norm_weight is None and x.shape[1] % 2 == 0), "a gated input [M, 2K] takes no RMSNorm"
    if gated and perm is not None:  # the fused SiLU reads its channels in place, not through a gather
        from cometserve.kernels.pointwise import silu_and_mul

        x, gated = silu_and_mul(x), False
    m, k = x.shape[0], x.shape[1] // 2 if gated else x.shape[1]
    k_pad = padded_k(k)
    nb = block_bits.numel()
    assert nb * BLOCK_SIZE == k_pad, f"block_bits has {nb} blocks, K={k} needs {k_pad // BLOCK_SIZE}"
    assert perm is None or (perm.shape == (k,) and perm.is_contiguous()), "perm must be contiguous [K]"
    assert norm_weight is None or (norm_weight.shape == (k,) and norm_weight.is_contiguous()), (
        "norm_weight must be contiguous [K]")
    for t in (perm, block_bits, norm_weight):
        assert t is None or t.device == x.device, f"all inputs must be on {x.device}, got {t.device}"
    perm = perm.to(torch.int32) if perm is not None else None
    block_bits = block_bits.contiguous()
    assert residual is None or (residual.shape == x.shape and residual.dtype == x.dtype and not gated
                                and residual.is_contiguous()), "residual must be contiguous, x's shape and dtype"
    total = torch.empty_like(residual) if residual is not None else None
    if fp8 is None:
        codes = torch.empty((m, k_pad), dtype=torch.int8, device=x.device)
        scales = torch.empty((m, nb), dtype=torch.float32, device=x.device)
    else:
        assert fp8.low.shape == (nb,) and fp8.low.device == x.device, "fp8 plan of another layer"
        m16 = -(-m // 16) * 16
        codes = torch.empty((m16, fp8.num_blocks * BLOCK_SIZE), dtype=torch.float8_e4m3fn, device=x.device)
        scales = torch.empty((fp8.num_blocks, m16), dtype=torch.float32, device=x.device).t()
        if m16 > m:
            codes[m:].zero_()
            scales[m:].zero_()
    if m > 0:
        _launch(x, k, perm, block_bits, norm_weight, eps, rotate, gated, codes, scales, residual, total,
                None if fp8 is None else fp8.low)
    return (codes, scales) if residual is None else (codes, scales, total)
