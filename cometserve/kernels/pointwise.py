"""The small per-layer ops of a decoder layer, each one launch: RMSNorm, rotary embedding of q and k,
SiLU-and-multiply. In eager PyTorch each is 3-15 kernels over tiny tensors; at decode batch sizes
their launches cost more than the math (benchmarks/e2e/profile_decode.py).

References (same signatures) in `kernels/ref.py`: `rms_norm`, `rotary_embedding`, `silu_and_mul`.
All arithmetic is float32 with one rounding to the output dtype at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, H, stride_x, stride_o, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    # the reference's order: round the normalized row to x's dtype, then scale (product in float32)
    y = (xf * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H] -> RMSNorm(x) * weight, in x's dtype."""
    h = x.shape[-1]
    x2 = x.reshape(-1, h)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.result_type(x, weight), device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(h)
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, h, x2.stride(0), out.stride(0), eps, BLOCK=block,
                                         num_warps=4 if block <= 4096 else 8)
    return out.reshape(x.shape)


@triton.jit
def _rotate_heads(ptr, n, row, stride_h, cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Heads [0, n) of one token's row, rotated in place (rotate-half convention), float32 math."""
    h = tl.arange(0, BLOCK_H)[:, None]
    base = ptr + row + h * stride_h + tl.arange(0, HALF)[None, :]
    mask = h < n
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(base, (a * cos - b * sin).to(x1.dtype), mask=mask)
    tl.store(base + HALF, (b * cos + a * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, HQ, HKV, stride_qt, stride_qh, stride_kt, stride_kh,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """One token: every q and k head."""
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos * HALF + d)[None, :]
    sin = tl.load(sin_ptr + pos * HALF + d)[None, :]
    _rotate_heads(q_ptr, HQ, t * stride_qt, stride_qh, cos, sin, HALF, BLOCK_H)
    _rotate_heads(k_ptr, HKV, t * stride_kt, stride_kh, cos, sin, HALF, BLOCK_H)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D] (last dim contiguous), positions [T]; cos/sin float32
    [max_positions, D/2] (attention scaling folded in). Rotates q and k IN PLACE and returns them."""
    t, hq, d = q.shape
    if q.stride(-1) != 1 or k.stride(-1) != 1 or d & (d - 1):
        raise ValueError("rotary_embedding: q/k need a contiguous, power-of-two head dim")
    if t:
        _rotary_kernel[(t,)](q, k, positions, cos, sin, hq, k.shape[1], q.stride(0), q.stride(1), k.stride(0),
                             k.stride(1), HALF=d // 2, BLOCK_H=triton.next_power_of_2(max(hq, k.shape[1])),
                             num_warps=4)
    return q, k


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, N, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + N + offs, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2N] = [gate | up] -> silu(gate) * up [..., N]."""
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, out, n, x2.stride(0), out.stride(0),
                                                                   BLOCK=block, num_warps=4)
    return out.reshape(*x.shape[:-1], n)
