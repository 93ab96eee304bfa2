"""Tensor parallelism: one model split over the GPUs of a host, torch.distributed (NCCL on CUDA, gloo
on CPU), one process per GPU, rank 0 schedules (engine.py), launched by torchrun or spawned
(launch.py). The single-process path does not import this package and is unchanged by it.

How each layer is split (Megatron-style; sharding.py has the exact rules, model.py applies them):

- qkv_proj, gate_up_proj: column-parallel, split by output rows; no communication. Rank r keeps
  its own q heads and its own KV heads (heads and KV heads must both divide by the world size: KV
  heads are not replicated), and the same slice of gate and of up rows. The input, the residual
  stream, is on every rank, so the layer keeps its whole FMPQ permutation and block map and the
  fused RMSNorm-gather-quantize runs unchanged.
- o_proj, down_proj: row-parallel, split by input channels, one all-reduce of the output.
- embedding: vocabulary-parallel (each rank looks up its rows, all-reduce); LM head: vocabulary
  rows per rank, logits all-gathered, so every rank holds the same full logits.
- KV cache: each rank caches only its KV heads (the engine sizes KVStorage from the per-rank
  config), INT4 codes, scales and zeros alike.

FMPQ and splitting K (the row-parallel layers). A quantized layer's K axis is stored in permuted
order: qweight columns, w_scales groups and block_bits follow the permutation, where permuted
position j reads original input channel perm[j], and every 128-channel block of that order is INT4
or INT8 as a whole (and Hadamard-rotated as a whole when INT4). So a rank's K shard is taken in the
permuted (stored) order, as whole blocks: rank r holds blocks [r*nb/W, (r+1)*nb/W) with their
block_bits, w_scales groups, qweight columns and the slice perm[k0:k1]; a K that does not split
into whole blocks per rank is refused with the layer's name. Which input channels those blocks need:

- down_proj: its permutation is folded into gate_up's output rows, so its input arrives already in
  permuted order, and column-parallel gate_up rank r produces exactly permuted channels [k0, k1):
  the blocks are local, with no gather at all.
- o_proj: its input is attention's output, head-major in original order, and rank r produces the
  channels of its own heads, original [k0, k1). If the permutation is block diagonal over the W
  shards (perm[k0:k1] all within [k0, k1): a TP-aware quantizer, an identity permutation, or one
  rank), the rank gathers locally with perm[k0:k1] - k0. Otherwise (FMPQ gathers outliers of every
  head into the leading blocks, so a calibrated permutation usually crosses ranks) the rank
  all-gathers the full attention output [T, K] and indexes its channels perm[k0:k1]: correct for
  any permutation, at the cost of one all-gather per layer. The choice is per layer, made from the
  whole permutation (the same on every rank), so all ranks take the same path.

The per-token, per-block activation scales depend only on the block's own channels, so a rank
quantizes its blocks exactly as one process would; row-parallel results differ from one process
only in the order the float32 block partial sums are added.
"""
