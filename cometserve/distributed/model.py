"""The one LLaMA model (model/llama.py), split over the ranks of a ParallelContext.

The model is built with a per-rank `ModelConfig` (num_heads, num_kv_heads and intermediate_size
divided by the world size; hidden size, head_dim and vocab_size whole), so attention splits its qkv
output into the rank's heads and the MLP its gate_up output into the rank's channels without
knowing about ranks; `model.config` stays that per-rank config, so the engine's KVStorage allocates
the rank's KV heads only. The linear factory decides each projection's role (qkv_proj, gate_up_proj:
column-parallel; o_proj, down_proj: row-parallel) and the subclass swaps in the vocabulary-parallel
embedding and gathers the logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from cometserve.config import ModelConfig
from cometserve.distributed.context import ParallelContext
from cometserve.distributed.layers import RowParallel, VocabParallelEmbedding
from cometserve.distributed.sharding import (
    KV_WHY,
    LinearShard,
    TensorParallelError,
    even_split,
    gate_up_rows,
    qkv_rows,
    row_parallel_k,
    vocab_shard,
)
from cometserve.model.layers.rotary import RotaryEmbedding, rope_inv_freq
from cometserve.model.llama import LinearFactory, LlamaForCausalLM, dense_factory

# (name, in_features, out_features, bias, shard) -> (module of those local features, input_index or None)
ShardedBuilder = Callable[[str, int, int, bool, LinearShard], tuple[nn.Module, "list[int] | None"]]


def local_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The per-rank shapes: heads, KV heads and MLP channels divided by `world` (checked to divide)."""
    check_splittable(cfg, world, blocks=False)
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // world, num_kv_heads=cfg.num_kv_heads // world,
                               intermediate_size=cfg.intermediate_size // world)


def check_splittable(cfg: ModelConfig, world: int, blocks: bool) -> None:
    """Raise TensorParallelError naming the first shape that does not split over `world` ranks.
    `blocks`: the row-parallel layers' K must also split into whole 128-channel blocks."""
    if world < 1:
        raise TensorParallelError(f"tensor-parallel size must be >= 1, got {world}")
    even_split(cfg.num_heads, 0, world, "num_attention_heads")
    even_split(cfg.num_kv_heads, 0, world, "num_key_value_heads", KV_WHY)
    even_split(cfg.intermediate_size, 0, world, "intermediate_size")
    row_parallel_k(cfg.num_heads * cfg.head_dim, 0, world, blocks, "o_proj")
    row_parallel_k(cfg.intermediate_size, 0, world, blocks, "down_proj")


def linear_shard(name: str, cfg: ModelConfig, rank: int, world: int, blocks: bool) -> LinearShard:
    """The split of projection `name` (e.g. model.layers.3.mlp.down_proj) for `rank`."""
    kind = name.rsplit(".", 1)[-1]
    h, d = cfg.hidden_size, cfg.head_dim
    if kind == "qkv_proj":
        rows = qkv_rows(cfg.num_heads, cfg.num_kv_heads, d, rank, world)
        return LinearShard("column", h, (cfg.num_heads + 2 * cfg.num_kv_heads) * d, rows=rows)
    if kind == "gate_up_proj":
        return LinearShard("column", h, 2 * cfg.intermediate_size, rows=gate_up_rows(cfg.intermediate_size, rank, world))
    if kind == "o_proj":
        k = cfg.num_heads * d
        return LinearShard("row", k, h, k=row_parallel_k(k, rank, world, blocks, name))
    if kind == "down_proj":
        k = cfg.intermediate_size
        return LinearShard("row", k, h, k=row_parallel_k(k, rank, world, blocks, name))
    raise TensorParallelError(f"no tensor-parallel rule for layer {name!r}")


def plain_builder(make: LinearFactory = dense_factory) -> ShardedBuilder:
    """A builder from an ordinary linear factory (local shapes in, module out; no input gather)."""
    return lambda name, in_features, out_features, bias, shard: (make(name, in_features, out_features, bias), None)


def tp_linear_factory(cfg: ModelConfig, tp: ParallelContext, build: ShardedBuilder, blocks: bool) -> LinearFactory:
    """The model's LinearFactory (it is called with per-rank shapes) for full config `cfg`."""

    def make(name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
        shard = linear_shard(name, cfg, tp.rank, tp.world_size, blocks)
        if shard.role == "column":
            assert out_features == sum(b - a for a, b in shard.rows), (name, out_features, shard)
            module, _ = build(name, in_features, out_features, bias, shard)
            module.tp_shard = shard  # read by the loader: which rows of the checkpoint tensors
            return module
        assert in_features == shard.k[1] - shard.k[0], (name, in_features, shard)
        module, input_index = build(name, in_features, out_features, False, shard)
        return RowParallel(module, tp, shard, bias, input_index)

    return make


class TPLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM holding one rank's shard. `config` is the per-rank config (vocab_size whole);
    `full_config` the model's. The embedding and LM head hold vocabulary rows `vocab` (padded)."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, make: LinearFactory, tp: ParallelContext) -> None:
        local = local_config(cfg, tp.world_size)
        vocab = vocab_shard(cfg.vocab_size, tp.rank, tp.world_size)
        # built with vocab_size = the rank's rows: the parent allocates only this rank's embedding
        # and LM head rows; the per-rank config with the whole vocabulary is restored after
        super().__init__(dataclasses.replace(local, vocab_size=vocab.size), rotary, make)
        self.config, self.full_config, self.vocab, self.tp = local, cfg, vocab, tp
        self.model.embed_tokens = VocabParallelEmbedding(self.model.embed_tokens.weight, vocab, tp)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, hidden] -> float32 logits [T, vocab], all-gathered: the same on every rank."""
        local = self.local_logits(hidden)  # [T, vocab.size]
        return self.tp.all_gather(local, dim=-1)[:, : self.config.vocab_size]


def build_tp_model(hf_config, tp: ParallelContext, build: ShardedBuilder | None = None,
                   blocks: bool = False) -> TPLlamaForCausalLM:
    """The rank's shard of the model for a transformers config (weights uninitialized). `blocks`:
    the checkpoint is quantized, so row-parallel K splits must keep whole 128-channel blocks."""
    cfg = ModelConfig.from_hf(hf_config)
    check_splittable(cfg, tp.world_size, blocks)
    inv_freq, scaling = rope_inv_freq(hf_config, cfg.head_dim)
    make = tp_linear_factory(cfg, tp, build or plain_builder(), blocks)
    return TPLlamaForCausalLM(cfg, RotaryEmbedding(inv_freq, scaling, cfg.max_model_len), make, tp)
