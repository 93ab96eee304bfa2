"""FMPQ's block map (COMET section 3.2): outlier channels -> a permutation that gathers them into as
few 128-channel blocks as possible -> INT8 for those blocks, INT4 for every other block."""

from __future__ import annotations

import torch

from cometserve.scheme import BLOCK_SIZE, QuantScheme, num_blocks


def outlier_channels(absmax: torch.Tensor, threshold: float) -> torch.Tensor:
    """Channels whose calibration absmax exceeds `threshold` x the median channel's: bool [K]."""
    return absmax > threshold * absmax.median()


def block_map(absmax: torch.Tensor | None, scheme: QuantScheme, in_features: int) -> tuple[torch.Tensor | None, list[int]]:
    """(perm [K] int64 or None, block_bits [num_blocks]) for one layer input.

    The permutation sorts channels by calibration absmax, largest first: the outliers land in the
    leading blocks (which become INT8) and every INT4 block holds channels of similar magnitude, so
    its per-token scale is not set by a few large neighbours."""
    nb = num_blocks(in_features)
    if scheme.a_mode == "int8":
        return None, [8] * nb
    if scheme.a_mode == "int4":
        return None, [4] * nb
    assert scheme.a_mode == "fmpq" and absmax is not None and absmax.numel() == in_features
    n_out = int(outlier_channels(absmax, scheme.outlier_threshold).sum())
    n_int8 = -(-n_out // BLOCK_SIZE)
    perm = torch.argsort(absmax, descending=True, stable=True)
    return perm, [8] * n_int8 + [4] * (nb - n_int8)


def int8_fraction(layers: dict) -> float:
    """Fraction of activation blocks that run INT8, over every layer input with a block map,
    weighted by block count (the paper's "16% of activations")."""
    bits = [b for spec in layers.values() if spec["block_bits"] for b in spec["block_bits"]]
    return sum(b == 8 for b in bits) / len(bits) if bits else 0.0
