"""The prepared weight layout the W4Ax GEMM kernels read (the Triton kernel of gemm_w4ax.py, the
wgmma kernel of gemm_wgmma.py and the FP8 expansion of gemm_fp8.py): produced once at load from the
checkpoint's plain layout, which does not change when a kernel does."""

from __future__ import annotations

import torch

from cometserve.scheme import BLOCK_SIZE

HALF = BLOCK_SIZE // 2  # channels per nibble half of a block
W_TILE = 64  # weight rows per contiguous tile in the prepared layout (the smallest BLOCK_N)


def prepare_weights(qweight: torch.Tensor, w_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint layout -> kernel layout, once at load. Same shapes, other byte order.

    INT4 uint8 [N, K_pad/2] (byte i = codes 2i low, 2i+1 high): within each 128-channel block, byte
    j holds channel j (low nibble) and channel 64 + j (high nibble), so the two masks yield two
    contiguous K=64 operands. INT8 int8 [N, K_pad]: codes unchanged.
    Both are then tiled [N/64, nb, 64, row bytes] (stored as the same 2-D shape): the kernel reads a
    weight tile as one contiguous 4-8 KB run. Row-major rows would give 64-byte pieces 2-14 KB
    apart, which DRAM serves at a fraction of its streaming rate (decode is a weight stream).
    w_scales float16 [N, G] -> float16 [G, N] contiguous: one block's BN scales are one vector load.
    """
    assert w_scales.dim() == 2 and w_scales.shape[0] == qweight.shape[0], f"w_scales {tuple(w_scales.shape)}"
    n, row_bytes = qweight.shape
    assert n % W_TILE == 0, f"N={n} must be a multiple of {W_TILE} (can_implement refuses it)"
    if qweight.dtype == torch.uint8:
        p = qweight.to(torch.int16)
        codes = torch.stack((p & 0xF, (p >> 4) & 0xF), dim=-1).reshape(n, row_bytes * 2)  # nibbles
        codes = codes.view(n, -1, 2, HALF)  # [N, nb, half, 64]
        tiles = (codes[:, :, 0, :] | (codes[:, :, 1, :] << 4)).to(torch.uint8)  # [N, nb, 64]
    else:
        assert qweight.dtype == torch.int8, f"qweight must be uint8 (INT4) or int8, got {qweight.dtype}"
        tiles = qweight.view(n, -1, BLOCK_SIZE)  # [N, nb, 128]
    nb = tiles.shape[1]
    tiles = tiles.view(n // W_TILE, W_TILE, nb, -1).permute(0, 2, 1, 3)  # [N/64, nb, 64, row bytes]
    return tiles.contiguous().view(n, row_bytes), w_scales.to(torch.float16).t().contiguous()
