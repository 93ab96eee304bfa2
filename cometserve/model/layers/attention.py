"""Self-attention with a fused QKV projection, RoPE and GQA over a KV cache.

The cache object of each layer does RoPE, the write and the attention read together
(`cache.attend(q, k, v, positions, scale, rotary)`; a cache may fuse the rotation into its write):
the plain per-sequence cache (reference path) and the engine's paged INT4 cache (one batch of
ragged sequences, metadata built once per step) plug in here without the model knowing which one
it has."""

from __future__ import annotations

import torch
from torch import nn

from cometserve.model.layers.norm import RMSNorm
from cometserve.model.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, qkv_proj, o_proj, rotary) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.qkv_proj, self.o_proj = qkv_proj, o_proj
        self.rotary: RotaryEmbedding = rotary
        self.scale = head_dim**-0.5

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache, norm: RMSNorm,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] (+ residual: the pre-norm residual stream); positions [T] -> (attention
        output [T, hidden], x + residual)."""
        t = x.shape[0]
        if residual is None:
            qkv, residual = self.qkv_proj(x, norm), x
        else:
            qkv, residual = self.qkv_proj(x, norm, residual=residual)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        out = cache.attend(q, k, v, positions, self.scale, self.rotary)
        return self.o_proj(out.reshape(t, q_size)), residual
