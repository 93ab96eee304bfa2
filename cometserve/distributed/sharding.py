"""Which part of each full tensor a rank holds. Pure functions of shapes and ranks: no process group.

Every rule here is stated in the coordinates of the checkpoint ("stored order"): output rows as
stored, input columns in the layer's permuted FMPQ order (that is how `qweight`, `w_scales` and
`block_bits` are laid out on disk). See the package docstring for why that is the right space.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cometserve.scheme import BLOCK_SIZE, num_blocks, padded_k

Range = tuple[int, int]  # [start, end)
KV_WHY = ": each rank holds whole KV heads with their INT4 caches (KV heads are not replicated)"


class TensorParallelError(ValueError):
    """A model, layer or checkpoint cannot be split over the requested number of ranks."""


def even_split(n: int, rank: int, world: int, what: str, why: str = "") -> Range:
    """The rank's contiguous 1/world of range(n); refuses an uneven split, naming `what` (and `why`)."""
    if n % world:
        raise TensorParallelError(f"{what} ({n}) is not divisible by the tensor-parallel size {world}{why}")
    per = n // world
    return rank * per, (rank + 1) * per


def qkv_rows(num_heads: int, num_kv_heads: int, head_dim: int, rank: int, world: int) -> tuple[Range, ...]:
    """Rows of the fused qkv weight ([q heads | k heads | v heads] x head_dim) that rank keeps: its own
    q heads, then its own k heads, then the matching v heads; GQA groups stay whole because the q
    heads of kv head j are q heads j*g..(j+1)*g-1 and both are split into the same contiguous slices."""
    q0, q1 = even_split(num_heads, rank, world, "num_attention_heads")
    k0, k1 = even_split(num_kv_heads, rank, world, "num_key_value_heads", KV_WHY)
    q_end, k_end = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
    return ((q0 * head_dim, q1 * head_dim), (q_end + k0 * head_dim, q_end + k1 * head_dim),
            (k_end + k0 * head_dim, k_end + k1 * head_dim))


def gate_up_rows(intermediate: int, rank: int, world: int) -> tuple[Range, ...]:
    """Rows of the fused [gate | up] weight that rank keeps: the same slice of gate and of up, so
    silu(gate) * up pairs the right channels. In a checkpoint whose down_proj permutation is folded
    into these rows, the slice is of the permuted order, the order down_proj's K columns are in."""
    a, b = even_split(intermediate, rank, world, "intermediate_size")
    return (a, b), (intermediate + a, intermediate + b)


def row_parallel_k(in_features: int, rank: int, world: int, blocks: bool, name: str) -> Range:
    """Input channels [k0, k1) (stored order) of a row-parallel layer on `rank`. With quantized
    activations or grouped weight scales (`blocks`), every rank must hold whole 128-channel blocks."""
    k0, k1 = even_split(in_features, rank, world, f"{name} in_features")
    if blocks and world > 1 and (k1 - k0) % BLOCK_SIZE:
        raise TensorParallelError(
            f"{name}: in_features {in_features} is {num_blocks(in_features)} blocks of {BLOCK_SIZE} "
            f"channels; {world} ranks would split a block (each rank needs a whole number of blocks)")
    return k0, k1


@dataclass(frozen=True)
class VocabShard:
    """Vocabulary rows [start, end) of the rank, held in `size` rows (the tail zero padded, so every
    rank's logits have the same width and can be all-gathered)."""

    start: int
    end: int
    size: int


def vocab_shard(vocab: int, rank: int, world: int) -> VocabShard:
    per = -(-vocab // world)
    start = min(rank * per, vocab)
    return VocabShard(start, min(start + per, vocab), per)


@dataclass(frozen=True)
class Shard:
    """The rank's part of one full tensor: along `dim`, the concatenation of `pieces` (ranges of the
    full tensor; empty = the whole dim), zero padded to `size` rows if given. `full` is the full
    tensor's length along `dim` (checked at load)."""

    dim: int = 0
    pieces: tuple[Range, ...] = ()
    full: int | None = None
    size: int | None = None

    def take(self, narrow: Callable[[int, int, int], torch.Tensor], full_len: int) -> torch.Tensor:
        """Assemble the shard from `narrow(dim, start, end)` of the full tensor (which may be lazy:
        a safetensors slice) whose length along dim is `full_len`."""
        parts = [narrow(self.dim, a, b) for a, b in (self.pieces or ((0, full_len),))]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)
        if self.size is not None and out.shape[self.dim] < self.size:
            pad = list(out.shape)
            pad[self.dim] = self.size - out.shape[self.dim]
            out = torch.cat((out, torch.zeros(pad, dtype=out.dtype)), dim=self.dim)
        return out

    def of(self, full: torch.Tensor) -> torch.Tensor:
        """The shard of an in-memory tensor."""
        return self.take(lambda d, a, b: full.narrow(d, a, b - a), full.shape[self.dim])


