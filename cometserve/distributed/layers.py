"""Tensor-parallel layers. A column-parallel linear needs no class of its own: it is the ordinary
`Linear` or `QuantLinear` holding the rank's output rows (its input, the residual stream, is on
every rank; its output stays split, which is what attention over the rank's heads and the MLP's
silu(gate) * up over the rank's channels want). What needs code is communication:

- `RowParallel` wraps any linear holding the rank's input channels: y = all_reduce(linear(x)) + b.
- `VocabParallelEmbedding` looks up only the rank's vocabulary rows and all-reduces.
- the LM head's logits are all-gathered in `TPLlamaForCausalLM.compute_logits` (model.py).
"""

from __future__ import annotations

import torch
from torch import nn

from cometserve.distributed.context import ParallelContext
from cometserve.distributed.sharding import LinearShard, VocabShard
from cometserve.model.layers.activation import silu_and_mul


class RowParallel(nn.Module):
    """A row-parallel linear: `linear` (Linear or QuantLinear of any precision) holds input channels
    [k0, k1) of the stored order and no bias; the partial products of the ranks are summed by one
    all-reduce, then the bias (owned here, whole on every rank) is added once.

    `input_index` int32 [k1 - k0] (optional): the rank's permuted input channels live on other
    ranks too (an FMPQ permutation that is not block diagonal over the shards), so the full input
    [T, K] is all-gathered first and channel input_index[j] becomes local channel j.
    """

    def __init__(self, linear: nn.Module, tp: ParallelContext, shard: LinearShard, bias: bool,
                 input_index: list[int] | None = None) -> None:
        super().__init__()
        self.linear = linear
        self.tp = tp
        self.tp_shard = shard
        self.in_features, self.out_features = shard.in_full, shard.out_full
        self.bias = nn.Parameter(torch.zeros(shard.out_full)) if bias else None
        index = None if input_index is None else torch.tensor(input_index, dtype=torch.int32)
        self.register_buffer("input_index", index, persistent=False)

    def forward(self, x: torch.Tensor, norm=None, gated: bool = False) -> torch.Tensor:
        """x [T, k1 - k0] (this rank's channels; [T, 2 (k1 - k0)] = [gate | up] if `gated`) ->
        [T, out_features], the same on every rank."""
        if norm is not None:
            raise ValueError("a row-parallel layer's input is split over ranks: it cannot fuse an RMSNorm")
        if self.input_index is not None:
            if gated:  # the gather mixes channels of other ranks: SiLU first
                x, gated = silu_and_mul(x), False
            x = self.tp.all_gather(x, dim=-1).index_select(-1, self.input_index)  # [T, K] -> [T, k1 - k0]
        y = self.tp.all_reduce(self.linear(x, gated=gated))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        k0, k1 = self.tp_shard.k
        gather = ", input all-gathered" if self.input_index is not None else ""
        return f"rank {self.tp.rank}/{self.tp.world_size}, K [{k0}, {k1}) of {self.in_features}{gather}"


class VocabParallelEmbedding(nn.Module):
    """The token embedding split by vocabulary rows: weight [shard.size, hidden] holds token ids
    [start, end) (tail rows zero). Each rank embeds the ids it owns, zeros the others, and one
    all-reduce sums the ranks (exact: every id is non-zero on one rank only)."""

    def __init__(self, weight: nn.Parameter, shard: VocabShard, tp: ParallelContext) -> None:
        super().__init__()
        self.weight = weight
        self.shard = shard
        self.tp = tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] int64 -> [T, hidden]."""
        local = input_ids - self.shard.start
        inside = (local >= 0) & (local < self.shard.end - self.shard.start)
        out = nn.functional.embedding(torch.where(inside, local, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(~inside[:, None], 0))

    def extra_repr(self) -> str:
        s = self.shard
        return f"tokens [{s.start}, {s.end}) in {s.size} rows, rank {self.tp.rank}/{self.tp.world_size}"
