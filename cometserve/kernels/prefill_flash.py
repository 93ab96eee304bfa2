"""The CUDA prefill path over the INT4 cache: dequantize the sequences' K/V into contiguous 16-bit
tensors (kv_cache.gather_kv, one memory-bound pass) and run PyTorch's flash kernels on them. Called by
attention.prefill_attention, which checks the arguments."""

from __future__ import annotations

import torch
import triton

from cometserve.kernels.kv_cache import gather_kv

# SDPA's cuDNN backend (the fastest for a whole causal prompt on the H100) costs ~40-70 ms more at a
# prompt length it has not just seen (measured through the engine; not with cuDNN off). A whole prompt
# is padded to a multiple of max(SDPA_PAD, its length's power of two / 8) rows (20 values up to 8192,
# at most 1/8 more rows), so prompts that pad alike share that (NOTES-attention.md, session 8).
SDPA_PAD = 128


def sdpa_rows(t: int) -> int:
    """Rows a whole prompt of t tokens is padded to for SDPA."""
    pad = max(SDPA_PAD, triton.next_power_of_2(t) // 8)
    return -(-t // pad) * pad


def prefill_flash(q, cache, block_tables, cu_seqlens_q, context_lens, seq_slots, scale, max_seqlen_q,
                  max_context_len, total_context=None):
    """Dequantize into contiguous 16-bit K/V, then the best flash kernel PyTorch has: for one sequence
    SDPA (cuDNN for a whole causal prompt, FlashAttention-2 with a bottom-right mask after a prefix),
    for several FlashAttention-2 varlen. attention.prefill_attention's contract (its "flash" impl)."""
    if max_context_len is None:
        max_context_len = int(context_lens.max())
    b, t = context_lens.shape[0], q.shape[0]
    cu_k = cu_seqlens_q  # one sequence: the gather reads only cu_k[0] == 0 (saves two launches)
    if b > 1:
        cu_k = torch.zeros(b + 1, dtype=torch.int32, device=q.device)
        torch.cumsum(context_lens, 0, out=cu_k[1:])
    whole = b == 1 and t == max_context_len  # one prompt with no cached prefix: causal
    # without the host's sum, an upper bound on the rows (exact for one sequence) keeps the call free of
    # device syncs; a long continuation beside many short prompts would allocate far more than needed
    rows = sdpa_rows(t) if whole else total_context if total_context is not None else b * max_context_len
    k, v = gather_kv(cache, block_tables, context_lens, cu_k, seq_slots, q.dtype, max_context_len, rows,
                     head_major=b == 1)
    if b > 1:
        return _varlen(q, k, v, cu_seqlens_q, cu_k, max_seqlen_q, max_context_len, scale)
    if whole:
        k[t:].zero_()  # padded rows: zeros (a real row never sees them under the causal mask)
        v[t:].zero_()
        return _sdpa(_pad_rows(q, rows), k, v, scale, is_causal=True)[:t]
    from torch.nn.attention.bias import causal_lower_right
    return _sdpa(q, k, v, scale, attn_mask=causal_lower_right(t, max_context_len))


def own_rows_into(k, v, first: int, cu_seqlens_host: list[int]):
    """Where write_kv(dequantize_into=...) should leave a step's rows for flash_own_rows: k and v
    themselves, or, for one prompt (rows first .. of k and v) whose length SDPA pads, head-major
    buffers with its zero padding (so neither K nor V is copied again to pad it)."""
    t = cu_seqlens_host[-1] - cu_seqlens_host[0]
    if len(cu_seqlens_host) > 2 or sdpa_rows(t) == t:
        return k, v
    bufs = []
    for x in (k, v):
        buf = x.new_empty(x.shape[1], first + sdpa_rows(t), x.shape[2])
        buf[:, first + t:].zero_()
        bufs.append(buf.transpose(0, 1))
    return tuple(bufs)


def flash_own_rows(q, k, v, cu_seqlens_q, max_seqlen_q, scale):
    """Causal attention of chunks that all start at position 0 over their own K/V rows: k, v hold
    what the cache gives back for them (write_kv(dequantize_into=own_rows_into(...))), so no
    gather. One sequence: SDPA (cuDNN) on the rows where they are, q copied only to pad a length
    that sdpa_rows pads; several: FlashAttention-2 varlen (any row and head stride)."""
    if cu_seqlens_q.shape[0] > 2:
        return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_q, max_seqlen_q, max_seqlen_q, scale)
    t = q.shape[0]
    rows = sdpa_rows(t)
    return _sdpa(_pad_rows(q, rows), _pad_rows(k[:rows], rows), _pad_rows(v[:rows], rows), scale,
                 is_causal=True)[:t]


def _pad_rows(x, rows):
    """x [t, H, D] with zero rows up to `rows`: a copy and a fill (torch.cat of a strided view of the
    qkv projection took 8 us at 500 x 32 heads, 3x the copy)."""
    t = x.shape[0]
    if t == rows:
        return x
    out = x.new_empty(rows, *x.shape[1:])
    out[:t].copy_(x)
    out[t:].zero_()
    return out


def _sdpa(q, k, v, scale, **mask):
    """One sequence, [rows, heads, D] each, through SDPA (GQA) -> [q rows, Hq, D]."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale=scale,
        enable_gqa=True, **mask)
    return out[0].transpose(0, 1)


def _varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """FlashAttention-2 varlen, causal (bottom-right), GQA."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False,
                                                   scale=scale)[0]
