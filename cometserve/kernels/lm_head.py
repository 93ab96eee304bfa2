"""Weight-only INT8 LM head: float32 logits [M, V] = (x [M, K] . codes [V, K]^T) * scales [V], with
x in 16-bit and the codes widened to it in registers (every INT8 code is exact in bf16 and fp16), so
the products are those of the 16-bit matrix the codes stand for; the sum runs in float32 on tensor
cores. The LM head is the largest single matrix of a Llama (128256 x 4096 for Llama 3 8B: 1.05 GB in
bf16); at batch 1 reading it is ~10% of a W4AxKV4 decode step, and INT8 codes halve that.

Measured on one H200 (K 4096, N 128256, CUDA-graph medians, us, cuBLAS bf16 / this kernel at the
tiles `_config` picks): M 1 275 / 124, M 16 244 / 130, M 64 272 / 220, M 128 266 / 317, M 256 366 /
650-671, M 512 730 / 1251: faster up to 64 rows, slower above (no tile of 6 tried closes that; cuBLAS
FP8 `_scaled_mm` is faster there, but quantizes the activations too: other numerics; a weight-only
FP8 head in this kernel did not compile). Same function as `ref.w8a16_logits`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The interpreter computes bf16 / fp16 tl.dot wrongly (measured, Triton 3.x): under it both
# operands go to float32 (exact for INT8 codes; the CPU suite checks indexing and masking).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _w8a16_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_F32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + kk[None, :],
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :].to(tl.int64) * K + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K),
                    other=0)
        if DOT_F32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc)
        else:
            acc = tl.dot(x, w.to(x_ptr.dtype.element_ty), acc)
    s = tl.load(s_ptr + rn, mask=rn < N, other=0.0)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], acc * s[None, :],
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _config(m: int) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, warps, stages) by the number of rows (the best of the H200 sweeps, module doc)."""
    if m <= 16:
        return 16, 64, 256, 4, 3
    if m <= 64:
        return 64, 128, 128, 4, 3
    return 128, 128, 64, 8, 3


def w8a16_logits(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16/fp16 (rows contiguous), codes int8 [N, K] contiguous, scales float32 [N] ->
    float32 logits [M, N]."""
    m, k = x.shape
    n = codes.shape[0]
    if codes.shape != (n, k) or codes.dtype != torch.int8 or scales.shape != (n,) or x.stride(1) != 1:
        raise ValueError(f"w8a16_logits: x {tuple(x.shape)} (unit stride along K), codes int8 [N, {k}] and "
                         f"scales [N] expected, got codes {codes.dtype} {tuple(codes.shape)}, scales {tuple(scales.shape)}")
    y = torch.empty((m, n), dtype=torch.float32, device=x.device)
    if m == 0:
        return y
    bm, bn, bk, warps, stages = _config(m)
    _w8a16_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](
        x, codes.contiguous(), scales.float().contiguous(), y, m, n, k, x.stride(0), y.stride(0),
        BM=bm, BN=bn, BK=bk, DOT_F32=_INTERPRET, num_warps=warps, num_stages=stages)
    return y
