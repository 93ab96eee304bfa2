"""Rotary position embedding (the rotate-half convention of Llama, Mistral and Qwen2).

Frequencies for scaled variants (Llama 3.1's "llama3", linear, YaRN, ...) come from transformers'
own table, so a config is read exactly as transformers reads it."""

from __future__ import annotations

import torch
from torch import nn

from cometserve.kernels import ref


def rope_inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2], attention scaling) for a transformers config."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"config.json: rope_type {rope_type!r} is not supported")
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
        return inv_freq.float(), float(scaling)
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    return 1.0 / (theta**exponent), 1.0


class RotaryEmbedding(nn.Module):
    """Tables of cos/sin (float32 [positions, D/2], scaling folded in) built once per device for
    `max_positions` (the model's context), grown on demand where positions exceed them (a host sync:
    never on the engine's path, whose positions stay under the context). On CUDA (power-of-two head
    dims) one Triton launch rotates q and k in place (kernels/pointwise.py); elsewhere the reference."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float, max_positions: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scaling = scaling
        self.max_positions = max_positions
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def tables(self, device: torch.device, needed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        cur = self._tables
        if cur is None or cur[0].device != device or cur[0].shape[0] < needed:
            n = max(self.max_positions, needed)
            freqs = torch.arange(n, device=device).float()[:, None] * self.inv_freq.to(device)[None, :]
            self._tables = cur = (freqs.cos() * self.scaling, freqs.sin() * self.scaling)
        return cur

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; q [T, Hq, D], k [T, Hkv, D] -> rotated (same dtypes; on CUDA in place)."""
        d = q.shape[-1]
        if positions.is_cuda and d & (d - 1) == 0:  # the kernel's head dims; any other runs the reference
            from cometserve.kernels import pointwise

            return pointwise.rotary_embedding(q, k, positions, *self.tables(positions.device))
        needed = int(positions.max()) + 1 if positions.numel() else 0
        return ref.rotary_embedding(q, k, positions, *self.tables(positions.device, needed))