WHOLE = Shard()


@dataclass(frozen=True)
class LinearShard:
    """How one linear layer is split. column: output rows `rows` (full coordinates); row: input
    channels `k` [k0, k1) of the stored (permuted) order. `in_full`/`out_full`: unsplit shape."""

    role: str
    in_full: int
    out_full: int
    rows: tuple[Range, ...] = ()
    k: Range | None = None

    def tensor(self, param: str, local: torch.Tensor, full_shape: tuple[int, ...]) -> Shard:
        """The Shard of checkpoint tensor `<layer>.<param>` (shape `full_shape`) whose local copy is
        `local`."""
        if self.role == "column":
            return Shard(0, self.rows, self.out_full)
        if param == "bias":  # owned by the row-parallel wrapper, added once after the all-reduce
            return WHOLE
        k0, k1 = self.k
        if param == "weight":
            return Shard(1, ((k0, k1),), self.in_full)
        k_pad = padded_k(self.in_full)
        kp1 = k_pad if k1 == self.in_full else k1  # the last rank also holds the zero padding
        if param == "qweight":  # packed INT4: two codes per byte; int8: one
            per_byte = 2 if local.dtype == torch.uint8 else 1
            return Shard(1, ((k0 // per_byte, kp1 // per_byte),), k_pad // per_byte)
        if param == "w_scales":
            if full_shape[1] == 1:  # one scale per output channel: every rank needs it
                return WHOLE
            return Shard(1, ((k0 // BLOCK_SIZE, kp1 // BLOCK_SIZE),), k_pad // BLOCK_SIZE)
        raise TensorParallelError(f"no sharding rule for row-parallel tensor {param!r}")


@dataclass(frozen=True)
class LayerQuantShard:
    """A quantized layer's rank-local activation metadata. `perm`: the local gather (new local
    channel j reads local input channel perm[j]) or None; `input_index`: set instead when the rank's
    blocks read channels that other ranks hold, so the full input must be all-gathered first (new
    local channel j reads full input channel input_index[j])."""

    block_bits: list[int] | None
    perm: list[int] | None
    input_index: list[int] | None


def perm_is_shard_local(perm: list[int] | torch.Tensor, world: int) -> bool:
    """True when every rank's slice of the permuted order reads only that rank's own input channels
    (the permutation is block diagonal over the `world` equal shards of K)."""
    p = torch.as_tensor(perm)
    k = p.numel()
    if world == 1:
        return True
    per = k // world
    return bool(torch.equal(p // per, torch.arange(k) // per))


def layer_quant_shard(spec: dict, shard: LinearShard, rank: int, world: int) -> LayerQuantShard:
    """Slice one quant_config.json layer entry (block_bits, perm, perm_folded) for `rank`.

    Column-parallel layers read the whole (replicated) input: the whole block map and permutation.
    Row-parallel layers hold blocks [k0/128, k1/128) of the permuted order. The permutation applied
    at run time (None when folded into the previous layer's rows: the input already arrives in
    permuted order) decides where each of those blocks' channels lives: if all on this rank, a
    local gather; otherwise the input is all-gathered and indexed (`input_index`)."""
    bits, perm = spec["block_bits"], spec["perm"]
    runtime_perm = None if perm is None or spec["perm_folded"] else perm
    if shard.role == "column":
        return LayerQuantShard(bits, runtime_perm, None)
    k0, k1 = shard.k
    local_bits = None if bits is None else bits[k0 // BLOCK_SIZE: -(-k1 // BLOCK_SIZE)]
    if runtime_perm is None:
        return LayerQuantShard(local_bits, None, None)
    if perm_is_shard_local(runtime_perm, world):
        return LayerQuantShard(local_bits, [c - k0 for c in runtime_perm[k0:k1]], None)
    return LayerQuantShard(local_bits, None, list(runtime_perm[k0:k1]))
