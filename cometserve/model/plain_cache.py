"""A contiguous per-sequence KV cache with COMET's INT4 numerics (one sequence, for the reference path).

K and V are stored as INT4 codes with a float16 (scale, zero) per (head, channel) for every full group
of `group_size` tokens; the newest partial group stays 16-bit until it fills (scheme.py). Attention
always reads the cache after the step's tokens were written, so a chunked prefill sees exactly the
same values as a whole one. The paged engine cache replaces this for serving."""

from __future__ import annotations

import torch

from cometserve.kernels import ref


class LayerCache:
    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device, kv_bits: int, group: int):
        self.kv_bits, self.group, self.dtype = kv_bits, group, dtype
        empty = torch.empty(0, kv_heads, head_dim, dtype=dtype, device=device)
        self.window_k, self.window_v = empty, empty  # 16-bit tokens not yet quantized
        self.groups_k: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.groups_v: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.deq_k, self.deq_v = empty, empty  # dequantized full groups, kept to avoid re-decoding

    def __len__(self) -> int:
        return self.deq_k.shape[0] + self.window_k.shape[0]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [T, Hkv, D]; return all keys and values [L, Hkv, D] as attention reads them."""
        self.window_k = torch.cat((self.window_k, k.to(self.dtype)))
        self.window_v = torch.cat((self.window_v, v.to(self.dtype)))
        if self.kv_bits == 4:
            while self.window_k.shape[0] >= self.group:
                self._quantize_oldest_group()
        return torch.cat((self.deq_k, self.window_k)), torch.cat((self.deq_v, self.window_v))

    def attend(self, q, k, v, positions, scale: float, rotary) -> torch.Tensor:
        """RoPE on q [T, Hq, D] and k [T, Hkv, D], write k, v, then causal attention of q at
        `positions` over the cache."""
        q, k = rotary(positions, q, k)
        keys, values = self.update(k, v)
        return ref.attention(q, keys, values, positions, scale)

    def _quantize_oldest_group(self) -> None:
        g = self.group
        for window, groups, name in ((self.window_k, self.groups_k, "k"), (self.window_v, self.groups_v, "v")):
            codes, scale, zero = ref.quantize_kv(window[:g])
            groups.append((codes, scale, zero))
            deq = ref.dequantize_kv(codes, scale, zero, self.dtype)
            setattr(self, f"deq_{name}", torch.cat((getattr(self, f"deq_{name}"), deq)))
        self.window_k, self.window_v = self.window_k[g:], self.window_v[g:]


class PlainKVCache:
    """One LayerCache per decoder layer, for one sequence."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype, device, kv_bits: int, group: int):
        self.layers = [LayerCache(kv_heads, head_dim, dtype, device, kv_bits, group) for _ in range(num_layers)]

    def __len__(self) -> int:
        return len(self.layers[0])
