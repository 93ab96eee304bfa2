"""Pure-torch weight quantization and fake quantization: the offline numeric ground truth.

Activation and KV numerics live in `kernels/ref.py` (the serving path needs them); this module
re-exports nothing from there and adds what only the offline path needs."""

from __future__ import annotations

import torch

from cometserve.kernels.ref import round_half_away

MIN_W_SCALE = 2.0**-24  # float16's smallest subnormal: a scale must not round to zero


def weight_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def weight_scales(w: torch.Tensor, bits: int, group_size: int, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Symmetric scales, float16 [N, G]: absmax (times `clip`) / qmax per output channel
    (group_size 0) or per group of `group_size` input channels. K must be a multiple of the group."""
    n, k = w.shape
    g = k if group_size == 0 else group_size
    absmax = w.float().abs().view(n, k // g, g).amax(-1) * clip
    return (absmax / weight_qmax(bits)).clamp(min=MIN_W_SCALE).half()


def quantize_weight(w: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """w [N, K] float, scales float16 [N, G] -> int8 codes [N, K] in -2^(b-1)..2^(b-1)-1."""
    k = w.shape[1]
    g = k // scales.shape[1]
    s = scales.float().repeat_interleave(g, dim=1)
    q = round_half_away(w.float() / s)
    return q.clamp(-(2 ** (bits - 1)), weight_qmax(bits)).to(torch.int8)


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    g = codes.shape[1] // scales.shape[1]
    return codes.float() * scales.float().repeat_interleave(g, dim=1)
