"""Round to nearest: the baseline weight rounding."""

from __future__ import annotations

import torch

from cometserve.quant.primitives import quantize_weight, weight_scales


def round_weight(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (K a multiple of the group) -> (int8 codes [N, K], float16 scales [N, G])."""
    scales = weight_scales(w, bits, group_size)
    return quantize_weight(w, scales, bits), scales
