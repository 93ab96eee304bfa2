"""The LLaMA family (Llama 2/3/3.1, Mistral, Qwen2) in one file, for every precision.

Tokens are flat: a forward takes `input_ids [T]` and `positions [T]` of one sequence. q/k/v and
gate/up are fused into one projection each (they read the same input, so they share one FMPQ
permutation and block map). Which linear class each projection gets is decided by `linear_factory`:
the model does not know about precisions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cometserve.config import ModelConfig
from cometserve.model.layers.attention import Attention
from cometserve.model.layers.linear import Linear
from cometserve.model.layers.norm import RMSNorm
from cometserve.model.layers.rotary import RotaryEmbedding
from cometserve.model.plain_cache import PlainKVCache

# (name, in_features, out_features, bias) -> module with forward(x, norm=None)
LinearFactory = Callable[[str, int, int, bool], nn.Module]


def dense_factory(name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
    return Linear(in_features, out_features, bias)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, make: LinearFactory) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.intermediate = i
        self.gate_up_proj = make(f"{prefix}.gate_up_proj", h, 2 * i, cfg.mlp_bias)
        self.down_proj = make(f"{prefix}.down_proj", i, h, cfg.mlp_bias)

    def forward(self, x: torch.Tensor, norm: RMSNorm, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (MLP(norm(x + residual)), x + residual)."""
        h, residual = self.gate_up_proj(x, norm, residual=residual)
        return self.down_proj(h, gated=True), residual  # silu(gate) * up, fused where it can be


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, rotary: RotaryEmbedding, make: LinearFactory) -> None:
        super().__init__()
        p = f"model.layers.{idx}"
        d = cfg.head_dim
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
        qkv = make(f"{p}.self_attn.qkv_proj", cfg.hidden_size, qkv_out, cfg.qkv_bias)
        o = make(f"{p}.self_attn.o_proj", cfg.num_heads * d, cfg.hidden_size, cfg.o_bias)
        self.self_attn = Attention(cfg.num_heads, cfg.num_kv_heads, d, qkv, o, rotary)
        self.mlp = MLP(cfg, f"{p}.mlp", make)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (delta, residual): the layer's output hidden state is delta + residual, an add left to
        whoever reads it next (the next layer's qkv fuses it into its input's RMSNorm). The input
        hidden state is x (+ residual, if given)."""
        h, residual = self.self_attn(x, positions, cache, self.input_layernorm, residual)
        return self.mlp(h, self.post_attention_layernorm, residual)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, make: LinearFactory) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, rotary, make) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, make: LinearFactory = dense_factory) -> None:
        super().__init__()
        self.config = cfg
        self.rotary = rotary
        self.model = LlamaModel(cfg, rotary, make)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.int8_head: nn.Module | None = None  # layers/lm_head.use_lm_head(self, "int8") sets it

    def new_cache(self, kv_bits: int, kv_group_size: int) -> PlainKVCache:
        cfg = self.config
        w = self.model.embed_tokens.weight
        return PlainKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, w.dtype, w.device, kv_bits, kv_group_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: PlainKVCache) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden] (normed)."""
        x, residual = self.model.embed_tokens(input_ids), None
        for layer, layer_cache in zip(self.model.layers, cache.layers):
            x, residual = layer(x, positions, layer_cache, residual)
        return self.model.norm(x + residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, hidden] -> float32 logits [T, vocab]. The LM head stays 16-bit (COMET 3.6)
        unless it was made INT8 (layers/lm_head.py)."""
        return self.local_logits(hidden)

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits over the rows of the LM head this model holds."""
        if self.int8_head is not None:
            return self.int8_head(hidden)
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return nn.functional.linear(hidden, w).float()
