"""SiLU-and-multiply of the gated MLP: one Triton launch on CUDA, the reference elsewhere."""

from __future__ import annotations

import torch

from cometserve.kernels import ref


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2N] = [gate | up] -> silu(gate) * up [..., N]."""
    if x.is_cuda:
        from cometserve.kernels import pointwise

        return pointwise.silu_and_mul(x)
    return ref.silu_and_mul(x)
