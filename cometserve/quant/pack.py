"""Integer codes -> the checkpoint's plain storage layout, with the exact inverse in kernels/ref.py."""

from __future__ import annotations

import torch


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] codes in -8..7 (K even) -> uint8 [N, K/2]; code 2i in the low nibble of byte i.

    The inverse is `cometserve.kernels.ref.unpack_int4`; kernels re-lay this out at load time."""
    if codes.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 codes, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even K, got {codes.shape[-1]}")
    if codes.numel() and (codes.min() < -8 or codes.max() > 7):
        raise ValueError("pack_int4: codes outside the signed 4-bit range -8..7")
    u = (codes.to(torch.int16) & 0xF).view(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return (u[..., 0] | (u[..., 1] << 4)).to(torch.uint8)
